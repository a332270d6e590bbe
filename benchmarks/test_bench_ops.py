"""pytest-benchmark suite (`make bench`): fused vs reference per op, and the training step per objective.

Timings are reported, never asserted. GB/s of necessary traffic is attached as extra_info.
"""
import pytest
import torch

from cases import DTYPES, FEATURE_CASES, RENOISE_CASES, backends_for, feature_mse_case, renoise_case  # noqa: E402
from step_cases import OBJECTIVES, build, make_step  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = backends_for(DEVICE)


def _record(benchmark, nbytes):
    benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(FEATURE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("consume", [False, True], ids=["keep-targets", "consume-targets"])
def test_feature_mse(benchmark, backend, case, dtype, consume):
    if backend == "reference" and consume:
        pytest.skip("the reference never consumes its targets")
    benchmark.group = f"feature_mse {case} {dtype}"
    fn, nbytes = feature_mse_case(FEATURE_CASES[case], DTYPES[dtype], DEVICE, backend, consume)
    benchmark(fn)
    _record(benchmark, nbytes)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(RENOISE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_renoise(benchmark, backend, case, dtype):
    benchmark.group = f"renoise {case} {dtype}"
    fn, nbytes = renoise_case(RENOISE_CASES[case], DTYPES[dtype], DEVICE, backend)
    benchmark(fn)
    _record(benchmark, nbytes)


@pytest.fixture(scope="module")
def default_unet():
    return build("default", DEVICE, batch=32)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_step(benchmark, default_unet, objective, dtype):
    """Peak memory and host syncs are bench_step.py's; this times the step (compile in the warm-up)."""
    benchmark.group = f"training step (default UNet, batch 32, {dtype})"
    step = make_step(objective, default_unet, torch.bfloat16 if dtype == "bf16" else None)
    benchmark.pedantic(step, rounds=3, warmup_rounds=2 if objective.endswith("-compiled") else 1)
