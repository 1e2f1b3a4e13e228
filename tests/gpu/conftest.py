"""The CUDA-only tests: every test here is marked ``cuda`` and skips, with the reason, where no CUDA device exists.
``fusedrl gpu-check`` (``make gpu-check``) runs this folder on its own; ``make test`` collects it like any folder.

Triton mode. tests/conftest.py sets ``TRITON_INTERPRET=1`` for the CPU suite, and ``triton.jit`` reads it when a
kernel module is imported (fusedrl imports its Triton modules on first use, never at ``import fusedrl``), so every
kernel built in a process is either interpreted or compiled, for the whole process. Here the real compiler must
build them. :func:`pytest_configure` removes the variable when a CUDA device is present and the session collects
nothing outside this folder (``fusedrl gpu-check``, ``pytest tests/gpu``): it runs when this file is registered,
after tests/conftest.py and before any module of this folder is imported, and with nothing else collected no
Triton kernel can have been built under the interpreter by then. In a mixed session (``pytest tests`` on a GPU
machine) the CPU suite needs the interpreter, so it stays on: the tests that need compiled Triton kernels (fusedrl's,
and Inductor's, which generates Triton code for the compiled path on CUDA) skip and say why; the offloading tests
run on the GPU all the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
NO_CUDA = ("needs a CUDA device (torch.cuda.is_available() is False here); `make gpu-check` runs it on a GPU "
           "machine")
INTERPRETED = ("needs compiled Triton kernels (fusedrl's, and Inductor's GPU code for the compiled path), but this "
               "session runs Triton under the interpreter "
               "(TRITON_INTERPRET=1, set by tests/conftest.py for the CPU suite collected alongside): run "
               "`pytest tests/gpu` on its own or `make gpu-check`")


def _only_this_folder(config: pytest.Config) -> bool:
    """Whether every path the session was asked to collect lies inside tests/gpu."""
    base = Path(config.invocation_params.dir)
    paths = [(base / arg.split("::")[0]).resolve() for arg in config.args]  # an absolute arg stays as it is
    return bool(paths) and all(path == HERE or HERE in path.parents for path in paths)


def pytest_configure(config: pytest.Config) -> None:
    if CUDA and _only_this_folder(config):
        os.environ.pop("TRITON_INTERPRET", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CUDA:
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def require_compiled_triton() -> None:
    """Skip unless Triton kernels built in this process are compiled for the GPU (not interpreted)."""
    from fusedrl.ops import dispatch

    if not dispatch.triton_importable():
        pytest.skip("triton is not installed (pip install triton)")
    if dispatch.triton_interpreting():
        pytest.skip(INTERPRETED)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")


@pytest.fixture(params=["compiled", "triton"])
def backend(request) -> str:
    """The two fast backends of every op. Both need compiled Triton: on CUDA, Inductor generates Triton kernels for
    the compiled path."""
    require_compiled_triton()
    return request.param


@pytest.fixture
def compiled_triton() -> None:
    require_compiled_triton()


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """fp32 means fp32: TF32 matmuls (10-bit mantissa) would put the fp32 paths ~1e-3 away from the fp32 reference,
    beyond the fp32 tolerances; a user's setting (``set_float32_matmul_precision("high")``) is restored after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.fixture
def needs_dtype():
    """``needs_dtype(dtype)`` skips a case whose dtype this GPU has no native support for (bf16 before sm_80)."""
    def check(dtype: torch.dtype) -> None:
        if dtype == torch.bfloat16 and CUDA and not torch.cuda.is_bf16_supported(including_emulation=False):
            pytest.skip(f"{torch.cuda.get_device_name()} has no native bf16 (needs sm_80 or newer)")

    return check
