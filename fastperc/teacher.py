"""FrozenTeacher: a frozen copy of a diffusion model that returns the features of named layers."""
from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Sequence

import torch
import torch.utils.checkpoint  # called as torch.utils.checkpoint.checkpoint: looked up per call
from torch import nn

from .adapters import family_of, find_adapter, is_joint_block, mid_depth_block
from ._fsdp2 import fsdp2, is_fsdp2_module
from .teacher_fp8 import FP8Linear, require_fp8, to_fp8
from .teacher_pruning import copy_from_shards, copy_without, held, unused_by_trace
from .errors import InputError


class _StopForward(Exception):
    """Raised by the generic path's hook once every tapped layer has fired (skips the rest)."""


def first_tensor(output) -> torch.Tensor:
    """A module's output as one tensor: tuples, lists and diffusers outputs give their first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    if hasattr(output, "to_tuple"):
        return first_tensor(output.to_tuple())
    raise TypeError(f"layers: a tapped layer returned {type(output).__name__}, expected a tensor or a tuple "
                    "whose first element is a tensor")


def tapped_output(module: nn.Module, output) -> torch.Tensor:
    """What a tap on `module` gives: a joint text-image block's image stream (output[1] for the blocks
    registered as joint: SD3 and Flux blocks return (text, image)), else `first_tensor(output)`."""
    if isinstance(output, (tuple, list)) and is_joint_block(module):
        return first_tensor(output[1])
    return first_tensor(output)


def unwrap(model):
    """The plain module inside the wrappers training scripts put around a model: torch.compile's
    OptimizedModule (`_orig_mod`), DistributedDataParallel / DataParallel / FSDP and
    torch.optim.swa_utils.AveragedModel (`module`). Layer names then need no wrapper prefix, and the
    truncated forwards recognise the architecture."""
    for _ in range(8):  # wrappers may nest (a compiled DDP module, an AveragedModel of a compiled one)
        if isinstance(model, FrozenTeacher):
            model = model.model
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel",
                                      "AveragedModel") and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            break
    if type(model).__name__ == "EMAModel" and hasattr(model, "shadow_params"):
        raise TypeError("model: a diffusers EMAModel holds weights, not a network; copy them into a model first "
                        "(ema.copy_to(net.parameters())) and pass that model, or pass the raw MSE model as the "
                        "paper does")
    return model


_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _strip_wrapper_prefix(name: str, modules: dict) -> str:
    """`module.mid_block` or `_orig_mod.mid_block` (names copied from a wrapped model) -> `mid_block`."""
    while name not in modules and name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


# Keyword inputs a low-precision teacher leaves in their dtype, as it leaves the timestep: positions and
# time-like scalars the model embeds itself (sinusoidal or rotary), which bf16 would round (bf16 holds
# integers exactly only up to 256). Flux's img_ids / txt_ids are float positions, its guidance a scale.
KEEP_DTYPE_KWARGS = frozenset({"img_ids", "txt_ids", "guidance"})


def cast_floating(value, dtype: torch.dtype):
    """Every floating tensor in `value` (nested dicts, lists and tuples included) cast to `dtype`;
    integer tensors (timesteps, labels, ids) and everything else unchanged. The one implementation the
    teacher uses for its conditioning inputs (see `cast_kwargs`)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floating(v, dtype) for v in value)
    return value


def cast_kwargs(kwargs: dict, dtype: torch.dtype) -> dict:
    """A low-precision teacher's keyword inputs: every floating tensor cast to `dtype` except those named
    in KEEP_DTYPE_KWARGS. The timestep is not a keyword input here: it is passed outside the cast and
    stays as given (fp32 for float timesteps), for UNets and transformers alike."""
    return {k: v if k in KEEP_DTYPE_KWARGS else cast_floating(v, dtype) for k, v in kwargs.items()}


