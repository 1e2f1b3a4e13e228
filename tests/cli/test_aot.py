"""AOT GPU build of every Triton kernel for sm_80 and sm_90 on this CPU machine: each spec of
``fusedrl.cli.aot`` compiles to a cubin, its default config spills nothing and its registers fit the hardware, and
its modelled traffic (read from the compiled Triton IR) matches a hand count from the kernel source.

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
from fusedrl.cli.traffic import Geometry, kernel_accesses, modelled_bytes_per_unit

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


# Hand counts from the kernel sources (fusedrl/ops/<op>/triton.py), per unit. V = 32000 (8 tiles of 4096), T = 1024.
_V, _T, _TILES = aot.REPRESENTATIVE_VOCAB, aot.REPRESENTATIVE_COMPLETION, 8
_LATENT = aot.REPRESENTATIVE_LATENT  # 4 x 64 x 64
EXPECTED_MODELLED = {
    # One sweep over the logits, the int64 label, the target logit a second time, three fp32 results. The
    # soft-capped variants (",softcap") add math only: the same loads and stores.
    **{f"logprobs_fwd[{d}]": size * _V + 8 + size + 3 * 4 for d, size in (("bf16", 2), ("bf16,softcap", 2),
                                                                        ("fp32", 4), ("fp32,softcap", 4))},
    # Logits in, gradient out; each of the 8 programs of a row re-reads label, lse, entropy and two gradients.
    **{f"logprobs_bwd[{d}]": 2 * size * _V + _TILES * (8 + 4 * 4) for d, size in (("bf16", 2), ("bf16,softcap", 2),
                                                                                ("fp32", 4), ("fp32,softcap", 4))},
    # One sweep over the logits; label and lse in, the int8 top-1 flag and the fp32 log sum of squares out.
    **{f"logprobs_stats[{d}]": size * _V + 8 + 4 + 1 + 4 for d, size in (("bf16", 2), ("bf16,softcap", 2),
                                                                       ("fp32", 4), ("fp32,softcap", 4))},
    # fp32 per pair: policy (+ reference) (+ weight) log-probs in, five results out.
    "preference_fwd[sigmoid]": 4 * (4 + 5),
    "preference_fwd[discopop,alpha_divergence,wpo]": 4 * (5 + 5),
    "preference_fwd[simpo,alphapo]": 4 * (2 + 5),
    # Two fp32 and a bool in, three fp32 out; the batch KL once for the one program of 16 examples.
    "unpaired_fwd[kto]": 4 + 4 + 1 + 3 * 4 + 4 / 16,
    "gae_fwd[fp32]": 1 + 4 + 4 + 4 + 4,
    # mask, logps, old in and the gradient out per token; row scale, [B] advantage and five results per row.
    "policy_fwd[token]": 4 * 4 + 4 * 7 / _T,
    # + [B, T] advantage, keep and reference; no [B] advantage.
    "policy_fwd[token,k3,keep,adv_BT]": 4 * 7 + 4 * 6 / _T,
    # The kernel skips old (no per-token ratio) and reads the row's ratio; the torch pre-pass adds 31 B per token.
    "policy_fwd[sequence,k3,keep,adv_BT]": 4 * 6 + 4 * 7 / _T + 31,
    # As token, + VESPO's [B] row log-weight (its torch pre-pass over the row's log-ratios is not modelled).
    "policy_fwd[token,vespo]": 4 * 4 + 4 * 8 / _T,
    # Per latent element: model output, sample and noise in, the draw out (bf16); per program of 1024 elements two
    # fp32 alphas in and the block's partial log-prob out; the torch sum reads 16 partials and writes one per sample.
    "ddim_fwd[bf16,draw]": 2 * 4 + 12 / 1024 + 4 * 17 / _LATENT,
    # The scored sample instead of noise, the fp32 gradient instead of the draw.
    "ddim_fwd[fp32,score,grad]": 4 * 4 + 12 / 1024 + 4 * 17 / _LATENT,
    # prev's upstream gradient, model output, sample, prev in, two gradients out; alphas and grad log-prob per program.
    "ddim_bwd[fp32,v,clip]": 4 * 6 + 12 / 1024,
    # Multi-LoRA at N = 8192 rows, K = 4 adapters of 2048 rows, H = 4096 features, R = 16; per tile of 64 rows.
    # Shrink: 4 int32 scalars (tile entry, scaling), the 64 int32 row indices and the [64, 16] fp32 result once; per
    # each of the 64 steps of 64 features the [64, 64] x tile and the adapter's [64, 16] weight tile. The forward's
    # zero fill of hidden adds 64 B per row outside the kernel.
    "multi_lora_shrink_fwd[bf16]": (16 + 256 + 4096 + 64 * (2 * 64 * 64 + 2 * 64 * 16)) / 64 + 4 * 16,
    "multi_lora_shrink_bwd[bf16]": (16 + 256 + 4096 + 64 * (2 * 64 * 64 + 2 * 64 * 16)) / 64,
    "multi_lora_shrink_fwd[fp32]": (16 + 256 + 4096 + 64 * (4 * 64 * 64 + 4 * 64 * 16)) / 64 + 4 * 16,
    # Expand, per program of 64 rows x 128 features (2 rows' worth; 64 in fp32: 1): 3 int32 scalars, the row
    # indices, the [64, 16] fp32 rows, the [16, 128] weight tile, the output tile read and written.
    "multi_lora_expand_fwd[bf16]": (12 + 256 + 4096 + 2 * 16 * 128 + 2 * 2 * 64 * 128) / 2,
    "multi_lora_expand_bwd[bf16]": (12 + 256 + 4096 + 2 * 16 * 128 + 2 * 2 * 64 * 128) / 2,
    "multi_lora_expand_fwd[fp32]": 12 + 256 + 4096 + 4 * 16 * 64 + 2 * 4 * 64 * 64,
    # Reduction, per program of 1024 rows (its adapter's half: 2 splits) x 128 features (32 rows' worth; 64 in fp32:
    # 16): 2 int32 scalars and the [16, 128] fp32 partial once; per each of 16 steps of 64 rows the row indices, the
    # [64, 16] fp32 rows and the [64, 128] tile. Outside: the sum of the 2 fp32 partials (12 B per gradient element)
    # and the bf16 cast (4 + 2), K R H = 262144 elements over 8192 rows.
    "multi_lora_grad_A[bf16]": (8 + 4 * 16 * 128 + 16 * (256 + 4096 + 2 * 64 * 128)) / 32 + 18 * 32,
    "multi_lora_grad_B[bf16]": (8 + 4 * 16 * 128 + 16 * (256 + 4096 + 2 * 64 * 128)) / 32 + 18 * 32,
    "multi_lora_grad_A[fp32]": (8 + 4 * 16 * 64 + 16 * (256 + 4096 + 4 * 64 * 64)) / 16 + 12 * 32,
}


def test_traffic_model_matches_hand_count(aot_rows: list[aot.AotRow]) -> None:
    """The modelled bytes come from the compiled kernels' loads and stores; they equal the counts written above
    from the kernel sources (a new load, store or re-read in a kernel changes them)."""
    assert {spec.name for spec in aot.all_specs()} == set(EXPECTED_MODELLED)
    for row in aot_rows:
        assert row.modelled_bytes_per_unit == pytest.approx(EXPECTED_MODELLED[row.kernel], rel=1e-12), row


def test_traffic_model_is_near_minimum(aot_rows: list[aot.AotRow]) -> None:
    """A MODEL, not a measurement. Nothing moves less than the op's minimum (each input read once, each output
    written once); every kernel itself stays within 0.2% of it (at V=32000 the logits rows re-read a few per-row
    scalars). Only GSPO's torch pre-pass (31 B per token, outside the kernel) takes a path above: 55.03 / 28.02.
    The DDIM forward's torch sum of its per-block partial log-probs adds 0.004 B per latent element.
    The multi-LoRA kernels are tiled matmuls: each tile of 64 rows re-reads its adapter's weight tile and each
    feature tile re-reads the [N, R] fp32 rows (L2 hits on a GPU; the model counts them), 1.24-1.27x the minimum
    (the hand counts above); their rows are checked against that instead of 0.2%."""
    for row in aot_rows:
        assert row.modelled_bytes_per_unit >= row.minimum_bytes_per_unit * (1 - 1e-12), row
        kernel_bytes = row.modelled_bytes_per_unit - row.extra_bytes_per_unit
        tiled = row.kernel.startswith("multi_lora")
        assert kernel_bytes <= (1.27 if tiled else 1.002) * row.minimum_bytes_per_unit, row
        assert bool(row.extra_bytes_per_unit) == row.kernel.startswith(
            ("policy_fwd[sequence", "ddim_fwd", "multi_lora_shrink_fwd", "multi_lora_grad")), row


def test_table_lists_every_row(aot_rows: list[aot.AotRow]) -> None:
    table = aot.format_table(aot_rows)
    for row in aot_rows:
        assert re.search(rf"^{re.escape(row.kernel)} +sm_{row.arch} ", table, re.MULTILINE), row
    assert "MODEL" in table
    assert "policy_fwd[sequence,k3,keep,adv_BT]: 31.00 B/unit outside the kernel" in table


# The Triton IR reader on hand-written IR (no compile): what it counts, and the accesses it refuses to price.
_TTIR = """tt.func public @k(%x: !tt.ptr<bf16> {tt.divisibility = 16 : i32} loc("k{.py":1:0)) attributes {a = 1} {
    %label = tt.load %p : !tt.ptr<i64> loc(#loc1)
    %r:2 = scf.for %i = %c0 to %n step %c4096 iter_args(%a = %z) -> (f32)  : i32 {
      %v = tt.load %q, %m, %o : tensor<4096x!tt.ptr<bf16>> loc(#loc2)
      %s = "tt.reduce"(%v) <{axis = 0 : i32}> ({
      ^bb0(%l: f32, %r: f32):
        tt.reduce.return %l : f32 loc(#loc3)
      }) : (tensor<4096xf32>) -> f32 loc(#loc3)
      scf.yield %s : f32 loc(#loc4)
    } loc(#loc5)
    tt.store %out, %r : !tt.ptr<f32> loc(#loc6)
    tt.store %flags, %b, %m : tensor<32x64x!tt.ptr<i1>> loc(#loc7)
    tt.return loc(#loc8)
  } loc(#loc)
"""


def test_kernel_accesses_reads_types_lanes_and_loops() -> None:
    accesses = [(a.kind, a.element_bytes, a.lanes, a.loops) for a in kernel_accesses(_TTIR)]
    assert accesses == [("load", 8, 1, 0), ("load", 2, 4096, 1), ("store", 4, 1, 0), ("store", 1, 2048, 0)]


def test_modelled_bytes_price_sweeps_and_refuse_unknown_trip_counts() -> None:
    """Label (8) and result (4) once per program of 2 rows, the bf16 sweep (2 B x 1000) once per row: 2006 B per
    row. The bool tile stored outside the loop and a scalar load inside it have no known count: refused."""
    row = Geometry("token", elements_per_unit=1000, units_per_program=2, sweep_loops=1)
    inside = kernel_accesses(_TTIR)[:3]
    assert modelled_bytes_per_unit(inside, row) == 2 * 1000 + (8 + 4) / 2
    with pytest.raises(ValueError, match="vector store in 0 loops, the sweep has 1"):
        modelled_bytes_per_unit(kernel_accesses(_TTIR), row)
    in_loop = kernel_accesses(_TTIR.replace("%label = tt.load %p : !tt.ptr<i64> loc(#loc1)", "").replace(
        "      scf.yield", "      %w = tt.load %p : !tt.ptr<i64> loc(#loc9)\n      scf.yield"))
    with pytest.raises(ValueError, match="scalar load inside a loop"):
        modelled_bytes_per_unit(in_loop, row)


def test_modelled_bytes_price_tiles() -> None:
    """Tile pricing (``loop_trips``, the multi-LoRA kernels): every access moves all its lanes on each execution and
    a loop body runs ``loop_trips`` times. Per program of 2 units: the label (8), the result (4) and the bool tile
    (32 x 64 x 1) once, the bf16 tile (2 x 4096) 3 times: 13318 B per unit."""
    tiles = Geometry("row", 0, units_per_program=2, sweep_loops=0, loop_trips=3)
    assert modelled_bytes_per_unit(kernel_accesses(_TTIR), tiles) == (8 + 4 + 2048 + 3 * 2 * 4096) / 2
