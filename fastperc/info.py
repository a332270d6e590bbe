"""`python -m fastperc.info`: versions, what fastperc._C holds, and what backend="auto" picks per device."""
from __future__ import annotations

import importlib.util

import torch

from .ops import _backend, _ext


def report() -> str:
    lines = [f"fastperc {__import__('fastperc').__version__}", f"torch    {torch.__version__} (cuda {torch.version.cuda})"]
    if importlib.util.find_spec("triton") is not None:
        import triton
        lines.append(f"triton   {triton.__version__}")
    else:
        lines.append("triton   not installed")
    if _ext.ext is not None:
        lines.append(f"_C       built: {_ext.ext.build_info()} ({_ext.ext.__file__})")
    else:
        lines.append(f"_C       not built ({_ext.load_error})")
    lines.append(f"TRITON_INTERPRET={'1' if _backend.TRITON_INTERPRETING else '0'}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in ("cpu", "cuda"):
        avail = [b for b in _backend.BACKENDS[1:] if _backend.why_unavailable(b, dev) is None]
        pick = _backend.auto_choice(dev) if dev in devices else "(no device)"
        lines.append(f"{dev:5s}    auto -> {pick:10s} available: {', '.join(avail)}")
    if torch.cuda.is_available():
        lines.append(f"device   {torch.cuda.get_device_name()}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