def _disable_gradient_checkpointing(model: nn.Module) -> None:
    """No gradient checkpointing in a frozen copy (it would only cost recompute): diffusers' method,
    and the `gradient_checkpointing` flag that diffusers and HF transformers modules and most custom
    transformers (DiT/SiT code) read in their forward."""
    if hasattr(model, "disable_gradient_checkpointing") and getattr(model, "is_gradient_checkpointing", False):
        model.disable_gradient_checkpointing()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.gradient_checkpointing = False


def _time_keyword(model: nn.Module) -> str | None:
    """The name under which the hook path passes the timestep to `model.forward`: `timestep` (diffusers
    UNets and transformers, whose second positional parameter is often encoder_hidden_states) or
    `timesteps` if the forward has it, else its second positional parameter's name (`t` in DiT/SiT code).
    None (pass it positionally) when the signature does not say."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params]
    for name in ("timestep", "timesteps"):
        if name in names:
            return name
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 and positional[1].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
        return positional[1].name
    return None


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """The tap used when FrozenTeacher gets `layers=None`.

    A UNet (any model with a `mid_block`): ("mid_block",), the paper's best layer. A transformer: one
    mid-depth block, the last block of the first half of its block stack (index N // 2 - 1 of N blocks):
    the known diffusers transformers' `transformer_blocks` (for Flux the joint and single blocks counted
    as one stack of num_layers + num_single_layers), else the model's longest ModuleList child (the
    `blocks` of DiT/SiT code). The paper reports no result for transformers; a mid-depth block is the
    natural analogue of the UNet midblock (the most compressed, most semantic point of the network,
    with later blocks turning back towards the output). Raises ValueError when neither exists."""
    if isinstance(model, FrozenTeacher):
        return model.layers
    model = unwrap(model)
    if "mid_block" in dict(model.named_modules()):
        return ("mid_block",)
    family = family_of(model)
    blocks = family.blocks(model) if family is not None else []
    if not blocks:
        lists = [(name, len(child)) for name, child in model.named_children()
                 if isinstance(child, nn.ModuleList) and len(child)]
        if lists:
            name, n = max(lists, key=lambda x: x[1])  # the first of the longest
            blocks = [f"{name}.{i}" for i in range(n)]
    if not blocks:
        raise InputError(f"layers: {type(model).__name__} has no `mid_block` and no list of blocks to take a "
                         "mid-depth block from; pass layers=(...) with submodule names from model.named_modules()")
    return (mid_depth_block(blocks),)


def _no_midblock_hint(name: str, model: nn.Module) -> str:
    """For `mid_block` asked of a transformer (SelfPerceptualLoss's default layers): its default tap."""
    if name != "mid_block":
        return ""
    try:
        return (f"; a model without a midblock (a transformer): pass layers=None for a mid-depth block, "
                f"{default_layers(model)}")
    except ValueError:
        return ""


def _requires_grad(value) -> bool:
    """True if a tensor in `value` (nested lists, tuples and dicts included) requires grad."""
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (list, tuple)):
        return any(_requires_grad(v) for v in value)
    if isinstance(value, dict):
        return any(_requires_grad(v) for v in value.values())
    return False


def _checkpointed_forward(forward, *args, **kwargs):
    """A checkpoint unit's forward: checkpointed only when autograd records it (the fake branch); the
    real branch (no_grad) and grad-free inputs (timestep embeddings) call it directly and pay nothing."""
    if torch.is_grad_enabled() and _requires_grad((args, kwargs)):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _block_units(model: nn.Module, adapter, stop: str | None) -> tuple[str, ...]:
    """Names of the modules checkpointed (and sharded) one by one: the adapter's stages up to `stop`, or else the
    model's children with ModuleList / Sequential containers expanded (the blocks of most UNets and
    transformers). Leaf modules are skipped: a single conv or linear saves only its input, which its
    checkpoint would keep too."""
    modules = dict(model.named_modules())
    if adapter is not None:
        stages = adapter.stages(model)
        names = [n for stage in stages[:stages.index(stop) + 1] for n in stage.split("|")]
    else:
        def expand(prefix, module):
            for name, child in module.named_children():
                if isinstance(child, (nn.ModuleList, nn.Sequential)):
                    yield from expand(f"{prefix}{name}.", child)
                else:
                    yield f"{prefix}{name}"
        names = list(expand("", model))
    return tuple(n for n in names if modules.get(n) is not None and next(modules[n].children(), None) is not None)


