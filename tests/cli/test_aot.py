"""AOT GPU build of every Triton kernel for sm_80 and sm_90 on this CPU machine: each spec of
``fusedrl.cli.aot`` compiles to a cubin, its default config spills nothing and its registers fit the hardware.

The build runs in a subprocess without ``TRITON_INTERPRET`` (under it ``triton.jit`` returns interpreted functions,
and conftest sets it for the interpreter tests) and with a fresh Triton cache, so ptxas really runs (~10 s).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fusedrl.cli import aot

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def aot_rows(tmp_path_factory: pytest.TempPathFactory) -> list[aot.AotRow]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "fusedrl.cli.aot", "--json", "--arch", *map(str, ARCHS)],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return [aot.AotRow(**row) for row in json.loads(proc.stdout)]


def test_every_kernel_compiles_for_every_arch(aot_rows: list[aot.AotRow]) -> None:
    expected = {(spec.name, arch) for spec in aot.all_specs() for arch in ARCHS}
    assert {(row.kernel, row.arch) for row in aot_rows} == expected


def test_default_configs_do_not_spill(aot_rows: list[aot.AotRow]) -> None:
    spilled = [(r.kernel, r.arch, r.local_bytes, r.stack_bytes) for r in aot_rows if r.local_bytes or r.stack_bytes]
    assert spilled == []


def test_registers_fit_the_hardware(aot_rows: list[aot.AotRow]) -> None:
    for row in aot_rows:
        assert 0 < row.registers <= aot.MAX_REGISTERS_PER_THREAD, row
        assert row.registers * 32 * row.num_warps <= aot.REGISTERS_PER_SM, row


def test_traffic_model_is_near_minimum(aot_rows: list[aot.AotRow]) -> None:
    """A MODEL, not a measurement: at V=32000 each kernel reads every logit once (and the backward writes the
    gradient once); per-row scalars add under 0.2%."""
    for row in aot_rows:
        assert row.minimum_bytes_per_token <= row.modelled_bytes_per_token <= 1.002 * row.minimum_bytes_per_token, row


def test_table_lists_every_row(aot_rows: list[aot.AotRow]) -> None:
    table = aot.format_table(aot_rows)
    for row in aot_rows:
        assert re.search(rf"^{re.escape(row.kernel)} +sm_{row.arch} ", table, re.MULTILINE), row
    assert "MODEL" in table
