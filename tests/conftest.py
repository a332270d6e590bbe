"""Shared fixtures and the two layers of the suite.

`make test` runs the fast suite (`-m "not slow"`): deterministic, so a failure comes back on the next run;
torch's generator is seeded with FASTPERC_SEED (default 0) before every test, and hypothesis draws the
same examples every run. `make fuzz` sets FASTPERC_FUZZ=1: a fresh seed (printed, replay it with
FASTPERC_SEED=...) and hypothesis random, with FASTPERC_FUZZ_EXAMPLES examples per test. `make test-slow`
runs the end-to-end tests (`@pytest.mark.slow`: subprocesses, several processes, demos, studies).

Without a GPU, Triton kernels run under the interpreter (set before any import)."""
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
from hypothesis import HealthCheck, settings  # noqa: E402

FUZZ = os.environ.get("FASTPERC_FUZZ", "") == "1"
SEED = int(os.environ.get("FASTPERC_SEED", secrets.randbelow(2**31) if FUZZ else 0))

_HYPOTHESIS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fast", derandomize=True, database=None, max_examples=25, **_HYPOTHESIS)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FASTPERC_FUZZ_EXAMPLES", "1000")), **_HYPOTHESIS)
settings.load_profile("fuzz" if FUZZ else "fast")


def pytest_report_header(config):
    mode = "fuzz: random hypothesis examples" if FUZZ else "deterministic"
    return f"fastperc test seed: FASTPERC_SEED={SEED} ({mode})"


@pytest.fixture
def gen():
    """A torch.Generator seeded from this run's seed (the same data every run unless fuzzing)."""
    return torch.Generator().manual_seed(SEED)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(SEED)
    yield


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="session")
def mse_run(tmp_path_factory):
    """A conditional tiny UNet trained 40 steps with MSE: the init, teacher and sampling source of many tests."""
    from fastperc.recipes.config import TrainConfig
    from fastperc.recipes.train import train

    from .helpers import TINY
    out = tmp_path_factory.mktemp("mse")
    train(TrainConfig(out=str(out), conditional=True, max_steps=40, save_every=40, **TINY))
    return out


@pytest.fixture(scope="session")
def one_epoch_classifier(tmp_path_factory):
    """The metrics' classifier after one epoch: {"accuracy", "checkpoint"} (classifier/classifier.pt)."""
    from fastperc.recipes import metrics
    return metrics.train_classifier(str(tmp_path_factory.mktemp("run") / "classifier"), epochs=1, progress=False)


def pytest_terminal_summary(terminalreporter):
    if FUZZ:  # -q hides the header: say the seed again where it is read
        terminalreporter.write_line(f"fastperc fuzz seed: FASTPERC_SEED={SEED} replays the torch draws (a failing "
                                    "hypothesis example is printed by hypothesis itself)")


@pytest.fixture
def one_process_group():
    """A gloo process group of one process (FSDP2 and the teacher's shard() need one), torn down after."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
