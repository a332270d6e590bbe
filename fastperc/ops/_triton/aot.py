"""Ahead-of-time compile of every Triton kernel for a GPU target, without a GPU.

    python -m fastperc.ops._triton.aot [--arch 90]

Proves each kernel lowers to PTX and a cubin for each dtype (run with TRITON_INTERPRET unset).
"""
from __future__ import annotations

import argparse

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import feature_mse, renoise

DTYPES = {"fp32": tl.float32, "bf16": tl.float32, "fp16": tl.float32, "fp64": tl.float64}  # data -> accumulation


def specs(dt: str):
    """(name, kernel, signature, constexprs) for every kernel at data dtype `dt`."""
    acc = DTYPES[dt]
    acc_s = "fp64" if acc == tl.float64 else "fp32"
    sig = {"PARTIAL": f"*{acc_s}", "META": "*fp64"}
    for j in range(feature_mse.MAX_LAYERS):
        sig.update({f"P{j}": f"*{dt}", f"T{j}": f"*{dt}", f"G{j}": f"*{dt}", f"n{j}": "i64", f"c{j}": "i64"})
        if j:
            sig[f"start{j}"] = "i64"
    const = {"NUM_LAYERS": feature_mse.MAX_LAYERS, "BLOCK": feature_mse.BLOCK, "ACC": acc}
    yield "feature_mse_partials", feature_mse._feature_mse_partials_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const
    const = {"NUM_LAYERS": feature_mse.MAX_LAYERS, "RBLOCK": 128, "ACC": acc}
    sig = {"PARTIAL": f"*{acc_s}", "OUT": f"*{acc_s}", "META": "*fp64"}
    yield "feature_mse_finalize", feature_mse._feature_mse_finalize_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const
    const = {"BLOCK": renoise.BLOCK, "ACC": acc}
    sig = {"XT": f"*{dt}", "P": f"*{dt}", "X0": f"*{dt}", "E": f"*{dt}", "COEF": f"*{acc_s}", "FAKE": f"*{dt}",
           "REAL": f"*{dt}", "batch": "i32", "n": "i32"}
    yield "renoise", renoise._renoise_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const


def compile_all(arch: int = 90) -> list[tuple[str, str, int, int]]:
    """Compile every kernel for sm_`arch`; returns (kernel, dtype, ptx chars, cubin bytes)."""
    target = GPUTarget("cuda", arch, 32)
    out = []
    for dt in DTYPES:
        for name, fn, sig, const in specs(dt):
            k = triton.compile(ASTSource(fn, signature=sig, constexprs=const), target=target)
            out.append((name, dt, len(k.asm["ptx"]), len(k.asm["cubin"])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    for name, dt, ptx, cubin in compile_all(args.arch):
        print(f"{name:22s} {dt:5s} sm_{args.arch}: ptx {ptx} chars, cubin {cubin} bytes")


if __name__ == "__main__":
    main()
