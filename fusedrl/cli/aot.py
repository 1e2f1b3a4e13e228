"""Ahead-of-time GPU build report: compile every Triton kernel for real NVIDIA GPUs on a machine without one.

``triton.compile`` runs the whole pipeline (Triton IR -> PTX -> ptxas cubin) for a ``GPUTarget`` without a driver,
and the ``cuobjdump`` shipped inside the Triton wheel reads each cubin's resource usage. That makes register
pressure, spills and shared memory checkable in CI on CPU, so a kernel change that would spill on an A100 / H100
fails a test instead of a GPU run.

Each kernel is a :class:`KernelSpec`: the kernel, its argument dtypes, the constexprs and ``num_warps`` its host
launcher picks for a representative case (V = 32000, the Llama-2 vocabulary), and what its traffic is counted
per. The traffic MODEL (bytes moved per unit: a token, a pair, a position) is read from the compiled kernel: every
``tt.load`` / ``tt.store`` of its Triton IR, priced by element size and by where it sits (a vector access in the
sweep over the unit dimension moves its elements once per unit, a scalar access outside it once per program), plus
the declared torch passes the launcher runs around the kernel. A second load of the same data shows up as a second
access, so re-reads count. Next to it stands the op's MINIMUM (each input read once, each output written once),
written by hand from the op's inputs and outputs. Both are arithmetic, not measurements.

A new kernel joins the report (and tests/cli/test_aot.py) by appending its spec factory to :data:`SPEC_FACTORIES`.
Run with ``fusedrl aot [--arch 80 90]``, in a process WITHOUT ``TRITON_INTERPRET=1`` (with it ``triton.jit``
returns interpreted functions that cannot be compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget

from fusedrl.cli.traffic import ExtraPass, Geometry, kernel_accesses, modelled_bytes_per_unit

DEFAULT_ARCHS = (80, 90)
REPRESENTATIVE_VOCAB = 32000
# Registers a thread can address on sm_50..sm_120; ptxas fails beyond it, so a report above it is a bug.
MAX_REGISTERS_PER_THREAD = 255
# Registers per SM (and per block) on sm_80/sm_90: a block of ``32 * num_warps`` threads must fit in them.
REGISTERS_PER_SM = 65536


@dataclass(frozen=True)
class KernelSpec:
    name: str  # row label, e.g. "logprobs_fwd[bf16]"
    kernel: Any  # a triton.runtime.jit.JITFunction
    signature: dict[str, str]  # argument -> Triton type ("*bf16", "i32", "fp32") or "constexpr"
    constexprs: dict[str, Any]
    num_warps: int
    # Arguments the JIT would specialise as 16-divisible in the representative case (16-byte aligned pointers,
    # V = 32000 and its row stride), so the AOT build vectorises the same way as the launched one.
    divisible_by_16: tuple[str, ...]
    geometry: Geometry
    minimum_bytes_per_unit: float  # the op's inputs read once and outputs written once
    extra_passes: tuple[ExtraPass, ...] = ()


@dataclass(frozen=True)
class AotRow:
    kernel: str
    arch: int
    num_warps: int
    registers: int  # per thread
    local_bytes: int  # per-thread local memory; register spills land here
    stack_bytes: int  # per-thread stack frame
    shared_static_bytes: int  # cubin static shared memory (cuobjdump SHARED)
    shared_dynamic_bytes: int  # shared memory Triton requests at launch (metadata.shared)
    unit: str  # what the byte counts are per
    modelled_bytes_per_unit: float  # the kernel's loads and stores (from its Triton IR) plus its extra passes
    extra_bytes_per_unit: float  # the part of it outside the kernel
    extra_passes: str  # what that part is ("" when none)
    minimum_bytes_per_unit: float


def logprobs_specs(num_vocab: int = REPRESENTATIVE_VOCAB) -> list[KernelSpec]:
    """The logprobs row kernels, bf16 and fp32 logits, in their heaviest variant (entropy on, both upstream
    gradients present): the one with the most live registers; each also soft-capped (``SOFTCAP``, Gemma 2's
    ``final_logit_softcapping``: a tanh per logit, the same loads and stores). Unit: a token (one row of V
    logits)."""
    from fusedrl.ops.logprobs import triton as triton_rows

    config = triton_rows.launch_config(num_vocab)
    num_blocks = triton.cdiv(num_vocab, config.block_v)  # backward programs per row
    label, row_scalar = 8, 4  # int64 label; fp32 logprob / entropy / lse / upstream gradient
    specs = []
    # fp16 is left out: the same code as bf16 apart from the convert instruction.
    for dtype, size in (("bf16", 2), ("fp32", 4)):
        logits = num_vocab * size
        for capped in (False, True):
            variant = f"{dtype},softcap" if capped else dtype
            specs.append(KernelSpec(
                name=f"logprobs_fwd[{variant}]",
                kernel=triton_rows._logprobs_fwd_kernel,
                signature={
                    "logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "logprobs_ptr": "*fp32", "entropy_ptr": "*fp32",
                    "lse_ptr": "*fp32", "stride_row": "i32", "num_vocab": "i32", "inv_temperature": "fp32",
                    "softcap": "fp32", "ignore_index": "i32", "WITH_ENTROPY": "constexpr", "SOFTCAP": "constexpr",
                    "BLOCK_V": "constexpr",
                },
                constexprs={"WITH_ENTROPY": True, "SOFTCAP": capped, "BLOCK_V": config.block_v},
                num_warps=config.num_warps,
                divisible_by_16=("logits_ptr", "labels_ptr", "logprobs_ptr", "entropy_ptr", "lse_ptr", "stride_row",
                                 "num_vocab"),
                geometry=Geometry("token", elements_per_unit=num_vocab, units_per_program=1, sweep_loops=1),
                # The logits and the label in; logprob, entropy and lse (saved for the backward) out.
                minimum_bytes_per_unit=logits + label + 3 * row_scalar,
            ))
            specs.append(KernelSpec(
                name=f"logprobs_bwd[{variant}]",
                kernel=triton_rows._logprobs_bwd_kernel,
                signature={
                    "logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
                    "grad_logprobs_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "grad_logits_ptr": f"*{dtype}",
                    "stride_row": "i32", "num_vocab": "i32", "inv_temperature": "fp32", "softcap": "fp32",
                    "ignore_index": "i32", "HAS_GRAD_LOGPROBS": "constexpr", "HAS_GRAD_ENTROPY": "constexpr",
                    "SOFTCAP": "constexpr", "BLOCK_V": "constexpr",
                },
                constexprs={"HAS_GRAD_LOGPROBS": True, "HAS_GRAD_ENTROPY": True, "SOFTCAP": capped,
                            "BLOCK_V": config.block_v},
                num_warps=config.num_warps,
                divisible_by_16=("logits_ptr", "labels_ptr", "lse_ptr", "entropy_ptr", "grad_logprobs_ptr",
                                 "grad_entropy_ptr", "grad_logits_ptr", "stride_row", "num_vocab"),
                geometry=Geometry("token", elements_per_unit=num_vocab, units_per_program=1 / num_blocks,
                                  sweep_loops=0),
                # Logits in and their gradient out; label, lse, entropy and the two upstream gradients in once per
                # row.
                minimum_bytes_per_unit=2 * logits + label + 4 * row_scalar,
            ))
            specs.append(KernelSpec(
                name=f"logprobs_stats[{variant}]",
                kernel=triton_rows._logprobs_stats_kernel,
                signature={
                    "logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "lse_ptr": "*fp32", "is_top1_ptr": "*i8",
                    "log_sum_sq_ptr": "*fp32", "stride_row": "i32", "num_vocab": "i32", "inv_temperature": "fp32",
                    "softcap": "fp32", "SOFTCAP": "constexpr", "BLOCK_V": "constexpr",
                },
                constexprs={"SOFTCAP": capped, "BLOCK_V": config.block_v},
                num_warps=config.num_warps,
                divisible_by_16=("logits_ptr", "labels_ptr", "lse_ptr", "is_top1_ptr", "log_sum_sq_ptr",
                                 "stride_row", "num_vocab"),
                geometry=Geometry("token", elements_per_unit=num_vocab, units_per_program=1, sweep_loops=1),
                # The logits, label and lse in; the top-1 flag (int8) and WPO's log sum of squared probabilities out.
                minimum_bytes_per_unit=logits + label + row_scalar + 1 + row_scalar,
            ))
    return specs


REPRESENTATIVE_PAIRS = 8  # preference batches: 1-64 pairs per device; 8 is the benchmark's


def preference_specs(num_pairs: int = REPRESENTATIVE_PAIRS) -> list[KernelSpec]:
    """The per-pair preference-loss kernel: the common case (DPO sigmoid), the heaviest math (discopop through the
    alpha-divergence with WPO weights) and SimPO through AlphaPO (no reference inputs); and KTO's unpaired kernel.
    Unit: a pair (an example for KTO). Minimum: each present fp32 input read once, the outputs written once."""
    from fusedrl.ops.preference import triton as triton_loss

    block, num_warps = triton_loss.launch_config(num_pairs)
    per_lane = Geometry("pair", elements_per_unit=1, units_per_program=block, sweep_loops=0)
    pointers = ("chosen_ptr", "rejected_ptr", "ref_chosen_ptr", "ref_rejected_ptr", "chosen_scale_ptr",
                "rejected_scale_ptr", "pair_weight_ptr", "losses_ptr", "chosen_rewards_ptr", "rejected_rewards_ptr",
                "grad_chosen_ptr", "grad_rejected_ptr")
    scalars = ("beta", "label_smoothing", "discopop_tau", "margin", "score_alpha", "loss_weight")
    signature = {**{name: "*fp32" for name in pointers}, "num_pairs": "i32", **{name: "fp32" for name in scalars},
                 **{name: "constexpr" for name in ("LOSS", "SCORE", "HAS_REF", "HAS_SCALE", "HAS_PAIR_WEIGHT",
                                                   "BLOCK_B")}}
    specs = []
    for label, loss, score, has_ref, has_weight in (
        ("sigmoid", "logistic", "reverse_kl", True, False),
        ("discopop,alpha_divergence,wpo", "discopop", "alpha_divergence", True, True),
        ("simpo,alphapo", "logistic", "alphapo", False, False),
    ):
        specs.append(KernelSpec(
            name=f"preference_fwd[{label}]",
            kernel=triton_loss._preference_fwd_kernel,
            signature=signature,
            constexprs={"LOSS": triton_loss.LOSS_CODES[loss], "SCORE": triton_loss.SCORE_CODES[score],
                        "HAS_REF": has_ref, "HAS_SCALE": False, "HAS_PAIR_WEIGHT": has_weight, "BLOCK_B": block},
            num_warps=num_warps,
            divisible_by_16=pointers,
            geometry=per_lane,
            # Policy log-probs (+ reference, + weight) in; loss, two rewards, two gradients out.
            minimum_bytes_per_unit=4 * (2 + 2 * has_ref + has_weight + 5),
        ))
    num_examples = 2 * num_pairs  # a KTO batch of as many rows as a paired one
    block, num_warps = triton_loss.launch_config(num_examples)
    unpaired = ("logps_ptr", "ref_logps_ptr", "labels_ptr", "kl_ptr", "losses_ptr", "rewards_ptr", "grad_ptr")
    specs.append(KernelSpec(
        name="unpaired_fwd[kto]",
        kernel=triton_loss._unpaired_fwd_kernel,
        signature={**{name: "*fp32" for name in unpaired}, "labels_ptr": "*i1", "num_examples": "i32",
                   "beta": "fp32", "desirable_weight": "fp32", "undesirable_weight": "fp32", "BLOCK_B": "constexpr"},
        constexprs={"BLOCK_B": block},
        num_warps=num_warps,
        divisible_by_16=unpaired,
        geometry=Geometry("example", elements_per_unit=1, units_per_program=block, sweep_loops=0),
        # Log-probs, reference log-probs (4 + 4) and the bool label (1) in; loss, reward, gradient out; the batch KL
        # in once for the batch.
        minimum_bytes_per_unit=4 + 4 + 1 + 3 * 4 + 4 / num_examples,
    ))
    return specs


REPRESENTATIVE_STEPS = 4096  # the GAE benchmark's rows


def gae_specs(num_steps: int = REPRESENTATIVE_STEPS) -> list[KernelSpec]:
    """The GAE kernel (fp32 rewards/values, bool mask). Unit: a position. Minimum: rewards, values and mask read
    once (4 + 4 + 1 bytes), advantages and returns written once (4 + 4)."""
    from fusedrl.ops.gae import triton as triton_gae

    pointers = ("rewards_ptr", "values_ptr", "mask_ptr", "advantages_ptr", "returns_ptr")
    return [KernelSpec(
        name="gae_fwd[fp32]",
        kernel=triton_gae._gae_fwd_kernel,
        signature={"rewards_ptr": "*fp32", "values_ptr": "*fp32", "mask_ptr": "*i1", "advantages_ptr": "*fp32",
                   "returns_ptr": "*fp32", "num_rows": "i32", "num_steps": "i32", "stride_row": "i32",
                   "gamma": "fp32", "discount": "fp32", "BLOCK_B": "constexpr"},
        constexprs={"BLOCK_B": triton_gae.BLOCK_ROWS},
        num_warps=triton_gae.NUM_WARPS,
        # T = 4096: the row stride and step count are 16-divisible.
        divisible_by_16=(*pointers, "num_steps", "stride_row"),
        # Lanes are rows; the loop walks the positions of each.
        geometry=Geometry("position", elements_per_unit=1, units_per_program=triton_gae.BLOCK_ROWS * num_steps,
                          sweep_loops=1),
        minimum_bytes_per_unit=4 + 4 + 1 + 4 + 4,
    )]


REPRESENTATIVE_COMPLETION = 1024  # the GRPO benchmark's completion length

# sequence_log_ratio (ops/policy/compiled.py), eager torch before the launch, per token: mask > 0 (read 4, write a
# bool 1), its row count (1), logps - old (4 + 4 + 4), the masked where (1 + 4 + 4) and the row sum (4); its
# per-row results are left out.
_SEQUENCE_PRE_PASS = ExtraPass(31, "sequence level's torch pre-pass (masked mean log-ratio)")


def policy_specs(num_cols: int = REPRESENTATIVE_COMPLETION) -> list[KernelSpec]:
    """The policy-loss kernel: TRL's default (token level, [B] advantages, no KL, no entropy mask) and the heaviest
    variants of each level (k3 KL, top-entropy mask, [B, T] advantages). Unit: a completion token. Minimum: each
    present fp32 [B, T] input read once and the gradient written once, plus per row (over T) the row scale, a [B]
    advantage and the five per-row results."""
    from fusedrl.ops.policy import triton as triton_loss

    block, num_warps = triton_loss.launch_config(num_cols)
    pointers = ("logps_ptr", "old_ptr", "ratio_ptr", "log_w_ptr", "adv_ptr", "mask_ptr", "row_scale_ptr", "keep_ptr",
                "ref_ptr", "loss_ptr", "grad_ptr", "slope_ptr", "kl_ptr", "low_ptr", "high_ptr")
    signature = {**{name: "*fp32" for name in pointers}, "num_cols": "i32",
                 **{name: "fp32" for name in ("beta", "clip_low", "clip_high", "delta", "p0", "p1", "p2", "p3")},
                 **{name: "constexpr" for name in ("KL", "OBJECTIVE", "DIRECT", "SEQUENCE", "ADV_PER_TOKEN",
                                                   "HAS_KEEP", "HAS_REF", "BLOCK_T")}}
    specs = []
    for label, objective, sequence, full in (("token", "clip", False, False),
                                             ("token,k3,keep,adv_BT", "clip", False, True),
                                             ("sequence,k3,keep,adv_BT", "clip", True, True),
                                             ("token,vespo", "vespo", False, False)):
        # logps, old, mask (+ adv, keep, ref) in, the gradient out; per row: row scale (+ [B] adv) (+ VESPO's
        # log-weight), five results.
        token_bytes = 4 * (3 + 3 * full + 1)
        row_bytes = 4 * (1 + (not full) + (objective == "vespo") + 5)
        specs.append(KernelSpec(
            name=f"policy_fwd[{label}]",
            kernel=triton_loss._policy_fwd_kernel,
            signature=signature,
            constexprs={"KL": triton_loss.KL_CODES["k3"], "OBJECTIVE": triton_loss.OBJECTIVE_CODES[objective],
                        "DIRECT": objective in ("cispo", "vespo"), "SEQUENCE": sequence, "ADV_PER_TOKEN": full,
                        "HAS_KEEP": full, "HAS_REF": full, "BLOCK_T": block},
            num_warps=num_warps,
            divisible_by_16=(*pointers, "num_cols"),
            geometry=Geometry("token", elements_per_unit=1, units_per_program=num_cols, sweep_loops=1),
            minimum_bytes_per_unit=token_bytes + row_bytes / num_cols,
            extra_passes=(_SEQUENCE_PRE_PASS,) if sequence else (),
        ))
    return specs


REPRESENTATIVE_LATENT = 4 * 64 * 64  # elements of a Stable Diffusion latent (512-pixel images)


def ddim_specs(num_cols: int = REPRESENTATIVE_LATENT) -> list[KernelSpec]:
    """The DDIM step kernels: the forward as DDPO samples (bf16 latents, draw, no gradient) and as it trains (fp32,
    score a stored sample, d log_prob / d model_output written), and the backward in its heaviest variant (clipped
    v-prediction, upstream gradients of both outputs, both input gradients: AlignProp's chain). Unit: a latent
    element. Minimum: each [B, N] input read once and output written once, plus per sample its two alphas (and the
    log-prob or its upstream gradient)."""
    from fusedrl.ops.ddim import triton as triton_ddim

    block, num_warps = triton_ddim.launch_config(num_cols)
    num_blocks = triton.cdiv(num_cols, block)
    per_block = Geometry("element", elements_per_unit=1, units_per_program=block, sweep_loops=0)
    # The torch sum of the [B, num_blocks] fp32 partial log-probs: read them, write [B].
    partial_sum = ExtraPass(4 * (num_blocks + 1) / num_cols, "torch sum of the per-block partial log-probs")
    per_sample = (2 * 4 + 4) / num_cols  # two fp32 alphas in, one fp32 log-prob (or its gradient) per sample
    specs = []
    for label, dtype, size, draw in (("bf16,draw", "bf16", 2, True), ("fp32,score,grad", "fp32", 4, False)):
        specs.append(KernelSpec(
            name=f"ddim_fwd[{label}]",
            kernel=triton_ddim._ddim_fwd_kernel,
            signature={"model_ptr": f"*{dtype}", "sample_ptr": f"*{dtype}", "target_ptr": f"*{dtype}",
                       "alphas_ptr": "*fp32", "prev_ptr": f"*{dtype}", "partial_ptr": "*fp32", "grad_ptr": "*fp32",
                       "num_cols": "i32", "num_blocks": "i32", "eta": "fp32", "clip_range": "fp32",
                       "inv_cols": "fp32", **{name: "constexpr" for name in ("PREDICTION", "CLIP", "DRAW",
                                                                             "WRITE_GRAD", "BLOCK_N")}},
            constexprs={"PREDICTION": triton_ddim.PREDICTION_CODES["epsilon"], "CLIP": False, "DRAW": draw,
                        "WRITE_GRAD": not draw, "BLOCK_N": block},
            num_warps=num_warps,
            divisible_by_16=("model_ptr", "sample_ptr", "target_ptr", "alphas_ptr", "prev_ptr", "partial_ptr",
                             "grad_ptr", "num_cols", "num_blocks"),
            geometry=per_block,
            # Model output, sample and noise (or the scored sample) in; the draw (or the fp32 gradient) out.
            minimum_bytes_per_unit=3 * size + (size if draw else 4) + per_sample,
            extra_passes=(partial_sum,),
        ))
    pointers = ("grad_prev_ptr", "grad_lp_ptr", "model_ptr", "sample_ptr", "prev_ptr", "alphas_ptr",
                "grad_model_ptr", "grad_sample_ptr")
    specs.append(KernelSpec(
        name="ddim_bwd[fp32,v,clip]",
        kernel=triton_ddim._ddim_bwd_kernel,
        signature={**{name: "*fp32" for name in pointers}, "num_cols": "i32", "eta": "fp32", "clip_range": "fp32",
                   "inv_cols": "fp32", **{name: "constexpr" for name in ("PREDICTION", "CLIP", "HAS_GRAD_PREV",
                                                                         "SAMPLE_GRAD", "BLOCK_N")}},
        constexprs={"PREDICTION": triton_ddim.PREDICTION_CODES["v_prediction"], "CLIP": True, "HAS_GRAD_PREV": True,
                    "SAMPLE_GRAD": True, "BLOCK_N": block},
        num_warps=num_warps,
        divisible_by_16=(*pointers, "num_cols"),
        geometry=per_block,
        # prev's upstream gradient, model output, sample and prev in; both input gradients out.
        minimum_bytes_per_unit=4 * (4 + 2) + per_sample,
    ))
    return specs


# Joint training of 4 adapters, 2 sequences of 1024 tokens each; Llama-7B's 4096-wide projections; PEFT's r = 16.
REPRESENTATIVE_LORA = {"rows": 8192, "adapters": 4, "features": 4096, "rank": 16}


def _lora_spec(kernel, name: str, pointers: dict[str, str], ints: dict[str, int], blocks: dict[str, Any],
               geometry: Geometry, minimum: float, extra: tuple[ExtraPass, ...] = ()) -> KernelSpec:
    """A multi-LoRA kernel spec with its int arguments specialised as the JIT does: a 1 becomes a constexpr, a
    multiple of 16 is marked divisible (every pointer is 16-byte aligned)."""
    from fusedrl.ops.multi_lora import triton as lora

    types = {**pointers, **{arg: "constexpr" if value == 1 else "i32" for arg, value in ints.items()},
             **dict.fromkeys(blocks, "constexpr")}
    return KernelSpec(
        name=name, kernel=kernel, signature={arg: types[arg] for arg in kernel.arg_names},
        constexprs={**{arg: 1 for arg, value in ints.items() if value == 1}, **blocks}, num_warps=lora.NUM_WARPS,
        divisible_by_16=(*pointers, *(arg for arg, value in ints.items() if value != 1 and value % 16 == 0)),
        geometry=geometry, minimum_bytes_per_unit=minimum, extra_passes=extra,
    )


def multi_lora_specs(shape: dict[str, int] = REPRESENTATIVE_LORA) -> list[KernelSpec]:
    """The segmented multi-LoRA kernels as a training step runs them: shrink (x @ A_k.T forward, dL/dy @ B_k
    backward), expand (into y forward, into dx backward) and the per-adapter reduction (grad_A, grad_B), each
    direction a variant of its own (its unit weight stride is a constexpr), on bf16 activations and adapters
    (autocast); the forward pair and grad_A also in fp32 (IEEE dot: another code path). Rows spread evenly over the
    adapters, I = O = H. Unit: a row of the layer. Minimum: the kernel's [N, H] rows read (and written) once, its
    [N, R] fp32 rows and the int32 row index once, each adapter's weights (or fp32 gradient) once per call. The tiles
    re-read each adapter's weight tile per row tile and the [N, R] rows per feature tile (L2 hits on a GPU, counted
    here). Outside the model: the base matmuls (cuBLAS) and the grouping's torch ops (a stable sort of the [N] ids,
    [K] and [G] tables)."""
    from fusedrl.ops.multi_lora import triton as lora

    num_rows, num_adapters, num_features, rank = (shape[k] for k in ("rows", "adapters", "features", "rank"))
    splits = lora.num_splits(num_rows, num_adapters)
    rows_per_program = num_rows // num_adapters // splits  # a reduction program's share of its adapter's rows
    tables = dict.fromkeys(("order_ptr", "tile_adapter_ptr", "tile_start_ptr", "tile_end_ptr"), "*i32")
    weight_size = rank * num_features
    row_rank = 4 * rank + 4  # a row's fp32 [R] entries and its int32 index in the grouping
    specs = []
    for dtype, size, variants in (("bf16", 2, ("fwd", "bwd")), ("fp32", 4, ("fwd",))):
        config = lora.launch_config(rank, exact=dtype == "fp32")
        blocks = {"BLOCK_M": lora.BLOCK_M, "BLOCK_R": config.block_r, "DOT_PRECISION": config.dot_precision}
        weights_once = num_adapters * weight_size * size / num_rows
        for direction in variants:
            forward = direction == "fwd"
            specs.append(_lora_spec(
                lora._lora_shrink_kernel, f"multi_lora_shrink_{direction}[{dtype}]",
                {"in_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "scaling_ptr": "*fp32", **tables,
                 "out_ptr": "*fp32"},
                {"num_cols": num_features, "rank": rank, "stride_wk": weight_size,
                 "stride_wr": num_features if forward else 1, "stride_wh": 1 if forward else rank},
                {**blocks, "BLOCK_H": config.block_k},
                Geometry("row", 0, units_per_program=lora.BLOCK_M, sweep_loops=0,
                         loop_trips=num_features // config.block_k),
                size * num_features + row_rank + weights_once + 4 * num_adapters / num_rows,
                (ExtraPass(4 * rank, "zero fill of hidden [N, R] fp32 (base-only rows stay 0)"),) if forward else (),
            ))
            specs.append(_lora_spec(
                lora._lora_expand_kernel, f"multi_lora_expand_{direction}[{dtype}]",
                {"in_ptr": "*fp32", "weight_ptr": f"*{dtype}", **tables, "out_ptr": f"*{dtype}"},
                {"num_cols": num_features, "rank": rank, "stride_wk": weight_size,
                 "stride_wh": rank if forward else 1, "stride_wr": 1 if forward else num_features},
                {**blocks, "BLOCK_N": config.block_n},
                Geometry("row", 0, units_per_program=lora.BLOCK_M * config.block_n / num_features, sweep_loops=0,
                         loop_trips=config.block_r // 16),
                2 * size * num_features + row_rank + weights_once,
            ))
        # Per gradient element: the S fp32 partials read and their sum written, then the cast to the adapters'
        # dtype (none for fp32).
        per_element = (4 * (splits + 1) if splits > 1 else 0) + (4 + size if size != 4 else 0)
        summed = ExtraPass(per_element * num_adapters * weight_size / num_rows,
                           f"torch sum of the {splits} split partials and the cast to the adapters' dtype")
        for gradient in ("A", "B") if dtype == "bf16" else ("A",):
            specs.append(_lora_spec(
                lora._lora_grad_kernel, f"multi_lora_grad_{gradient}[{dtype}]",
                {"small_ptr": "*fp32", "big_ptr": f"*{dtype}", "order_ptr": "*i32", "seg_start_ptr": "*i32",
                 "seg_count_ptr": "*i32", "out_ptr": "*fp32"},
                {"num_cols": num_features, "rank": rank, "stride_split": num_adapters * weight_size,
                 "stride_ok": weight_size, "stride_or": num_features if gradient == "A" else 1,
                 "stride_oh": 1 if gradient == "A" else rank},
                {**blocks, "BLOCK_H": config.block_n},
                Geometry("row", 0, units_per_program=rows_per_program * config.block_n / num_features,
                         sweep_loops=0, loop_trips=rows_per_program // lora.BLOCK_M),
                size * num_features + row_rank + 4 * num_adapters * weight_size / num_rows,
                (summed,),
            ))
    return specs


# One factory per kernel file.
SPEC_FACTORIES: list[Callable[[], list[KernelSpec]]] = [logprobs_specs, preference_specs, gae_specs, policy_specs,
                                                        ddim_specs, multi_lora_specs]


def all_specs() -> list[KernelSpec]:
    return [spec for factory in SPEC_FACTORIES for spec in factory()]


def _resource_usage(cubin: bytes, kernel_name: str) -> dict[str, int]:
    """Parse ``cuobjdump --dump-resource-usage``: ``Function <name>:`` then ``REG:59 STACK:0 SHARED:1024 ...``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kernel_name}.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
                             check=True, capture_output=True, text=True).stdout
    match = re.search(rf"Function {re.escape(kernel_name)}:\s*\n(.*)", out)
    if match is None:
        raise RuntimeError(f"no resource usage for {kernel_name} in cuobjdump output:\n{out}")
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", match.group(1))}


