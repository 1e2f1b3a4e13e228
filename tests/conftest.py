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
