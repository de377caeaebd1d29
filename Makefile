# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Another Python: `make test PYTHON=python3.13` (its own venv, .venv-3.13).
PYTHON ?= python3
# The interpreter's path. pyenv's shim for pythonX.Y runs only while that version is
# selected: then the newest installed X.Y is asked for by name.
PYTHON_EXE := $(shell $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null || { \
	v=$$(pyenv versions --bare 2>/dev/null | grep -E '^$(subst .,\.,$(patsubst python%,%,$(PYTHON)))(\.[0-9]+)?$$' | sort -V | tail -n 1); \
	test -n "$$v" && PYENV_VERSION=$$v pyenv which $(PYTHON); })
ifeq ($(PYTHON_EXE),)
$(error $(PYTHON) not found (nor a pyenv version for it))
endif
PY_VERSION := $(shell $(PYTHON_EXE) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# One venv per Python, inside the clone: .venv for the default, .venv-X.Y for another.
ifeq ($(PYTHON),python3)
VENV ?= .venv
else
VENV ?= .venv-$(PY_VERSION)
endif
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# pytest-xdist workers: `make test XDIST=` runs in one process.
XDIST  ?= -n auto

.PHONY: setup demo claims test test-fast test-gpu bench bench-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON_EXE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m merging.experiments.demo

# The pre-registered claims benchmark (benchmarks/claims.yaml) on Fashion-MNIST (Debian's
# dataset-fashion-mnist). Default: the confirmation seeds -> results/claims.{json,md,png}.
# A short run: `make claims SEEDS="100 101"` (writes runs/claims/). JOBS: seeds in parallel.
SEEDS ?=
JOBS  ?= 2
claims: setup
	$(PY) -m merging.experiments.claims.run --jobs $(JOBS) $(if $(SEEDS),--seeds $(SEEDS))

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(XDIST)

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow"

# The CUDA tests (marked `cuda`): CPU against GPU for every merge method, the callbacks in
# fp32 and bf16-mixed, MergedModule on the GPU. Skipped, with the reason, without a GPU.
test-gpu: setup
	$(PY) -m pytest -q -m cuda -rs

# Every benchmark on the CPU (and the GPU where CUDA is found; FusionBench side by side where
# .venv-peers exists), then one table of the goals: benchmarks/results/goals.md.
bench: setup
	$(PY) benchmarks/bench.py

# FusionBench side by side: its own venv (full dependency set, torch pinned by constraints.txt).
PEERS       := .venv-peers
PEERS_PY    := $(PEERS)/bin/python
PEERS_STAMP := $(PEERS)/.installed
FUSION_BENCH := fusion-bench==0.2.33

# Cold (first merge in a new process, import included) and warm, ours and FusionBench's.
bench-peers: setup $(PEERS_STAMP)
	$(PY) benchmarks/peers.py

$(PEERS_STAMP): constraints.txt
	test -x $(PEERS_PY) || $(PYTHON_EXE) -m venv $(PEERS)
	$(PEERS_PY) -m pip install --quiet --upgrade pip
	$(PEERS_PY) -m pip install --quiet -c constraints.txt torch torchvision $(FUSION_BENCH)
	touch $(PEERS_STAMP)

clean:
	rm -rf $(VENV) $(PEERS) runs lightning_logs .pytest_cache