def compile_spec(spec: KernelSpec, arch: int) -> AotRow:
    """Compile one spec for ``sm_<arch>`` and read its cubin's resource usage."""
    if not isinstance(spec.kernel, triton.runtime.jit.JITFunction):
        raise TypeError(f"{spec.name} is a {type(spec.kernel).__name__}, not a JITFunction: the AOT build must "
                        "run in a process without TRITON_INTERPRET=1")
    arg_names = spec.kernel.arg_names
    source = triton.compiler.ASTSource(
        fn=spec.kernel,
        signature=spec.signature,
        constexprs=spec.constexprs,
        attrs={(arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible_by_16},
    )
    # enable_fp_fusion=True is Triton 3.9's default for launched kernels; passing it explicitly silences the
    # "default changes in 3.10" warning without changing the code.
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "enable_fp_fusion": True})
    usage = _resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    extra = sum(extra_pass.bytes_per_unit for extra_pass in spec.extra_passes)
    return AotRow(
        kernel=spec.name,
        arch=arch,
        num_warps=spec.num_warps,
        registers=usage["REG"],
        local_bytes=usage["LOCAL"],
        stack_bytes=usage["STACK"],
        shared_static_bytes=usage["SHARED"],
        shared_dynamic_bytes=compiled.metadata.shared,
        unit=spec.geometry.unit,
        modelled_bytes_per_unit=modelled_bytes_per_unit(kernel_accesses(compiled.asm["ttir"]), spec.geometry) + extra,
        extra_bytes_per_unit=extra,
        extra_passes="; ".join(extra_pass.what for extra_pass in spec.extra_passes),
        minimum_bytes_per_unit=spec.minimum_bytes_per_unit,
    )


