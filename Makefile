# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench bench-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m merging.demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/merge_speed.py
	$(PY) benchmarks/mloss_overhead.py
	$(PY) benchmarks/mties_speed.py

# FusionBench side by side: its own venv (full dependency set, torch pinned by constraints.txt).
PEERS       := .venv-peers
PEERS_PY    := $(PEERS)/bin/python
PEERS_STAMP := $(PEERS)/.installed
FUSION_BENCH := fusion-bench==0.2.33

bench-peers: setup $(PEERS_STAMP)
	$(PY) benchmarks/peers.py

$(PEERS_STAMP): constraints.txt
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS)
	$(PEERS_PY) -m pip install --quiet --upgrade pip
	$(PEERS_PY) -m pip install --quiet -c constraints.txt torch torchvision $(FUSION_BENCH)
	touch $(PEERS_STAMP)

clean:
	rm -rf $(VENV) $(PEERS) runs lightning_logs .pytest_cache
