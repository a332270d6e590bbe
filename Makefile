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

.PHONY: install test test-slow fuzz demo bench info clean

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

# The fast suite: deterministic (a fixed seed, hypothesis derandomised), a few minutes on 2 cores.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# The end-to-end runs: real signals to training processes, two-process DDP, the quick demos, the tiny
# study, the gpu_check dry run, the command's entry point.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

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
	rm -rf build *.egg-info fastperc/*.so .pytest_cache .benchmarks