def _blocks_without_embeddings(model: nn.Module, adapter, stop: str | None) -> tuple[str, ...]:
    """The block units that hold the teacher's work: `_block_units` less the adapter's embeddings (the
    timestep and conditioning embeddings, small; kept whole by `shard` and in their dtype by `fp8`)."""
    embeddings = set()
    if adapter is not None:
        embeddings = {n for stage in adapter.embeddings(model) for n in stage.split("|")}
    return tuple(n for n in _block_units(model, adapter, stop) if n not in embeddings)


def _wrap_forward(module: nn.Module) -> None:
    """Checkpoint `module` by an instance `forward` attribute: its name, its hooks (run by __call__
    around forward, outside the checkpoint) and its parameters stay as they are. A partial of the bound
    method, not a closure, so that deepcopy rebinds it to the copied module."""
    fwd = module.forward
    if isinstance(fwd, functools.partial) and fwd.func is _checkpointed_forward:
        return  # already wrapped (copy=False on a model another teacher wrapped)
    module.forward = functools.partial(_checkpointed_forward, fwd)


def _call_model(model: nn.Module, time_keyword: str | None, sample, timestep, kwargs: dict):
    """The hook path's full call: the timestep by keyword where the forward names it (PixArt, SD3 and Flux
    take encoder_hidden_states second), else positionally."""
    if time_keyword is None:
        return model(sample, timestep, **kwargs)
    return model(sample, **{time_keyword: timestep}, **kwargs)


def _check_example_inputs(example_inputs) -> tuple:
    """(sample, timestep) or (sample, timestep, kwargs), as the teacher will be called."""
    if not isinstance(example_inputs, tuple) or len(example_inputs) not in (2, 3) or \
            not isinstance(example_inputs[0], torch.Tensor) or \
            (len(example_inputs) == 3 and not isinstance(example_inputs[2], dict)):
        raise InputError(f"example_inputs: expected (sample, timestep) or (sample, timestep, kwargs dict), as the "
                         f"teacher will be called, got {type(example_inputs).__name__}")
    sample, timestep, *rest = example_inputs
    return sample, timestep, (rest[0] if rest else {})


def _check_adapters_off(model: nn.Module, copy: bool, dtype, checkpoint: bool) -> None:
    """adapters_off needs the model itself (a LoRA student's base weights are its teacher) with peft
    adapters it can switch off, and nothing that would change that model for its training too."""
    if copy:
        raise InputError("adapters_off: the teacher is the model itself with its adapters off (nothing copied); "
                         "pass copy=False")
    if dtype is not None or checkpoint:
        raise InputError("adapters_off: dtype, fp8 and checkpoint would change the model being trained; the "
                         "shared-weights teacher runs it as it is")
    if not (callable(getattr(model, "disable_adapters", None)) and callable(getattr(model, "enable_adapters", None))
            and getattr(model, "peft_config", None)):
        raise InputError(f"adapters_off: {type(model).__name__} has no peft adapters to switch off; add them first "
                         "(diffusers: model.add_adapter(peft.LoraConfig(...)))")


