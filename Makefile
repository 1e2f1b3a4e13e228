# Two entry points, each sets up .venv on first use: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fusedrl-installed

.PHONY: demo test bench aot lint clean

# On a machine without an NVIDIA driver, install the pinned CPU torch wheel first: an unpinned `torch`
# (asked for by any dependency) resolves to a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install --quiet torch==2.13.0; fi
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fusedrl demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m fusedrl bench

aot: $(STAMP)
	$(PY) -m fusedrl aot

lint: $(STAMP)
	$(VENV)/bin/ruff check fusedrl benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info
