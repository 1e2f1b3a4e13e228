"""The fused LM head + loss path (``fused=True`` of ``linear_preference_loss``, ``linear_orpo_loss``,
``linear_kto_loss`` and ``linear_policy_loss``) on every backend against the reference (full fp32 logits through the
unfused math): loss, every gradient (hidden, weight, bias) and the metrics from the same tiles; awkward shapes,
padding and fully ignored rows, bf16, a group longer than the tile budget (the recompute path), no-grad and
frozen-head calls, torch.compile capture and opcheck; the unfused path's forward with the metrics of its tiles; a
soft-capped head (``softcap``, Gemma 2's ``final_logit_softcapping``) on each fused op.

Triton runs under TRITON_INTERPRET=1 (conftest), so its shapes are small.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest
import torch

import fusedrl
from fusedrl.ops import logprobs as logprobs_ops
from fusedrl.ops.logprobs import compiled as rows_compiled
from fusedrl.ops.logprobs import fused as fused_module
from fusedrl.ops.logprobs import triton as rows_triton
from fusedrl.ops.logprobs.fused import chunk_groups
from fusedrl.ops.logprobs.reference import linear_token_logprobs_reference, soft_cap, token_statistics_reference
from fusedrl.ops.policy import fused_head as policy_head
from fusedrl.ops.preference import fused_head as pair_head
from tests.utils import assert_close

FAST_BACKENDS = ("compiled", "triton")
# The soft cap of the capped cases, against logits of std ~3 (_head_inputs): far from linear, often saturated.
SOFTCAP = 2.0


@dataclass(frozen=True)
class Shape:
    name: str
    rows: int  # 2B for pairs, B for the policy
    cols: int
    hidden: int
    vocab: int
    bias: bool = True
    dtype: torch.dtype = torch.float32
    ignored_row: bool = False  # one row fully ignored (a chosen row for pairs)

    def __str__(self) -> str:
        return self.name


SHAPES = [
    Shape("realistic", 4, 24, 32, 512, bias=False),
    Shape("awkward", 6, 47, 24, 123),
    Shape("padded-ignored-row", 4, 9, 16, 97, ignored_row=True),
    Shape("bf16", 4, 16, 32, 257, dtype=torch.bfloat16),
]


def _head_inputs(shape: Shape, *, pairs: bool):
    """hidden, weight, bias (or None) in ``shape.dtype``, labels with a prompt, padding and maybe an ignored row."""
    hidden = torch.randn(shape.rows, shape.cols, shape.hidden)
    weight = torch.randn(shape.vocab, shape.hidden) / shape.hidden**0.5 * 3
    bias = torch.randn(shape.vocab) * 0.1 if shape.bias else None
    labels = torch.randint(0, shape.vocab, (shape.rows, shape.cols))
    labels[:, : shape.cols // 3] = -100  # the prompt
    labels[-1, -3:] = -100  # padding
    if shape.ignored_row:
        labels[1 if pairs else 2] = -100
    cast = [t if t is None else t.to(shape.dtype) for t in (hidden, weight, bias)]
    return *cast, labels


def _leaves(tensors):
    return [None if t is None else t.clone().requires_grad_() for t in tensors]


def _grads(leaves):
    return [None if t is None else t.grad for t in leaves]


def _assert_grads(actual, expected, dtype, **tolerance):
    for name, got, want in zip(("hidden", "weight", "bias"), actual, expected):
        if want is not None:
            assert_close(got, want, dtype=dtype, name=f"grad {name}", **tolerance)


# ---------------------------------------------------------------------------------------------------------------
# linear_preference_loss(fused=True)


@dataclass(frozen=True)
class PairCase:
    name: str
    options: dict = field(default_factory=dict)
    reference_model: bool = True

    def __str__(self) -> str:
        return self.name


PAIR_CASES = [
    PairCase("sigmoid", {"loss_type": "sigmoid"}),
    PairCase("mpo-sft", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
    PairCase("wpo-ipo", {"loss_type": ["sigmoid", "ipo"], "use_weighting": True}),
    PairCase("ld-robust", {"loss_type": "robust", "label_smoothing": 0.1, "ld_alpha": 0.5}),
    PairCase("js-hinge", {"loss_type": "hinge", "f_divergence_type": "js_divergence"}),
    PairCase("cpo-simpo-mean", {"family": "cpo", "loss_type": "simpo", "average_log_prob": True,
                                "cpo_alpha": 0.3, "alpha": 0.05}, reference_model=False),
    # The metrics (entropy, top-1) and WPO's log sum p^2 of the capped tiles; the reference's head capped alike.
    PairCase("capped-sigmoid-sft", {"loss_type": ["sigmoid", "sft"], "softcap": SOFTCAP}),
    PairCase("capped-wpo-ipo", {"loss_type": ["sigmoid", "ipo"], "use_weighting": True, "softcap": SOFTCAP}),
]


def _pair_run(backend, fused, shape, case, tensors, labels, ref_hidden, upstream):
    leaves = _leaves(tensors)
    refs = {"ref_hidden": ref_hidden} if case.reference_model else {}
    head = "reference" if backend == "reference" else backend
    with fusedrl.use_kernels(linear_logprobs=head, preference=head):
        out = fusedrl.linear_preference_loss(leaves[0], leaves[1], labels, bias=leaves[2], with_metrics=True,
                                             fused=fused, **refs, **case.options)
    (upstream * out.loss).backward()
    return out, _grads(leaves)


def _pair_params():
    params = []
    for backend in FAST_BACKENDS:
        for shape in SHAPES:
            for case in PAIR_CASES:
                if backend == "triton" and shape.name == "awkward" and case.name not in ("mpo-sft", "capped-wpo-ipo"):
                    continue  # the interpreter is slow; one awkward case is enough there
                if case.options.get("average_log_prob") and shape.ignored_row:
                    continue  # a fully ignored row averages to 0/0 = NaN, as in TRL: nothing to compare
                params.append(pytest.param(backend, shape, case, id=f"{backend}-{shape}-{case}"))
    return params


@pytest.mark.parametrize("backend,shape,case", _pair_params())
def test_pair_losses_match_reference(backend, shape, case):
    """Loss, per-pair outputs, per-token metrics and every gradient against full fp32 logits (bf16: against the
    unfused path of the same backend, whose bf16 tiles are the same; the fp32 reference differs from both by the
    bf16 rounding of the logits, which the policy - reference log-ratios amplify); the incoming gradient is 0.7 (the
    backward scales the gradients formed in the forward)."""
    *tensors, labels = _head_inputs(shape, pairs=True)
    ref_hidden = tensors[0] + 0.05 * torch.randn_like(tensors[0])
    upstream = torch.tensor(0.7)
    expected, expected_grads = _pair_run(_expected_backend(backend, shape), False, shape, case, tensors, labels,
                                         ref_hidden, upstream)
    actual, actual_grads = _pair_run(backend, True, shape, case, tensors, labels, ref_hidden, upstream)
    half = shape.dtype != torch.float32
    for name in ("loss", "losses", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps",
                 "chosen_nll", "token_logps", "entropy"):
        assert_close(getattr(actual, name), getattr(expected, name), dtype=shape.dtype, name=name,
                     **({} if half else {"rtol": 1e-5, "atol": 2e-5}))
    assert torch.equal(actual.is_top1, expected.is_top1)
    _assert_grads(actual_grads, expected_grads, shape.dtype)
    if shape.ignored_row:
        assert actual.chosen_logps[1] == 0 and (actual_grads[0][1] == 0).all()
    assert actual.loss.grad_fn is not None and not actual.losses.requires_grad  # only the loss is differentiable


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_pair_coupled_types_take_the_unfused_path(backend):
    """``aot`` sorts the batch: fused=True runs the unfused math (every output differentiable), same numbers."""
    *tensors, labels = _head_inputs(SHAPES[2], pairs=True)
    ref_hidden = tensors[0] + 0.1
    case = PairCase("aot", {"loss_type": "aot", "label_smoothing": 0.1})
    expected, expected_grads = _pair_run("reference", False, SHAPES[2], case, tensors, labels, ref_hidden,
                                         torch.tensor(1.0))
    actual, actual_grads = _pair_run(backend, True, SHAPES[2], case, tensors, labels, ref_hidden, torch.tensor(1.0))
    assert actual.losses.requires_grad
    assert_close(actual.loss, expected.loss, name="loss")
    _assert_grads(actual_grads, expected_grads, torch.float32)


def _expected_backend(backend, shape):
    """The comparison's backend: the fp32 reference, or for bf16 the unfused path of the same backend (the same
    bf16 tiles; the fp32 reference differs from both by the logits' bf16 rounding)."""
    return "reference" if shape.dtype == torch.float32 else backend


