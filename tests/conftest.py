"""Test-session setup: Triton kernels run under the interpreter on CPU tensors.

triton.jit reads TRITON_INTERPRET when a kernel module is imported, so it is set here, before any test imports
fusedrl's Triton code. Tests that need real (non-interpreted) Triton, like the AOT build, run in a subprocess
without it.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the duration of a test. The diffusion tests run ~100 small UNet calls; on the shared
    2-core machine under load (load average 5.6), one 16-row forward took 3.45 s with 2 threads (OpenMP workers
    waiting on a descheduled peer at every op) and 0.08 s with 1."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