def compile_report(archs: Sequence[int] = DEFAULT_ARCHS, specs: Sequence[KernelSpec] | None = None) -> list[AotRow]:
    """One :class:`AotRow` per kernel spec and architecture."""
    return [compile_spec(spec, arch) for spec in (all_specs() if specs is None else specs) for arch in archs]


def format_table(rows: Sequence[AotRow]) -> str:
    header = ("kernel", "arch", "warps", "regs", "local B", "stack B", "smem static B", "smem dyn B", "unit",
              "B/unit (model)", "outside kernel", "minimum", "ratio")
    body = [
        (r.kernel, f"sm_{r.arch}", str(r.num_warps), str(r.registers), str(r.local_bytes), str(r.stack_bytes),
         str(r.shared_static_bytes), str(r.shared_dynamic_bytes), r.unit, f"{r.modelled_bytes_per_unit:.2f}",
         f"{r.extra_bytes_per_unit:.2f}", f"{r.minimum_bytes_per_unit:.2f}",
         f"{r.modelled_bytes_per_unit / r.minimum_bytes_per_unit:.4f}")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in (header, *body)]
    lines.insert(1, "-" * len(lines[0]))
    notes = {r.kernel: (r.extra_bytes_per_unit, r.extra_passes) for r in rows if r.extra_passes}
    lines += [f"{kernel}: {extra:.2f} B/unit outside the kernel: {what}" for kernel, (extra, what) in notes.items()]
    lines.append(f"B/unit is a MODEL at V={REPRESENTATIVE_VOCAB} (the loads and stores of the kernel's Triton IR, plus "
                 "the torch passes outside it), not a measurement; minimum: the op's inputs read and outputs "
                 "written once; regs/local/stack/smem static from cuobjdump on the cubin, smem dyn from Triton "
                 f"metadata (triton {triton.__version__}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedrl aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                        help="CUDA compute capabilities to build for (default: 80 90)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    rows = compile_report(args.arch)
    print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