def nearest_names(name: str, names: Sequence[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.4)
    return close or [x for x in names if x and "." not in x][:n]


class FrozenTeacher(nn.Module):
    """A frozen diffusion model used as the perceptual network (eval mode, no parameter gradients).

    Calling `teacher(sample, timestep, **kwargs)` returns the outputs of `layers` (names from
    `model.named_modules()`, e.g. `mid_block`, `transformer_blocks.7`, `single_transformer_blocks.9`),
    in `layers` order. A tuple output gives its first element, except a joint text-image block's (SD3's
    JointTransformerBlock, Flux's FluxTransformerBlock and FluxSingleTransformerBlock return (text,
    image)), which gives its image stream. Nothing after the deepest tapped layer runs: for a model of a
    registered family (`fastperc.adapters`: fastperc's UNet and DiT, diffusers' UNet2DModel /
    UNet2DConditionModel (encoder and midblock), DiTTransformer2DModel, PixArtTransformer2DModel,
    SD3Transformer2DModel (SD3 and SD3.5) and FluxTransformer2DModel, their subclasses and FSDP2-sharded
    forms, and classes added with `register_adapter`) whose adapter's probe passes, a truncated forward
    without hooks or exceptions (torch.compile friendly); for any other module (a SiT, a decoder tap,
    unsupported kwargs, a family's model that fails its probe, which is warned about once), forward
    hooks that stop the forward once every tap has fired.

    Timesteps: `timestep` is what the loss passes, the schedule's timesteps (DDPM indices 0..T-1; for a
    flow-matching schedule the scheduler's float timesteps sigma * T with T = num_train_timesteps =
    1000). Each known architecture gets what its forward expects: the UNets, DiT and PixArt the value as
    given (the integer index), SD3 as given (sigma * 1000, what diffusers' SD3 training script passes),
    Flux timestep / 1000 (sigma, what diffusers' Flux training script passes). Other models get it as
    given. Models are called with keyword arguments: the hook path calls
    `model(sample, timestep=timestep, **kwargs)`, naming the time parameter as the forward does
    (`timestep`, `timesteps`, or its second parameter's name, e.g. `t`), since transformers such as
    PixArt, SD3 and Flux take encoder_hidden_states second.

    Args:
        model: the MSE-pretrained diffusion model (use the raw model, not its EMA, as the paper does).
        layers: submodule names to tap. None (default) picks `default_layers(model)`: for a UNet the
            midblock output, the paper's best choice; for a transformer a mid-depth block
            (transformer_blocks.{N//2 - 1}; for Flux counted over the joint + single stack). The paper
            reports no transformer result; a mid-depth block is the natural analogue of the midblock.
        copy: deep-copy `model` so the caller's model stays trainable (default), with gradient
            checkpointing turned off in the copy (the caller's model keeps its setting). With False the
            model itself is put in eval mode and frozen.
        dtype: optional dtype for the teacher's weights (e.g. torch.bfloat16); the sample and every
            floating tensor in the keyword arguments (encoder_hidden_states, pooled_projections, ...)
            are cast to it. The timestep is never cast (float timesteps stay fp32, the model embeds
            them), nor are integer labels and ids or Flux's float position ids and guidance.
        checkpoint: recompute the fake branch's teacher activations in backward instead of keeping
            them, block by block (torch.utils.checkpoint, non-reentrant, one checkpoint per block: the
            truncated forward's stages, or for other architectures the model's children with
            ModuleList / Sequential expanded), so backward rebuilds one block's activations at a time.
            Use it for big teachers whose activations on the fake branch dominate training memory; it
            costs one extra teacher forward of the fake branch in backward. Calls without grad (the
            real branch) run as without it. Default False. With copy=False the model's own blocks are
            wrapped (their `forward` becomes an instance attribute; names and hooks are unchanged).
        prune: (keyword) with copy=True, copy only what runs up to the deepest tap (default True): for
            a registered family the adapter's stages up to the stop stage (the decoder of a UNet, the
            output head and later blocks of a transformer are left out); for other models only with
            `example_inputs`, else the whole model. The left-out modules are never copied; their
            names stay reserved (None in the copy). `pruned` lists them; `held_parameters` and
            `held_bytes` say what the teacher holds.
        fp8: (keyword) run the teacher's Linear layers in FP8 (default False): each nn.Linear inside the
            blocks (not the timestep and conditioning embeddings), with both dimensions multiples of 16,
            becomes an `FP8Linear` (`fastperc.teacher_fp8`): its weight quantised once to e4m3 with a
            per-tensor scale, its input scaled per call, the fake branch's input gradient computed in
            FP8 too (e5m2). The rest of the teacher runs in `dtype` (bfloat16 when dtype is None).
            Transformer teachers are mostly Linear layers; a UNet's convolutions stay in `dtype`. Needs
            copy=True and a device with FP8 matmuls (CUDA sm_89 or newer, or the CPU): InputError
            otherwise, when the teacher is built or moved. `fp8_layers` lists the converted layers.
            Quantised from the source's own precision, before the cast: prune, quantise and cast, then
            shard.
        adapters_off: (keyword) a shared-weights teacher for a LoRA student (default False): the model
            itself (copy=False), holding peft adapters (diffusers' `add_adapter`), run in eval mode with
            its adapters switched off (`disable_adapters()`) for each teacher call, so its features are
            the base model's; nothing is copied or frozen (the LoRA weights keep training; `held_bytes`
            is 0) and the model is not a submodule of the teacher. No dtype, fp8 or checkpoint.
        example_inputs: (keyword) `(sample, timestep)` or `(sample, timestep, kwargs)` as the teacher
            will be called, for pruning a model the hook path runs: one traced forward (no grad) records
            which modules run and which parameters are read before the deepest tap fires (which modules
            run can depend on the call's arguments; a parameter read without its module being called is
            kept). Not used for registered families, whose stages are known.

    Wrapped models (torch.compile, DDP/FSDP1, AveragedModel) are unwrapped, and layer names copied
    from a wrapped model (`module.mid_block`, `_orig_mod.mid_block`) are accepted. An FSDP2-sharded
    model is recognised as its family; with copy=True it is rebuilt unsharded from its config (see
    `shard` for the other direction).

    Example:
        >>> import torch, fastperc
        >>> from fastperc.models import UNet
        >>> teacher = fastperc.FrozenTeacher(UNet(), layers=("down_blocks.1", "mid_block"))
        >>> feats = teacher(torch.randn(2, 1, 32, 32), torch.tensor([10, 500]))
        >>> [tuple(f.shape) for f in feats]
        [(2, 64, 8, 8), (2, 128, 8, 8)]

    Reference: Lin & Yang, "Diffusion Model with Perceptual Loss", arXiv 2401.00110.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, copy: bool = True,
                 dtype: torch.dtype | None = None, checkpoint: bool = False, *, prune: bool = True,
                 example_inputs: tuple | None = None, fp8: bool = False, adapters_off: bool = False):
        super().__init__()
        source = model if isinstance(model, FrozenTeacher) else None
        model = unwrap(model)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if layers is None:
            layers = default_layers(source if source is not None else model)  # a teacher's: its own
        if isinstance(layers, str):
            layers = (layers,)
        layers = tuple(layers)
        if not layers or not all(isinstance(x, str) for x in layers):
            raise InputError(f"layers: expected a non-empty sequence of submodule names, got {layers!r}")
        modules = dict(model.named_modules())
        layers = tuple(_strip_wrapper_prefix(name, modules) for name in layers)
        if len(set(layers)) != len(layers):
            raise InputError(f"layers: expected distinct names, got {layers!r}")
        for name in layers:
            if name not in modules:
                pruned = (f"; the teacher passed in was pruned after {source.layers} (build it with prune=False "
                          "to tap deeper)") if source is not None and source.pruned else ""
                raise InputError(f"layers: unknown layer {name!r} in {type(model).__name__}; nearest valid names: "
                                 f"{nearest_names(name, list(modules))}{_no_midblock_hint(name, model)}{pruned}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected None or a floating torch.dtype, got {dtype!r}")
        if dtype is not None and dtype.itemsize == 1:
            raise InputError(f"dtype: {dtype} is not a dtype a whole teacher runs in; pass fp8=True (its Linear "
                             "layers in FP8, the rest in bfloat16)")
        if not isinstance(fp8, bool):
            raise TypeError(f"fp8: expected a bool (True or False), got {type(fp8).__name__} {fp8!r}")
        if fp8 and not copy:
            raise InputError("fp8: quantising replaces the model's Linear layers; it needs copy=True (the caller's "
                             "model stays as it is)")
        if fp8 and dtype is None:
            dtype = torch.bfloat16
        if not isinstance(adapters_off, bool):
            raise TypeError(f"adapters_off: expected a bool (True or False), got {type(adapters_off).__name__} "
                            f"{adapters_off!r}")
        if adapters_off:
            _check_adapters_off(model, copy, dtype, checkpoint)
        if not isinstance(checkpoint, bool):
            raise TypeError(f"checkpoint: expected a bool (True or False), got {type(checkpoint).__name__} "
                            f"{checkpoint!r}")

        if not isinstance(prune, bool):
            raise TypeError(f"prune: expected a bool (True or False), got {type(prune).__name__} {prune!r}")
        if example_inputs is not None:
            example_inputs = _check_example_inputs(example_inputs)

        # The family (timestep conversion, required conditioning: they hold on the hook path too) and the
        # truncation plan (the adapter whose probe passed, the stage of each layer, the last to run), all
        # read from the model as given: a pruned teacher's model is never probed again as a whole model.
        if source is not None and source.pruned:
            arch, adapter = source._arch, source._adapter
        else:
            arch, adapter = family_of(model), find_adapter(model)
        stop: str | None = None
        nested: tuple[str, ...] = ()
        if adapter is not None:
            stages = adapter.stages(model)
            idx = [adapter.stage_of(model, name) for name in layers]
            if any(i is None for i in idx):
                adapter = None  # a tap outside the covered stages (e.g. the decoder of a diffusers UNet)
            else:
                stop = stages[max(idx)]
                nested = tuple(n for n in layers if n not in stages)
        time_keyword = _time_keyword(model)

        # What the copy leaves out: what runs after the deepest tap (known from the adapter's stages, or
        # traced on example inputs for the hook path). Nothing is dropped without a copy.
        drop: list[str] = []
        if copy and prune:
            if adapter is not None:
                drop = adapter.unused(model, stop)
            elif example_inputs is not None:
                sample, timestep, kwargs = example_inputs
                if arch is not None:
                    timestep = arch.model_timestep(timestep)
                drop = unused_by_trace(model, layers,
                                       lambda: _call_model(model, time_keyword, sample, timestep, kwargs))
        elif example_inputs is not None:
            raise InputError("example_inputs: they only serve to prune a copy; with copy=False or prune=False "
                             "leave them out")

        sharded = is_fsdp2_module(model)
        if copy:
            # FSDP refuses deepcopy: a sharded model is rebuilt plain on the meta device, then filled with
            # what is kept, gathered tensor by tensor. Either way the dropped modules are never copied.
            if sharded:  # rebuilt whole from its config: leave out what the source left out too
                model = copy_from_shards(model, [*(source.pruned if source is not None else ()), *drop])
            else:
                model = copy_without(model, drop)
            _disable_gradient_checkpointing(model)  # a copy is ours; the caller's model keeps its setting
        elif dtype is not None and sharded:
            raise InputError("dtype: a sharded model is not cast in place; cast before sharding (prune, cast, "
                             "then shard), or build a copy (copy=True)")
        if fp8:  # from the source's own precision, then the cast below takes the rest (and the biases)
            device = next(model.parameters()).device
            if not (device.type == "cpu" and torch.cuda.is_available()):  # built on the host to be moved:
                require_fp8(device)                                       # checked when moved (_apply)
            to_fp8(model, _blocks_without_embeddings(model, adapter, stop) if adapter is not None else None)
        if dtype is not None:
            model = model.to(dtype)
        self.adapters_off = adapters_off
        if adapters_off:
            # The model being trained, not a part of this module: its parameters are not the teacher's
            # (an optimizer over a parent module would not see them twice), its train/eval mode and
            # requires_grad stay the trainer's; the teacher switches it to eval and its adapters off only
            # for the span of each call.
            object.__setattr__(self, "model", model)
        else:
            model.eval().requires_grad_(False)
            self.model = model
        self.layers = layers
        self.dtype = dtype

        self._arch, self._adapter, self._stop, self._nested = arch, adapter, stop, nested
        # The conditioning the model cannot run without, known for the adapters' architectures.
        self.required_kwargs: tuple[str, ...] = arch.required(model) if arch is not None else ()
        self._time_keyword = time_keyword
        self._fsdp_root = sharded and not copy  # copy=False on a sharded model
        self.shard_units: tuple[str, ...] = ()
        self.pruned: tuple[str, ...] = tuple(drop) if source is None else source.pruned + tuple(drop)
        self.held_parameters, self.held_bytes = (0, 0) if adapters_off else held(model)  # adapters_off: no copy
        self.fp8_layers: tuple[str, ...] = tuple(n for n, m in model.named_modules() if isinstance(m, FP8Linear))
        if fp8 and not self.fp8_layers:
            raise InputError(f"fp8: {type(model).__name__} has no nn.Linear layer with both dimensions multiples of "
                             "16 in the blocks the teacher runs (nothing to quantise); use "
                             "dtype=torch.bfloat16")

        # Stage-by-stage checkpointing: one checkpoint per block, so backward rebuilds one block at a time
        # (one checkpoint around the whole branch would rebuild all of it while the student's activations
        # are still alive, and the peak would not fall).
        self.checkpoint = checkpoint
        self.checkpoint_units: tuple[str, ...] = ()
        if checkpoint:
            self.checkpoint_units = _block_units(model, self._adapter, self._stop)
            modules = dict(model.named_modules())
            for name in self.checkpoint_units:
                _wrap_forward(modules[name])

    def shard(self, mesh=None, **fully_shard_options) -> "FrozenTeacher":
        """Shard what this teacher holds over the processes of `mesh` with FSDP2 (`fully_shard`), block by
        block, and return the teacher: each rank then holds about 1/N of it. Call it on every rank after
        `torch.distributed.init_process_group`, once the teacher is pruned and cast (the order is fixed:
        prune and cast when the teacher is built, shard last; a sharded teacher is not cast again).

        The blocks are the truncated forward's stages (for other models the children, with ModuleList /
        Sequential expanded); each is gathered when it runs and resharded after. The embeddings of the
        timestep and conditioning and the layers held by the model itself stay whole on every rank (they
        are small; no input gradient flows through the embeddings, so FSDP would never reshard them
        after backward). Each step gathers a block once per branch (the real and the fake one) and once
        more in the fake branch's backward: pass reshard_after_forward=False to keep the blocks gathered
        between the two branches instead (less communication, more memory).

        Args:
            mesh: a 1-D DeviceMesh; default: all processes, on the teacher's device type.
            **fully_shard_options: passed to `fully_shard` for each block (e.g. reshard_after_forward).

        Works beside a DDP student and an FSDP2 student (build the teacher from the FSDP2 student: it
        is rebuilt unsharded from its config and gathered tensor by tensor, then pruned). Afterwards
        `held_parameters` / `held_bytes` count this rank's shards; while the teacher runs, the root's own
        layers are gathered on top (conv_in, the embeddings: a few percent of a UNet or transformer).
        """
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise InputError("shard: needs torch.distributed initialised (init_process_group) on every rank")
        if self._fsdp_root:
            raise InputError("shard: this teacher is already sharded")
        if self.adapters_off:
            raise InputError("shard: an adapters_off teacher is the model being trained; shard that model instead")
        from torch.distributed.device_mesh import init_device_mesh
        fully_shard, _ = fsdp2()
        if mesh is None:
            device = next(self.model.parameters()).device
            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        modules = dict(self.model.named_modules())
        self.shard_units = _blocks_without_embeddings(self.model, self._adapter, self._stop)
        for name in self.shard_units:
            fully_shard(modules[name], mesh=mesh, **fully_shard_options)
        # The root's own layers are gathered by _run_adapter once and kept (small); the blocks reshard.
        fully_shard(self.model, mesh=mesh, reshard_after_forward=False)
        self._fsdp_root = True
        self.held_parameters, self.held_bytes = held(self.model)
        return self

    fp8_layers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        # Moved (teacher.to(device), .cuda()): an FP8 teacher refuses a device without FP8 matmuls here,
        # once, rather than failing inside the first step.
        module = super()._apply(fn, recurse)
        if self.fp8_layers:
            require_fp8(self.model.get_submodule(self.fp8_layers[0]).weight.device)
        return module

    def train(self, mode: bool = True) -> "FrozenTeacher":
        # The teacher stays in eval mode whatever its parent module does.
        return super().train(False)

    @property
    def truncated(self) -> bool:
        """True when calls with the adapter's supported kwargs use a hook-free truncated forward
        (compile friendly). False for the hook paths: unknown architectures, and taps nested inside
        a stage (which still stop after the deepest stage, but capture with hooks)."""
        return self._adapter is not None and not self._nested

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, **kwargs) -> list[torch.Tensor]:
        if self.adapters_off:
            model, was_training = self.model, self.model.training
            model.eval()
            model.disable_adapters()
            try:
                return self._features(sample, timestep, kwargs)
            finally:
                model.enable_adapters()
                model.train(was_training)
        return self._features(sample, timestep, kwargs)

    def _features(self, sample: torch.Tensor, timestep: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        if self.dtype is not None:
            sample = sample.to(self.dtype)
            kwargs = cast_kwargs(kwargs, self.dtype)  # the timestep stays outside the cast
        if self._arch is not None:
            timestep = self._arch.model_timestep(timestep)
        if self._adapter is not None and self._adapter.supports(kwargs):
            if not self._nested:
                out = self._run_adapter(sample, timestep, frozenset(self.layers), kwargs)
                return [first_tensor(out[name]) for name in self.layers]
            return self._run_with_hooks(sample, timestep, kwargs, stop_early=False)
        return self._run_with_hooks(sample, timestep, kwargs, stop_early=True)

    def _run_adapter(self, sample, timestep, keep: frozenset[str], kwargs) -> dict[str, torch.Tensor]:
        if self._fsdp_root:
            # The truncated forward calls the blocks, not the sharded root, so FSDP2's root hooks never
            # gather the root's own parameters (embeddings, conv_in): gather them here (a no-op once
            # gathered; the root's parameters are small, the blocks are their own units and reshard).
            self.model.unshard()
        return self._adapter.run(self.model, sample, timestep, keep, self._stop, **kwargs)

    def _run_with_hooks(self, sample, timestep, kwargs, stop_early: bool) -> list[torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        stages_out: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())
        hooked = self.layers if stop_early else self._nested

        def make_hook(name):
            def hook(module, args, output):
                captured.setdefault(name, tapped_output(module, output))
                if stop_early and len(captured) == len(hooked):
                    raise _StopForward
            return hook

        handles = [modules[name].register_forward_hook(make_hook(name)) for name in hooked]
        try:
            if stop_early:
                _call_model(self.model, self._time_keyword, sample, timestep, kwargs)
            else:
                keep = frozenset(self.layers) - set(self._nested)
                stages_out = self._run_adapter(sample, timestep, keep, kwargs)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        captured.update({k: first_tensor(v) for k, v in stages_out.items()})
        missing = [name for name in self.layers if name not in captured]
        if missing:
            raise RuntimeError(f"layers: {missing} never ran in {type(self.model).__name__}.forward; tap modules "
                               "that are called (a ModuleList container is not)")
        return [captured[name] for name in self.layers]

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, truncated={self.truncated}, stop={self._stop!r}, checkpoint={self.checkpoint}, "
                f"held={self.held_parameters:,} parameters ({self.held_bytes / 2**20:.1f} MiB), "
                f"pruned={len(self.pruned)} modules"
                + (f", fp8={len(self.fp8_layers)} Linear layers" if self.fp8_layers else "")
                + (", adapters_off=True (the model being trained, its adapters off)" if self.adapters_off else ""))
