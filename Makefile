# Two entry points, each sets up .venv on first use: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fusedrl-installed

CONSTRAINTS := constraints.txt

.PHONY: demo test test-latest bench aot gpu-check lint clean trl-suite

# On a machine without an NVIDIA driver, install the pinned CPU torch wheel first: an unpinned `torch`
# (asked for by any dependency) resolves to a multi-GB CUDA build.
# Every dependency is pinned by constraints.txt (the versions the suite last passed with), so a fresh machine and CI
# install the same set; `make test-latest` checks the newest releases instead.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install --quiet torch==2.13.0; fi
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fusedrl demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# The newest releases within pyproject.toml's ranges, in a separate .venv-latest (torch stays the CPU wheel on a
# machine without a driver); a green run here is the cue to refresh constraints.txt.
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then .venv-latest/bin/python -m pip install --quiet torch==2.13.0; fi
	.venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|accelerate|peft|datasets|trl|deepspeed) "
	.venv-latest/bin/python -m pytest -q tests

bench: $(STAMP)
	$(PY) -m fusedrl bench

aot: $(STAMP)
	$(PY) -m fusedrl aot

# On a CUDA machine: tests/gpu with compiled Triton kernels, then the benchmarks, into one results file under
# runs/gpu-check/ (fusedrl/cli/gpu_check.py). Without CUDA it prints one line and exits 0.
gpu-check: $(STAMP)
	$(PY) -m fusedrl gpu-check

# TRL's own trainer test files against trl and fusedrl, offline on stand-in models and data (trl_suite/README.md);
# not part of `make test`. Example: make trl-suite TRL_TESTS=~/trl/tests TRL_FILES=test_rloo_trainer.py TRL_NAME=rloo
TRL_FILES ?= test_rloo_trainer.py
TRL_NAME ?= $(basename $(notdir $(firstword $(TRL_FILES))))
trl-suite: $(STAMP)
	@test -n "$(TRL_TESTS)" || { echo "set TRL_TESTS to a TRL checkout's tests/ folder"; exit 2; }
	$(PY) -m trl_suite.run --trl-tests $(TRL_TESTS) $(foreach f,$(TRL_FILES),--file $(f)) --name $(TRL_NAME) \
		$(if $(TRL_K),-k "$(TRL_K)")

lint: $(STAMP)
	$(VENV)/bin/ruff check fusedrl benchmarks tests

clean:
	rm -rf $(VENV) .venv-latest build *.egg-info
