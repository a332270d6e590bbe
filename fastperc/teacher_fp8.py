"""FP8 Linear layers for a frozen teacher: weights quantised once, activations scaled per call.

A frozen teacher needs no master weights and no weight gradients, only the input gradient of the fake
branch. `FP8Linear` holds its weight in float8 e4m3 with one fp32 scale (per tensor), quantises its
input to e4m3 with a scale from the input's absolute maximum at each call, and multiplies with
`torch._scaled_mm` (fp32 accumulation). Its backward quantises the incoming gradient to e5m2 (the wider
range gradients need; the usual FP8 training recipe) and multiplies it by the same FP8 weight. Scales
are computed on the device: no host sync.

FP8 matmuls run on CUDA GPUs of compute capability 8.9 or newer (Ada, Hopper, Blackwell) and, slowly,
on the CPU (which serves the parity tests); `fp8_unavailable` says why not elsewhere.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .errors import InputError

E4M3 = getattr(torch, "float8_e4m3fn", None)
E5M2 = getattr(torch, "float8_e5m2", None)
E4M3_MAX = 448.0    # the largest finite e4m3fn value
E5M2_MAX = 57344.0  # the largest finite e5m2 value
_MIN_SCALE = 1e-12  # an all-zero tensor gets this scale instead of 0 (no division by zero)


def fp8_unavailable(device: torch.device | str) -> str | None:
    """Why FP8 matmuls cannot run on `device`, or None when they can (the meta device always can)."""
    device = torch.device(device)
    if E4M3 is None or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no float8 dtypes or torch._scaled_mm"
    if device.type == "meta":
        return None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}; FP8 matmuls need sm_89 or newer "
                    "(Ada, Hopper, Blackwell)")
        return None
    if device.type == "cpu":
        return _cpu_fp8_unavailable()
    return f"FP8 matmuls run on CUDA (sm_89 or newer) and the CPU, not on {device.type}"


@functools.cache
def _cpu_fp8_unavailable() -> str | None:
    one = torch.ones(16, 16).to(E4M3)
    try:
        torch._scaled_mm(one, one.t(), scale_a=torch.ones(()), scale_b=torch.ones(()), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as exc:
        return f"this torch build has no CPU FP8 matmul ({str(exc).splitlines()[0][:100]})"
    return None


def require_fp8(device: torch.device | str) -> None:
    """Raise InputError naming `fp8` when FP8 matmuls cannot run on `device`."""
    reason = fp8_unavailable(device)
    if reason is not None:
        raise InputError(f"fp8: the teacher's FP8 Linear layers cannot run on {torch.device(device)}: {reason}; "
                         "build the teacher without fp8 (a bf16 teacher: dtype=torch.bfloat16)")


def quantise(t: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale in `fp8_dtype`, scale): one fp32 scale per tensor, from its absolute maximum, so that
    the largest magnitude maps to `fp8_max`. Computed on the device (no host sync)."""
    amax = torch.linalg.vector_norm(t.detach(), ord=float("inf"), dtype=torch.float32)  # max |t|, one pass
    scale = (amax / fp8_max).clamp_min(_MIN_SCALE)
    # Division in fp32 then saturation: a value rounding past the largest finite one would become NaN
    # (e4m3fn has no infinity).
    return (t.float() / scale).clamp(-fp8_max, fp8_max).to(fp8_dtype), scale


class _FP8Matmul(torch.autograd.Function):
    """x @ weight.T with x quantised to e4m3 per call, the product in `out_dtype`; backward: the input
    gradient only (the weight is frozen), in x's dtype, the incoming gradient quantised to e5m2."""

    @staticmethod
    def forward(ctx, x2d, weight, weight_scale, out_dtype):
        xq, x_scale = quantise(x2d, E4M3, E4M3_MAX)
        ctx.save_for_backward(weight, weight_scale)
        ctx.x_dtype = x2d.dtype
        # weight is (out, in) row-major: its transpose is the column-major operand _scaled_mm wants.
        return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale = ctx.saved_tensors
        gq, g_scale = quantise(grad.contiguous(), E5M2, E5M2_MAX)
        # grad (M, out) @ weight (out, in): the second operand must be column-major, a transient
        # transposed copy of the FP8 weight (one byte per weight, one layer at a time).
        w_cm = weight.t().contiguous().t()
        gx = torch._scaled_mm(gq, w_cm, scale_a=g_scale, scale_b=weight_scale, out_dtype=ctx.x_dtype)
        return gx, None, None, None


class FP8Linear(nn.Module):
    """A frozen nn.Linear whose matmul runs in FP8 (see the module docstring). Made by `from_linear`.

    The FP8 weight is stored as raw bytes (uint8) and its fp32 scale as int32 bits: `.to(dtype)`,
    `.half()` and `.bfloat16()` cast floating tensors and would undo the quantisation or round the
    scale; they move these with the module and leave their dtype alone. The bias keeps the teacher's
    dtype and is added after the matmul.

    Example:
        >>> import torch
        >>> from fastperc.teacher_fp8 import FP8Linear
        >>> linear = torch.nn.Linear(64, 32)
        >>> layer = FP8Linear.from_linear(linear)
        >>> x = torch.randn(4, 64)
        >>> y = layer(x)
        >>> y.shape, bool((y - linear(x)).abs().max() < 0.1 * linear(x).abs().max())
        (torch.Size([4, 32]), True)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale_bits", torch.ones((), device=device).view(torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """An FP8 copy of `linear` (quantised from the weight's own precision), on its device."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device,
                    dtype=w.dtype)
        q, scale = quantise(w, E4M3, E4M3_MAX)
        layer.weight.data = q.contiguous().view(torch.uint8)  # row-major: its transpose is column-major
        layer.weight_scale_bits = scale.reshape(()).view(torch.int32)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    @property
    def weight_fp8(self) -> torch.Tensor:
        return self.weight.view(E4M3)

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.weight_scale_bits.view(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        # As nn.Linear does: under autocast the product comes out in autocast's dtype, not the input's
        # (a LayerNorm before it gives fp32 under autocast).
        kind = x.device.type  # (the meta device of a FLOP count has no autocast)
        autocast = kind != "meta" and torch.is_autocast_enabled(kind)
        out_dtype = torch.get_autocast_dtype(kind) if autocast else x.dtype
        out = _FP8Matmul.apply(x2d, self.weight_fp8, self.weight_scale, out_dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)  # no-op in a teacher (its bias is in its dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8=e4m3"


def fp8_eligible(module: nn.Module) -> bool:
    """An nn.Linear that `_scaled_mm` takes: both dimensions multiples of 16 (a CUDA requirement)."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def to_fp8(model: nn.Module, within: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Replace, in place, the eligible nn.Linear layers of `model` (those inside the modules named in
    `within`, or all of them) by FP8Linear copies; returns their names."""
    modules = dict(model.named_modules())
    prefixes = None if within is None else tuple(f"{n}." for n in within)
    names = [n for n, m in modules.items() if n and fp8_eligible(m)
             and (prefixes is None or n.startswith(prefixes))]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, FP8Linear.from_linear(modules[name]))
    return tuple(names)
