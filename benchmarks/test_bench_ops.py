"""pytest-benchmark suite (`make bench`): fused vs reference per op, and the training step vs plain MSE.

Timings are reported, never asserted. GB/s of necessary traffic is attached as extra_info.
"""
import pytest
import torch

from cases import (DTYPES, FEATURE_CASES, RENOISE_CASES, backends_for, feature_mse_case,  # noqa: E402
                   loss_step_case, renoise_case)

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


@pytest.mark.parametrize("objective", ["mse", "sp-reference", "sp-fused", "sp-untruncated"])
def test_training_step(benchmark, objective):
    benchmark.group = "training step (default UNet, batch 32)"
    benchmark.pedantic(loss_step_case(objective, DEVICE), rounds=3, warmup_rounds=1)