def _orpo_run(backend, fused, tensors, labels, completion, softcap=None):
    leaves = _leaves(tensors)
    with fusedrl.use_kernels(linear_logprobs=backend, preference=backend):
        out = fusedrl.linear_orpo_loss(leaves[0], leaves[1], labels, completion_mask=completion, bias=leaves[2],
                                       beta=0.2, fused=fused, softcap=softcap)
    out.loss.backward()
    return out, _grads(leaves)


@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["plain", "capped"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_orpo_loss_matches_reference(backend, shape, softcap):
    """``linear_orpo_loss``: the NLL over the chosen rows' prompt and completion, the odds ratio on the mean
    completion log-probs; every output and gradient (plain and soft-capped head)."""
    *tensors, completion_labels = _head_inputs(shape, pairs=True)
    completion = completion_labels != -100
    labels = completion_labels.clone()
    num_pairs = shape.rows // 2
    prompt = torch.randint(0, shape.vocab, labels.shape)
    labels[:num_pairs] = torch.where(completion[:num_pairs], labels[:num_pairs], prompt[:num_pairs])
    labels[num_pairs - 1, -3:] = -100  # a padded chosen row
    completion[num_pairs - 1, -3:] = False
    expected, expected_grads = _orpo_run(_expected_backend(backend, shape), False, tensors, labels, completion,
                                         softcap)
    actual, actual_grads = _orpo_run(backend, True, tensors, labels, completion, softcap)
    for name in expected._fields:
        assert_close(getattr(actual, name), getattr(expected, name), dtype=shape.dtype, name=name)
    _assert_grads(actual_grads, expected_grads, shape.dtype)


def _kto_run(backend, fused, tensors, labels, ref_logps, desirable, loss_type, softcap=None):
    leaves = _leaves(tensors)
    with fusedrl.use_kernels(linear_logprobs=backend, preference=backend):
        out = fusedrl.linear_kto_loss(leaves[0], leaves[1], labels, ref_logps=ref_logps, desirable=desirable,
                                      kl=torch.tensor(0.3), bias=leaves[2], loss_type=loss_type, beta=0.2,
                                      desirable_weight=1.5, undesirable_weight=0.7, with_entropy=True, fused=fused,
                                      softcap=softcap)
    out.loss.backward()
    return out, _grads(leaves)


@pytest.mark.parametrize("loss_type,softcap", [("kto", None), ("apo_zero_unpaired", None), ("kto", SOFTCAP)],
                         ids=["kto", "apo_zero_unpaired", "kto-capped"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_kto_loss_matches_reference(backend, shape, loss_type, softcap):
    """``linear_kto_loss``: per-example losses against the clamped KL, nanmean; every output and gradient (plain
    and soft-capped head; the reference log-probs near the policy's own either way)."""
    *tensors, labels = _head_inputs(shape, pairs=False)
    hidden, weight, bias = (None if t is None else t.float() for t in tensors)
    token_logps, _ = linear_token_logprobs_reference(hidden, weight, labels, bias=bias, softcap=softcap)
    ref_logps = token_logps.sum(-1) + torch.randn(shape.rows)
    desirable = torch.arange(shape.rows) % 3 != 1
    expected, expected_grads = _kto_run(_expected_backend(backend, shape), False, tensors, labels, ref_logps,
                                        desirable, loss_type, softcap)
    actual, actual_grads = _kto_run(backend, True, tensors, labels, ref_logps, desirable, loss_type, softcap)
    for name in expected._fields:
        assert_close(getattr(actual, name), getattr(expected, name), dtype=shape.dtype, name=name)
    _assert_grads(actual_grads, expected_grads, shape.dtype)


# ---------------------------------------------------------------------------------------------------------------
# linear_policy_loss(fused=True)


@dataclass(frozen=True)
class PolicyCase:
    name: str
    options: dict = field(default_factory=dict)
    on_policy: bool = False
    summed: bool = False  # RLOO: one log-prob per row

    def __str__(self) -> str:
        return self.name


POLICY_CASES = [
    PolicyCase("grpo-k3", {"loss_type": "grpo", "beta": 0.05}),
    PolicyCase("dapo-normaliser", {"loss_type": "dapo", "num_items_in_batch": 40.0}),
    PolicyCase("bnpo-gspo-delta", {"loss_type": "bnpo", "importance_sampling_level": "sequence", "beta": 0.04,
                                   "epsilon_high": 0.28, "delta": 1.5}),
    PolicyCase("dr_grpo-k1", {"loss_type": "dr_grpo", "kl_estimator": "k1", "beta": 0.1}),
    PolicyCase("on-policy", {"loss_type": "dapo"}, on_policy=True),
    PolicyCase("ratio-kl-token", {"loss_type": "grpo", "beta": 0.1, "ratio_weighted": True}),
    PolicyCase("ratio-kl-sequence-on-policy", {"loss_type": "bnpo", "beta": 0.1, "ratio_weighted": True,
                                               "importance_sampling_level": "sequence"}, on_policy=True),
    PolicyCase("rloo-summed", {"loss_type": "grpo", "epsilon_high": 0.3}, summed=True),
    # The capped head's log-probs, entropies (the bonus's gradient through the cap) and clip counts.
    PolicyCase("capped-grpo-k3-bonus", {"loss_type": "grpo", "beta": 0.05, "entropy_coef": 0.02,
                                        "softcap": SOFTCAP}),
    PolicyCase("capped-rloo-summed", {"loss_type": "grpo", "epsilon_high": 0.3, "softcap": SOFTCAP}, summed=True),
]


def _near_logps(tensors, labels, temperature, softcap=None):
    """Old and reference log-probs within ~0.2 of the policy's own (a few tokens clip at eps 0.2), as in training."""
    hidden, weight, bias = (None if t is None else t.float() for t in tensors)
    logps, _ = linear_token_logprobs_reference(hidden, weight, labels, bias=bias, temperature=temperature,
                                               softcap=softcap)
    return (logps + 0.2 * torch.randn_like(logps) for _ in range(2))


def _policy_run(backend, fused, shape, case, tensors, labels, mask, old, ref, adv, upstream):
    leaves = _leaves(tensors)
    options = dict(case.options)
    if options.get("beta"):
        options["ref_logps_BT"] = ref
    if options.get("loss_type") == "dr_grpo":
        options["max_completion_length"] = shape.cols
    old_logps = None if case.on_policy else ((old * mask).sum(-1, keepdim=True) if case.summed else old)
    with fusedrl.use_kernels(linear_logprobs=backend, policy_loss=backend):
        out = fusedrl.linear_policy_loss(leaves[0], leaves[1], labels.clamp(min=0), mask, old_logps, adv,
                                         bias=leaves[2], temperature=0.7, sum_log_probs=case.summed, fused=fused,
                                         **options)
    (upstream * out.loss).backward()
    return out, _grads(leaves)


def _policy_params():
    params = []
    for backend in FAST_BACKENDS:
        for shape in SHAPES:
            for case in POLICY_CASES:
                if backend == "triton" and shape.name == "awkward" and case.name not in ("bnpo-gspo-delta",
                                                                                          "capped-grpo-k3-bonus"):
                    continue
                params.append(pytest.param(backend, shape, case, id=f"{backend}-{shape}-{case}"))
    return params


@pytest.mark.parametrize("backend,shape,case", _policy_params())
def test_policy_loss_matches_reference(backend, shape, case):
    """Loss, log-probs, entropies, KL and clip metrics and every gradient against full fp32 logits at temperature
    0.7 (bf16: against the unfused path of the same backend); incoming gradient 0.5."""
    *tensors, labels = _head_inputs(shape, pairs=False)
    mask = labels != -100
    old, ref = _near_logps(tensors, labels, 0.7, case.options.get("softcap"))
    adv = torch.randn(shape.rows)
    upstream = torch.tensor(0.5)
    args = (shape, case, tensors, labels, mask, old, ref, adv, upstream)
    expected, expected_grads = _policy_run(_expected_backend(backend, shape), False, *args)
    actual, actual_grads = _policy_run(backend, True, *args)
    half = shape.dtype != torch.float32
    for name in ("loss", "logps", "entropy", "kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region",
                 "mean_entropy"):
        want, got = getattr(expected, name), getattr(actual, name)
        assert (want is None) == (got is None), name
        if want is not None:
            assert_close(got, want, dtype=shape.dtype, name=name, **({} if half else {"rtol": 1e-5, "atol": 2e-5}))
    _assert_grads(actual_grads, expected_grads, shape.dtype)
    assert not actual.logps.requires_grad


def test_policy_top_entropy_takes_the_unfused_path():
    """The top-entropy mask is a quantile over the whole batch: fused=True computes the unfused path (differentiable
    log-probs)."""
    *tensors, labels = _head_inputs(SHAPES[2], pairs=False)
    mask = labels != -100
    with fusedrl.use_kernels(all="compiled"):
        out = fusedrl.linear_policy_loss(*_leaves(tensors[:2]), labels.clamp(min=0), mask, None, torch.randn(4),
                                         top_entropy_quantile=0.5, fused=True)
    assert out.logps.requires_grad


def _bad_calls():
    hidden, weight, labels = torch.randn(4, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (4, 5))
    ref = {"ref_chosen_logps": torch.zeros(2), "ref_rejected_logps": torch.zeros(2)}
    mask, adv = torch.ones(4, 5), torch.randn(4)
    return [
        (lambda: fusedrl.linear_preference_loss(hidden, weight[:, :7], labels, fused=True, **ref),
         r"weight must be \[V, H\]"),
        (lambda: fusedrl.linear_preference_loss(hidden, weight, labels, loss_type="exo_pair", fused=True, **ref),
         "'exo_pair' needs 0 < label_smoothing < 1"),
        (lambda: fusedrl.linear_policy_loss(hidden, weight, labels, mask, None, adv, beta=0.1, fused=True),
         r"beta=0.1 needs ref_logps_BT"),
        (lambda: fusedrl.linear_policy_loss(hidden, weight.half(), labels, mask, None, adv, fused=True),
         "must match hidden"),
        (lambda: fusedrl.linear_kto_loss(hidden, weight, labels, ref_logps=torch.zeros(4), desirable=adv > 0,
                                         kl=None, fused=True), "loss_type='kto' needs kl"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_fused_paths_raise_the_unfused_errors(index):
    """A bad request on the fused path raises the unfused path's ValueError, naming the argument."""
    call, match = _bad_calls()[index]
    with fusedrl.use_kernels(all="compiled"), pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------
# The tile budget, gradient needs, capture


def test_chunk_groups_cut_at_group_boundaries():
    """Groups of 3, 4, 0, 5 and 9 tokens under a budget of 8: [3+4+0], [5], [9 alone: larger than the budget]; a
    trailing group without tokens still gets a chunk (its loss is a term too), and so does a batch without any."""
    assert chunk_groups([3, 7, 7, 12, 21], 8) == [(0, 3, 0, 7), (3, 4, 7, 12), (4, 5, 12, 21)]
    assert chunk_groups([5, 5], 3) == [(0, 1, 0, 5), (1, 2, 5, 5)]
    assert chunk_groups([0], 8) == [(0, 1, 0, 0)]
    assert chunk_groups([], 8) == []


def test_fully_ignored_last_pair_pair_by_pair(monkeypatch):
    """The last pair has no labelled token (both rows ignored) and the batch does not fit the budget, so the pairs
    are chunked one by one: that pair's loss (log-probs 0) is still in the mean, as in the reference."""
    shape = SHAPES[1]
    *tensors, labels = _head_inputs(shape, pairs=True)
    labels[shape.rows // 2 - 1] = -100
    labels[-1] = -100
    ref_hidden = tensors[0] * 0.9
    upstream = torch.tensor(1.0)
    expected, expected_grads = _pair_run("reference", False, shape, PAIR_CASES[0], tensors, labels, ref_hidden,
                                         upstream)
    monkeypatch.setattr(fused_module, "KEEP_BYTES", 1)
    actual, actual_grads = _pair_run("compiled", True, shape, PAIR_CASES[0], tensors, labels, ref_hidden, upstream)
    for name in ("loss", "losses", "chosen_rewards", "rejected_rewards"):
        assert_close(getattr(actual, name), getattr(expected, name), name=name)
    assert actual.losses[-1] != 0
    _assert_grads(actual_grads, expected_grads, torch.float32)


@pytest.mark.parametrize("kind", ["pairs", "policy"])
def test_group_longer_than_budget_recomputes_its_tiles(kind, monkeypatch, caplog):
    """A 1-byte budget keeps no tile: each chunk computes its tile twice (forward, then the backward's recompute),
    logs why once, and gives the reference's loss and gradients."""
    shape = SHAPES[1]
    *tensors, labels = _head_inputs(shape, pairs=kind == "pairs")
    calls = []
    original = fused_module._logits_tile
    monkeypatch.setattr(fused_module, "_logits_tile", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(fused_module, "_logged_recompute", set())
    upstream = torch.tensor(1.0)
    if kind == "pairs":
        case, ref_hidden = PAIR_CASES[0], tensors[0] * 0.9
        expected, expected_grads = _pair_run("reference", False, shape, case, tensors, labels, ref_hidden, upstream)
        calls.clear()
        monkeypatch.setattr(fused_module, "KEEP_BYTES", 1)
        with caplog.at_level(logging.WARNING, logger="fusedrl"):
            actual, actual_grads = _pair_run("compiled", True, shape, case, tensors, labels, ref_hidden, upstream)
        assert len(calls) == 2 * (shape.rows // 2)  # pair by pair once the batch does not fit, each tile twice
    else:
        mask = labels != -100
        args = (shape, POLICY_CASES[0], tensors, labels, mask, *_near_logps(tensors, labels, 0.7),
                torch.randn(shape.rows), upstream)
        expected, expected_grads = _policy_run("reference", False, *args)
        calls.clear()
        monkeypatch.setattr(fused_module, "KEEP_BYTES", 1)
        with caplog.at_level(logging.WARNING, logger="fusedrl"):
            actual, actual_grads = _policy_run("compiled", True, *args)
        assert len(calls) == 2 * shape.rows  # row by row, each tile computed twice
    assert sum("tile budget" in record.message for record in caplog.records) == 1
    assert_close(actual.loss, expected.loss, name="loss")
    _assert_grads(actual_grads, expected_grads, torch.float32)


def test_no_grad_and_frozen_head_skip_their_passes(monkeypatch):
    """Under no_grad only the forward tile is computed (no backward row kernel); with a frozen head the weight
    gradient is not formed, and the hidden gradient is the reference's."""
    shape = SHAPES[2]
    *tensors, labels = _head_inputs(shape, pairs=True)
    bwd_calls = []
    original = rows_compiled.rows_bwd
    monkeypatch.setattr(rows_compiled, "rows_bwd", lambda *a: bwd_calls.append(1) or original(*a))
    ref = {"ref_chosen_logps": torch.zeros(2), "ref_rejected_logps": torch.zeros(2)}
    with torch.no_grad(), fusedrl.use_kernels(all="compiled"):
        out = fusedrl.linear_preference_loss(*_leaves(tensors[:2]), labels, fused=True, **ref)
    assert not bwd_calls and out.loss.grad_fn is None
    hidden = tensors[0].clone().requires_grad_()
    with fusedrl.use_kernels(all="compiled"):
        out = fusedrl.linear_preference_loss(hidden, tensors[1], labels, fused=True, **ref)
    out.loss.backward()
    expected = tensors[0].clone().requires_grad_()
    with fusedrl.use_kernels(all="reference"):
        fusedrl.linear_preference_loss(expected, tensors[1], labels, **ref).loss.backward()
    assert_close(hidden.grad, expected.grad, name="grad hidden")


def test_backward_scales_the_saved_gradients_once():
    """The saved gradients are scaled by the incoming gradient in place (no second [V, H] buffer): a loss scaled by
    0.25 gives 0.25x the unscaled gradients, and a second backward through the same graph raises autograd's in-place
    error rather than scaling them twice."""
    *tensors, labels = _head_inputs(SHAPES[2], pairs=True)
    ref = {"ref_chosen_logps": torch.zeros(2), "ref_rejected_logps": torch.zeros(2)}
    grads = []
    for factor in (1.0, 0.25):
        leaves = _leaves(tensors[:2])
        with fusedrl.use_kernels(all="compiled"):
            out = fusedrl.linear_preference_loss(*leaves, labels, fused=True, **ref)
        (factor * out.loss).backward(retain_graph=True)
        grads.append(_grads(leaves))
    for unscaled, scaled in zip(*grads):
        assert_close(scaled, 0.25 * unscaled, name="scaled gradient")
    with pytest.raises(RuntimeError, match="inplace"):
        out.loss.backward()


def _region(hidden, weight, labels, old, adv, softcap=None):
    pair = fusedrl.linear_preference_loss(hidden, weight, labels, ref_chosen_logps=old[:2, 0],
                                          ref_rejected_logps=old[2:, 0], fused=True, with_metrics=True,
                                          softcap=softcap)
    policy = fusedrl.linear_policy_loss(hidden, weight, labels.clamp(min=0), labels != -100, old, adv, fused=True,
                                        softcap=softcap)
    return pair.loss + policy.loss, pair.entropy, policy.clip_ratio_region


@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["plain", "capped"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fullgraph_capture_matches_eager(backend, softcap):
    """Both fused ops trace into one graph with no break (the soft cap a float argument of the region, as the
    trainers pass it); compiled forward and gradients equal eager."""
    *tensors, labels = _head_inputs(SHAPES[2], pairs=True)
    old, adv = next(_near_logps(tensors, labels, 1.0, softcap)), torch.randn(4)
    compiled_leaves, eager_leaves = _leaves(tensors[:2]), _leaves(tensors[:2])
    torch._dynamo.reset()
    with fusedrl.use_kernels(all=backend):
        explanation = torch._dynamo.explain(_region)(*compiled_leaves, labels, old, adv, softcap)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        loss, entropy, region = torch.compile(_region, fullgraph=True, backend="aot_eager")(*compiled_leaves, labels,
                                                                                           old, adv, softcap)
        loss.backward()
        expected, expected_entropy, expected_region = _region(*eager_leaves, labels, old, adv, softcap)
    expected.backward()
    torch._dynamo.reset()
    assert_close(loss, expected, name="loss")
    assert_close(entropy, expected_entropy, name="entropy")
    assert_close(region, expected_region, name="clip region")
    _assert_grads(_grads(compiled_leaves), _grads(eager_leaves), torch.float32)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck(backend):
    hidden, weight, bias, labels = _head_inputs(SHAPES[2], pairs=True)
    hidden, weight, bias = _leaves((hidden, weight, bias))
    scale = torch.rand(2) + 0.5
    torch.library.opcheck(pair_head.linear_pair_losses_op, (
        hidden, weight, bias, labels, labels > 3, False, 0.5, torch.randn(2), torch.randn(2), scale, scale, None,
        "logistic,square", "reverse_kl,reverse_kl", [0.1, 0.0, 0.05, 0.0, 0.0, 1.0] * 2, [False, True], 0.1, 0.5,
        True, True, 1.0, 0.0, -100, True, True, [True, True, True], "compiled", backend))
    torch.library.opcheck(logprobs_ops._linear_token_logprobs_stats_op, (
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), 1.0, -100, True, 0.0, backend))
    mask = (labels != -100).float()
    torch.library.opcheck(policy_head.linear_policy_rows_op, (
        hidden, weight, bias, labels, torch.randn(4, 9), torch.randn(4), mask, torch.full((4,), 0.05),
        torch.randn(4, 9), 0.04, 0.2, 0.28, float("inf"), True, "k3", True, False, 1.0, 0.0, True, [True, True, True],
        "compiled", "clip", [0.0] * 4, None, 0.1, backend))
    # The soft-capped head through the same ops. opcheck's backward gets the sign of the summed outputs as the
    # loss's gradient, and the backward scales the saved gradients in place (fused.scaled_head_gradients): a negative
    # loss would flip the eager outputs it then compares. Negative advantages keep this policy loss positive.
    torch.library.opcheck(pair_head.linear_pair_losses_op, (
        hidden, weight, bias, labels, None, False, None, torch.randn(2), torch.randn(2), None, None, None,
        "logistic", "reverse_kl", [0.1, 0.0, 0.0, 0.0, 0.0, 1.0], [False], 0.1, 0.5, True, True, 1.0, SOFTCAP, -100,
        True, True, [True, True, True], "compiled", backend))
    old = next(_near_logps((hidden, weight, bias), labels, 0.7, SOFTCAP)).detach()
    torch.library.opcheck(policy_head.linear_policy_rows_op, (
        hidden, weight, bias, labels, old, -0.5 - torch.rand(4), mask, torch.full((4,), 0.05), None, 0.0, 0.2,
        0.2, float("inf"), False, "k3", False, False, 1.0 / 0.7, SOFTCAP, True, [True, True, True], "compiled",
        "clip", [0.0] * 4, torch.tensor(0.01), None, backend))


@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["plain", "capped"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_token_logprobs_with_stats(backend, shape, softcap):
    """``linear_token_logprobs(with_stats=True)`` (the unfused path's forward): the metrics of its own tiles equal
    the full-logits reference's (exactly for the top-1 flags in fp32), and the log-probs and their gradients are the
    plain op's, bitwise; with a soft cap, the metrics of the capped logits."""
    *tensors, labels = _head_inputs(shape, pairs=False)
    results = {}
    for with_stats in (False, True):
        leaves = _leaves(tensors)
        with fusedrl.use_kernels(linear_logprobs=backend):
            out = fusedrl.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], temperature=0.7,
                                                with_entropy=True, with_stats=with_stats, softcap=softcap)
        (out.logprobs.sum() + 0.3 * out.entropy.sum()).backward()
        results[with_stats] = (out, _grads(leaves))
    (plain, plain_grads), (out, grads) = results[False], results[True]
    assert not hasattr(plain, "is_top1") and torch.equal(out.logprobs, plain.logprobs)
    assert torch.equal(out.entropy, plain.entropy)
    for got, want in zip(grads, plain_grads):
        assert want is None or torch.equal(got, want)
    hidden, weight, bias = (None if t is None else t.float() for t in tensors)
    logits = soft_cap(hidden @ weight.T + (0.0 if bias is None else bias), softcap) / 0.7
    expected_top1, expected_log_sum_sq = token_statistics_reference(logits, labels)
    if shape.dtype == torch.float32:  # bf16 logits may move the argmax on near-ties
        assert torch.equal(out.is_top1, expected_top1)
    assert_close(out.log_sum_sq_probs, expected_log_sum_sq, dtype=shape.dtype, name="log sum p^2")


# ---------------------------------------------------------------------------------------------------------------
# The statistics row functions


@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["plain", "capped"])
@pytest.mark.parametrize("module", [rows_compiled, rows_triton], ids=["compiled", "triton"])
def test_row_statistics(module, softcap):
    """Top-1 (the first of tied maxima, as torch.argmax) and log sum p^2 on extreme rows: ties at 1e4, -inf
    entries, a row whose label is the argmax; temperature 0.5. Capped, every logit past ~9c saturates to c in fp32,
    which makes more ties: the top-1 is still the first of them, as torch.argmax of the capped row."""
    vocab = 1237
    logits = torch.randn(6, vocab) * 3
    logits[0, : vocab // 2] = 1e4
    logits[1, 2] = float("-inf")
    labels = torch.randint(0, vocab, (6,))
    labels[0] = 0
    scaled = soft_cap(logits, softcap) / 0.5
    labels[2] = scaled[2].argmax()
    is_top1, log_sum_sq = module.rows_stats(logits, labels, torch.logsumexp(scaled, -1), 2.0, softcap or 0.0)
    assert torch.equal(is_top1, scaled.argmax(-1) == labels) and is_top1[0] and is_top1[2]
    # Row 0's lse is ~2e4, where one fp32 ulp is 2e-3: the difference of two such terms is only that exact.
    assert_close(log_sum_sq, torch.logsumexp(2 * torch.log_softmax(scaled, -1), -1), name="log sum p^2",
                 rtol=1e-5, atol=4e-3)
