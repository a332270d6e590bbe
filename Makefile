# Set-up and common tasks. Each target creates .venv when missing and installs everything into it.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
STAMP       := $(VENV)/.fastperc-installed
SOURCES     := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
# A torch already in the base interpreter (e.g. a CUDA build) is reused, never replaced.
SYSTEM_TORCH := $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 && echo --system-site-packages)

.PHONY: install test test-slow test-compat fuzz demo bench info clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(SYSTEM_TORCH) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install "$(TRITON_SPEC)" || echo "triton unavailable: the triton backend stays off"
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/keep-torch.txt
	$(PY) -m pip install -c $(VENV)/keep-torch.txt -r requirements-dev.txt
	$(PY) -m pip install -c $(VENV)/keep-torch.txt --no-build-isolation -e ".[test]"
	@$(PY) -m fastperc.info
	@touch $(STAMP)

# The fast suite: deterministic (a fixed seed, hypothesis derandomised), a few minutes on 2 cores; the
# slowest tests are listed so the suite's budget stays visible.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=15 tests

# The end-to-end runs: real signals to training processes, two-process DDP, the quick demos, the tiny
# study, the gpu_check dry run, the command's entry point.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

# The other end of the supported diffusers range: a second environment with the oldest diffusers the
# adapters support (pyproject's floor; `make install` resolves the newest), running the teacher, adapter
# and flow tests against the package built in place. Run by the slow suite (tests/test_compat.py).
COMPAT_VENV      ?= .venv-compat
CPY              := $(COMPAT_VENV)/bin/python
DIFFUSERS_OLDEST ?= diffusers==0.35.0
COMPAT_TESTS     := tests/test_teacher.py tests/test_diffusers.py tests/test_transformer_teachers.py \
                    tests/test_adapters.py tests/test_flow_matching.py tests/test_schedule.py \
                    tests/test_checkpointed_teacher.py tests/test_drop_in.py
test-compat: $(STAMP)
	@test -x $(CPY) || $(PYTHON) -m venv $(SYSTEM_TORCH) $(COMPAT_VENV)
	@$(CPY) -c "import torch" 2>/dev/null || $(CPY) -m pip install -q -c $(VENV)/keep-torch.txt "$(TORCH_SPEC)"
	$(CPY) -m pip install -q -c $(VENV)/keep-torch.txt numpy "pytest>=8" "pytest-benchmark>=4" "hypothesis>=6.80" "$(DIFFUSERS_OLDEST)"
	@$(CPY) -c "import diffusers, torch; print('compat environment: diffusers', diffusers.__version__, 'torch', torch.__version__)"
	PYTHONPATH=$(CURDIR) $(CPY) -m pytest -q -m "not slow" -p no:cacheprovider $(COMPAT_TESTS)

# The hypothesis parity suite at length, with fresh random examples and a fresh seed (printed in the
# header; FASTPERC_SEED=... replays it): every backend present (reference, cpu, triton under the
# interpreter on CPU) x dtypes, shapes, layouts, weights, reductions, consume on/off, aliased taps.
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	FASTPERC_FUZZ=1 FASTPERC_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_ops_parity.py --hypothesis-show-statistics

demo: $(STAMP)
	$(PY) -m fastperc demo --out runs/demo

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-enable --benchmark-columns=min,median,mean,rounds --benchmark-sort=name

info: $(STAMP)
	$(PY) -m fastperc.info

clean:
	rm -rf build *.egg-info fastperc/*.so .pytest_cache .benchmarks $(COMPAT_VENV)
