"""Shared fixtures. Without a GPU, Triton kernels run under the interpreter (set before any import)."""
import os
import secrets

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Compile caches inside the checkout: a cache shared across checkouts can hold graphs traced against
# an older custom-op schema, which torch's cache keys do not cover.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), ".cache", "torchinductor"))

import pytest  # noqa: E402

# Fresh random inputs every run; the seed is printed so a failure can be replayed (FASTPERC_SEED=...).
SEED = int(os.environ.get("FASTPERC_SEED", secrets.randbelow(2**31)))


def pytest_report_header(config):
    return f"fastperc test seed: FASTPERC_SEED={SEED}"


@pytest.fixture
def gen():
    """A torch.Generator seeded from this run's seed (fresh data each run, replayable)."""
    return torch.Generator().manual_seed(SEED)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(SEED)
    yield


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
