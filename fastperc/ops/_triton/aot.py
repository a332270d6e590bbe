"""Ahead-of-time compile of every Triton kernel for a GPU target, without a GPU.

    python -m fastperc.ops._triton.aot [--arch 90]

Proves each kernel lowers to PTX and a cubin for each dtype (run with TRITON_INTERPRET unset), in the
two specialisations the JIT makes most: "aligned" (every pointer 16-byte aligned and every element
count a multiple of 16, as for ordinary feature maps) and "unaligned" (no such facts). Integers are
32-bit, as the JIT passes any value below 2^31: offsets must still be computed in 64 bits.
"""
from __future__ import annotations

import argparse

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import feature_mse, renoise
from ...errors import InputError

DTYPES = {"fp32": tl.float32, "bf16": tl.float32, "fp16": tl.float32, "fp64": tl.float64}  # data -> accumulation
VARIANTS = ("aligned", "unaligned")
# Arguments the JIT marks divisible by 16 in the "aligned" case: pointers, and element counts.
_ALIGNED_INTS = {"n", "total_cpr"} | {f"n{j}" for j in range(feature_mse.MAX_LAYERS)}


def specs(dt: str):
    """(name, kernel, signature, constexprs) for every kernel at data dtype `dt`."""
    acc = DTYPES[dt]
    acc_s = "fp64" if acc == tl.float64 else "fp32"
    sig = {"PARTIAL": f"*{acc_s}", "total_cpr": "i32"}
    for j in range(feature_mse.MAX_LAYERS):
        sig.update({f"P{j}": f"*{dt}", f"T{j}": f"*{dt}", f"G{j}": f"*{dt}", f"n{j}": "i32", f"c{j}": "i32",
                    f"st{j}": "i32", f"co{j}": "i32", f"sh{j}": "fp32", f"sl{j}": "fp32"})
    const = {"NUM_LAYERS": feature_mse.MAX_LAYERS, "BLOCK": feature_mse.BLOCK, "ACC": acc}
    yield "feature_mse_partials", feature_mse._feature_mse_partials_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const
    const = {"RBLOCK": feature_mse.RBLOCK, "ACC": acc}
    sig = {"PARTIAL": f"*{acc_s}", "OUT": f"*{acc_s}", "total_cpr": "i32"}
    yield "feature_mse_finalize", feature_mse._feature_mse_finalize_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const
    const = {"NUM_LAYERS": feature_mse.MAX_LAYERS, "BLOCK": feature_mse.BLOCK, "ACC": acc}
    sig = {"SCALE": f"*{acc_s}"}
    for j in range(feature_mse.MAX_LAYERS):
        sig.update({f"G{j}": f"*{dt}", f"O{j}": f"*{dt}", f"n{j}": "i32", f"c{j}": "i32", f"st{j}": "i32"})
    yield "scale_rows", feature_mse._scale_rows_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const
    const = {"BLOCK": renoise.BLOCK, "ACC": acc}
    sig = {"XT": f"*{dt}", "P": f"*{dt}", "X0": f"*{dt}", "E": f"*{dt}", "COEF": f"*{acc_s}", "FAKE": f"*{dt}",
           "REAL": f"*{dt}", "batch": "i32", "n": "i32"}
    yield "renoise", renoise._renoise_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const


def attrs_for(fn, sig: dict, variant: str) -> dict:
    if variant == "unaligned":
        return {}
    names = [k for k, v in sig.items() if v != "constexpr" and (v.startswith("*") or k in _ALIGNED_INTS)]
    return {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in names}


def compile_kernel(name: str, dt: str, variant: str = "aligned", arch: int = 90):
    """The compiled kernel (with .asm["ttir"], ["ptx"], ["cubin"]) for one spec."""
    for n, fn, sig, const in specs(dt):
        if n == name:
            src = ASTSource(fn, signature=sig, constexprs=const, attrs=attrs_for(fn, sig, variant))
            return triton.compile(src, target=GPUTarget("cuda", arch, 32))
    raise InputError(f"name: expected one of the kernels in specs(), got {name!r}")


def compile_all(arch: int = 90) -> list[tuple[str, str, str, int, int]]:
    """Compile every kernel for sm_`arch`; returns (kernel, dtype, variant, ptx chars, cubin bytes)."""
    out = []
    for dt in DTYPES:
        for name, _, _, _ in specs(dt):
            for variant in VARIANTS:
                k = compile_kernel(name, dt, variant, arch)
                out.append((name, dt, variant, len(k.asm["ptx"]), len(k.asm["cubin"])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    for name, dt, variant, ptx, cubin in compile_all(args.arch):
        print(f"{name:22s} {dt:5s} {variant:9s} sm_{args.arch}: ptx {ptx} chars, cubin {cubin} bytes")


if __name__ == "__main__":
    main()
