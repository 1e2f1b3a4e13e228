"""pytest plugin of the TRL-suite runs (``pytest -p trl_suite.plugin``): stand-in datasets and a per-test time limit.

Loaded before collection, so the test modules' ``from datasets import load_dataset`` already binds the redirected
function: ``trl-internal-testing/zen`` (and ``zen-image`` / ``zen-multi-image``) configs come from ``$TRL_SUITE_DATA`` (``trl_suite.datasets``); models need
nothing here, they resolve through the stand-in hub cache (``HF_HUB_CACHE`` + ``HF_HUB_OFFLINE=1``, set by
``trl_suite.run``). ``--suite-timeout N`` fails a test that runs longer than N seconds (SIGALRM in the main thread;
pytest-timeout is not a dependency of this repo), so one stuck generation cannot stall a whole file.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import datasets
import pytest

from trl_suite.datasets import redirected_load_dataset
from trl_suite.vision import torchvision_shim

torchvision_shim()  # before any test module imports torchvision (trl_suite.vision says why)
_DATA = os.environ.get("TRL_SUITE_DATA")
if _DATA:
    datasets.load_dataset = redirected_load_dataset(datasets.load_dataset, Path(_DATA))


def _availability_shims() -> None:
    """Version skew: TRL's ``tests/testing_utils.py`` imports ``is_<pkg>_available`` helpers from
    ``trl.import_utils``, and a test checkout a little older or newer than the installed trl may name one the
    installed trl lacks (e.g. ``is_joblib_available``, gone from trl 1.16). Each missing one is defined as "the
    package is importable", so collection works; the tests themselves are unchanged."""
    import importlib
    import importlib.util
    import re

    import_utils = importlib.import_module("trl.import_utils")  # trl's lazy top module hides the attribute
    utils = Path("tests/testing_utils.py")
    if not utils.exists():
        return
    for name in re.findall(r"\bis_(\w+?)_available\b", utils.read_text()):
        helper = f"is_{name}_available"
        if not hasattr(import_utils, helper):
            setattr(import_utils, helper, lambda package=name: importlib.util.find_spec(package) is not None)


_availability_shims()


_LIGER_REASON = "test requires liger-kernel"


def pytest_collection_modifyitems(config, items):
    """Liger's kernels are Triton kernels: without a GPU, TRL's ``require_liger_kernel`` tests (skipped by TRL only when
    liger-kernel is not installed) would run them and fail with Triton's "0 active drivers"; worse, Liger patches the
    model classes it touches for the rest of the process, so every later test of those architectures failed too.
    Without CUDA they are skipped, as on a TRL CI runner without liger-kernel."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="liger-kernel needs a GPU (Triton); trl_suite skips it on CPU")
    for item in items:
        if any(mark.name == "skipif" and mark.kwargs.get("reason") == _LIGER_REASON for mark in item.iter_markers()):
            item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption("--suite-timeout", type=float, default=0.0,
                     help="trl_suite: fail a test after this many seconds (0 = no limit)")


class SuiteTimeout(Exception):
    """A test ran past ``--suite-timeout``."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = item.config.getoption("--suite-timeout")
    if not limit:
        yield
        return

    def expire(signum, frame):
        raise SuiteTimeout(f"test exceeded the {limit:.0f} s limit (trl_suite --timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
