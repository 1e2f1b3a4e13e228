"""Every backend of the `preference` op (`preference_loss`, `orpo_loss`, `kto_loss`, `kto_kl`) and of
`linear_preference_loss` against the references: values and every gradient.

The references are ``reference.dpo_losses`` / ``cpo_losses`` / ``orpo_loss`` / ``kto_losses`` (verified against TRL
1.16 in ``test_preference_formulas.py``) and, for the linear op, full fp32 logits + ``sequence_logps`` + those
losses. Triton runs under TRITON_INTERPRET=1 (conftest); the shapes here are small for both backends.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import fusedrl
from fusedrl.ops import dispatch
from fusedrl.ops import preference as ops
from fusedrl.ops.logprobs.reference import linear_token_logprobs_reference
from fusedrl.ops.preference import fused
from fusedrl.ops.preference.reference import sequence_logps, token_mean_nll
from tests.utils import assert_close

FAST_BACKENDS = ("compiled", "triton")
DPO_PAIR_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "nca_pair", "bco_pair", "sppo_hard",
                  "apo_zero", "apo_down", "sigmoid_norm")
CPO_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
COUPLED = (["aot"], ["aot_unpaired"], ["sft"], ["sigmoid", "bco_pair", "sft"])


def _options(family: str, loss_type, **extra) -> dict:
    """Options every loss type accepts; label smoothing where the type reads it (exo_pair needs 0 < eps < 1)."""
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    opts = {"family": family, "loss_type": loss_type, "beta": 0.1}
    if family == "cpo" or {"exo_pair", "robust", "aot", "aot_unpaired"} & set(types):
        opts["label_smoothing"] = 0.1
    if family == "cpo":
        opts.update(cpo_alpha=0.0, alpha=0.05 if loss_type == "simpo" else 0.0)
    return {**opts, **extra}


def _inputs(num_pairs: int, *, scale: float = 20.0, dtype=torch.float32):
    """Policy and reference sequence log-probs around -50 (a few dozen completion tokens) and completion lengths."""
    logps = [(torch.randn(num_pairs) * scale - 50).to(dtype) for _ in range(4)]
    lengths = [torch.randint(1, 40, (num_pairs,)) for _ in range(2)]
    return logps, lengths


def _run(backend, logps, lengths, opts, *, nll=None, upstream=None):
    """Loss, per-pair outputs and the gradients of the four log-probs (and of chosen_nll) under ``backend``."""
    leaves = [t.clone().requires_grad_() for t in logps]
    nll = None if nll is None else nll.clone().requires_grad_()
    refs = leaves[2:] if opts["family"] == "dpo" else [None, None]
    with fusedrl.use_kernels(preference=backend):
        out = fusedrl.preference_loss(leaves[0], leaves[1], *refs, chosen_lengths=lengths[0],
                                      rejected_lengths=lengths[1], chosen_nll=nll, **opts)
    weights = torch.linspace(-1.0, 2.0, out.losses.shape[0]) if upstream is None else upstream
    (out.loss + (out.losses * weights).sum()).backward()
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
    return out, grads, None if nll is None else nll.grad


def _compare(backend, logps, lengths, opts, *, nll=None, dtype=torch.float32):
    out, grads, nll_grad = _run(backend, logps, lengths, opts, nll=nll)
    ref, ref_grads, ref_nll_grad = _run("reference", logps, lengths, opts, nll=nll)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    for name in ("loss", "losses", "chosen_rewards", "rejected_rewards"):
        assert getattr(out, name).dtype == torch.float32
        assert_close(getattr(out, name), getattr(ref, name), name=name)
    for name, grad, ref_grad in zip(("chosen", "rejected", "ref_chosen", "ref_rejected"), grads, ref_grads):
        assert grad.dtype == dtype
        assert_close(grad, ref_grad, dtype=dtype, name=f"grad {name}")
    assert (nll_grad is None) == (ref_nll_grad is None)
    if nll_grad is not None:
        assert_close(nll_grad, ref_nll_grad, name="grad chosen_nll")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("family,loss_type", [("dpo", t) for t in DPO_PAIR_TYPES] + [("cpo", t) for t in CPO_TYPES],
                         ids=lambda v: v)
def test_pair_losses_match_reference(backend, family, loss_type):
    logps, lengths = _inputs(5)  # awkward B
    _compare(backend, logps, lengths, _options(family, loss_type))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("loss_type,f_divergence_type,coef", [
    ("sigmoid", "forward_kl", 0.5), ("sigmoid", "js_divergence", 0.5), ("robust", "alpha_divergence", 0.5),
    ("sigmoid", "alpha_divergence", 1.0 + 1e-7), ("discopop", "js_divergence", 0.5), ("ipo", "js_divergence", 0.5),
], ids=str)
def test_f_divergences(backend, loss_type, f_divergence_type, coef):
    # Log-ratios of order 1: forward_kl's exp(-x) overflows for log-ratios below -88, in every backend alike.
    logps, lengths = _inputs(6, scale=1.0)
    opts = _options("dpo", loss_type, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef)
    _compare(backend, logps, lengths, opts)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_weights_reference_free_and_bf16(backend):
    """WPO pair weights with one weighted loss type; reference-free DPO; bf16 log-probs get bf16 gradients."""
    logps, lengths = _inputs(7)
    opts = _options("dpo", ["discopop"], loss_weights=[0.7], pair_weights=torch.rand(7))
    _compare(backend, logps, lengths, opts)
    _compare(backend, logps, lengths, _options("dpo", "bco_pair", reference_free=True))
    bf16, _ = _inputs(7, dtype=torch.bfloat16)
    _compare(backend, bf16, lengths, _options("dpo", "sigmoid"), dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_cpo_nll_term(backend):
    """CPO: loss = mean(losses) + cpo_alpha * chosen_nll, and chosen_nll gets gradient cpo_alpha."""
    logps, lengths = _inputs(4)
    _compare(backend, logps, lengths, _options("cpo", "simpo", cpo_alpha=0.5), nll=torch.tensor(1.7))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("loss_type", COUPLED, ids=",".join)
def test_batch_coupled_types_run_compiled(backend, loss_type, caplog, monkeypatch):
    """aot sorts over the batch and sft is one batch mean: no per-pair kernel; triton logs once and runs compiled."""
    monkeypatch.setattr(dispatch, "_logged_fallbacks", set())
    logps, lengths = _inputs(6)
    opts = _options("dpo", loss_type, loss_weights=[1.0, 0.5, 0.2] if len(loss_type) > 1 else None)
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        _compare(backend, logps, lengths, opts, nll=torch.tensor(2.0))
        _compare(backend, logps, lengths, opts, nll=torch.tensor(2.5))
    notes = [r for r in caplog.records if "couples the pairs" in r.getMessage()]
    assert len(notes) == (1 if backend == "triton" else 0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("family,loss_type", [("dpo", t) for t in DPO_PAIR_TYPES if t not in ("ipo", "sigmoid_norm")]
                         + [("cpo", t) for t in CPO_TYPES], ids=lambda v: v)
def test_extreme_margins_stay_finite(backend, family, loss_type):
    """Log-ratios of +-1e4 (beta = 1): every value and gradient stays finite and equal to the reference."""
    chosen = torch.tensor([-1e4, 0.0, -5.0, -1e4, 0.0])
    rejected = torch.tensor([0.0, -1e4, -5.0, -1e4, 0.0])
    logps = [chosen, rejected, torch.zeros(5), torch.zeros(5)]
    lengths = [torch.ones(5, dtype=torch.long)] * 2
    opts = _options(family, loss_type, beta=1.0)
    if family == "cpo":
        opts["alpha"] = 0.0  # AlphaPO's exp(alpha * 1e4) overflows in every backend
    out, grads, _ = _run(backend, logps, lengths, opts)
    assert torch.isfinite(out.losses).all() and all(torch.isfinite(g).all() for g in grads)
    _compare(backend, logps, lengths, opts)


@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_dpo_sigmoid_hand_value(backend):
    """policy (-10, -20), reference (-12, -15): c = 2, r = -5, beta = 0.1 -> -logsig(0.7) = 0.403186;
    d loss / d chosen = -beta sig(-0.7) = -0.033181, d loss / d rejected = +0.033181; rewards 0.2 and -0.5."""
    leaves = [torch.tensor([v], requires_grad=True) for v in (-10.0, -20.0, -12.0, -15.0)]
    with fusedrl.use_kernels(preference=backend):
        out = fusedrl.preference_loss(*leaves, loss_type="sigmoid", beta=0.1)
    out.loss.backward()
    assert_close(out.loss, torch.tensor(0.403186))
    assert_close(out.chosen_rewards, torch.tensor([0.2]))
    assert_close(out.rejected_rewards, torch.tensor([-0.5]))
    assert_close(torch.cat([t.grad for t in leaves]), torch.tensor([-0.033181, 0.033181, 0.033181, -0.033181]))


# ---------------------------------------------------------------------------------------------------------------
# orpo_loss, kto_loss, kto_kl


def _orpo_run(backend, chosen, rejected, nll):
    leaves = [t.clone().requires_grad_() for t in (chosen, rejected, nll)]
    with fusedrl.use_kernels(preference=backend):
        out = ops.orpo_loss(leaves[0], leaves[1], chosen_nll=leaves[2], beta=0.2)
    (out.loss + (out.losses * torch.linspace(-1.0, 2.0, out.losses.shape[0])).sum()).backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", ["awkward", "extreme"])
def test_orpo_matches_reference(backend, case):
    """Mean log-probs of an awkward B = 5; extreme: -1e4 and -1e-6 (probabilities 0 and ~1: log-odds -1e4, +13.8)."""
    if case == "awkward":
        chosen, rejected = -torch.rand(5) * 3 - 0.01, -torch.rand(5) * 3 - 0.01
    else:
        chosen, rejected = torch.tensor([-1e4, -1e-6, -0.5, -1e4]), torch.tensor([-1e-6, -1e4, -0.5, -1e4])
    out, grads = _orpo_run(backend, chosen, rejected, torch.tensor(1.7))
    ref, ref_grads = _orpo_run("reference", chosen, rejected, torch.tensor(1.7))
    assert all(torch.isfinite(t).all() for t in (*out, *grads))
    assert not any(t.requires_grad for t in out[2:])  # rewards and the log-odds metrics are detached
    for name in out._fields:
        assert_close(getattr(out, name), getattr(ref, name), name=name)
    for name, grad, ref_grad in zip(("chosen", "rejected", "chosen_nll"), grads, ref_grads):
        assert_close(grad, ref_grad, name=f"grad {name}")


@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_orpo_hand_value(backend):
    """chosen mean logp ln 0.5, rejected ln 0.2: odds 1 and 1/4, log_odds = ln 4 = 1.386294, logsig = -ln 1.25 =
    -0.223144; beta 0.1, nll 2: loss = 2 + 0.0223144. d loss / d chosen = -beta sig(-ln 4) / (1 - 0.5) = -0.04,
    d loss / d rejected = beta sig(-ln 4) / (1 - 0.2) = 0.025, d loss / d nll = 1; rewards 0.1 ln 0.5, 0.1 ln 0.2."""
    leaves = [torch.tensor(v, requires_grad=True) for v in ([math.log(0.5)], [math.log(0.2)], 2.0)]
    with fusedrl.use_kernels(preference=backend):
        out = fusedrl.orpo_loss(leaves[0], leaves[1], chosen_nll=leaves[2], beta=0.1)
    out.loss.backward()
    assert_close(out.loss, torch.tensor(2.0223144))
    assert_close(out.log_odds_chosen, torch.tensor([1.386294]))
    assert_close(out.log_odds_ratio, torch.tensor([-0.223144]))
    assert_close(out.chosen_rewards, torch.tensor([0.1 * math.log(0.5)]))
    assert_close(torch.cat([t.grad.reshape(1) for t in leaves]), torch.tensor([-0.04, 0.025, 1.0]))


def _kto_run(backend, logps, ref_logps, labels, **options):
    leaves = [t.clone().requires_grad_() for t in (logps, ref_logps)]
    with fusedrl.use_kernels(preference=backend):
        out = ops.kto_loss(leaves[0], leaves[1], labels, beta=0.3, **options)
    (out.loss + (out.losses * torch.linspace(-1.0, 2.0, out.losses.shape[0])).sum()).backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_reference(backend, loss_type):
    """Awkward N = 7 with one log-ratio of +-1e4, both labels, weights, the KL from mismatched pairs; and one label
    only with a precomputed KL (clamped at 0 when negative)."""
    logps, ref_logps = torch.randn(7) * 5 - 30, torch.randn(7) * 5 - 30
    logps[0], logps[1] = 1e4, -1e4
    labels = torch.tensor([True, False, True, True, False, False, True])
    kl_logps, ref_kl_logps = torch.randn(7) - 30, torch.randn(7) - 31  # KL estimate ~ +1
    cases = [({"kl_logps": kl_logps, "ref_kl_logps": ref_kl_logps, "desirable_weight": 1.5,
               "undesirable_weight": 0.7}, labels),
             ({"kl": torch.tensor(-0.4)}, torch.ones(7, dtype=torch.bool))]
    for options, case_labels in cases:
        out, grads = _kto_run(backend, logps, ref_logps, case_labels, loss_type=loss_type, **options)
        ref, ref_grads = _kto_run("reference", logps, ref_logps, case_labels, loss_type=loss_type, **options)
        assert not out.rewards.requires_grad and not out.kl.requires_grad
        for name in ("loss", "losses", "rewards", "kl"):
            assert_close(getattr(out, name), getattr(ref, name), name=name)
        for name, grad, ref_grad in zip(("logps", "ref_logps"), grads, ref_grads):
            assert torch.isfinite(grad).all()
            assert_close(grad, ref_grad, name=f"grad {name}")


@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_kto_hand_value(backend):
    """beta 1, kl 0.5. Desirable: lr = -10 - (-12) = 2, z = 1.5, loss sig(-1.5) = 0.182426. Undesirable
    (weight 2): lr = -1, z = -1.5, loss 2 sig(-1.5) = 0.364851. loss = mean = 0.273638; d loss / d logps =
    (-sig(1.5) sig(-1.5), 2 sig(1.5) sig(-1.5)) / 2 = (-0.074573, 0.149146); rewards (2, -1)."""
    logps = torch.tensor([-10.0, -13.0], requires_grad=True)
    with fusedrl.use_kernels(preference=backend):
        out = fusedrl.kto_loss(logps, torch.tensor([-12.0, -12.0]), torch.tensor([True, False]), beta=1.0,
                               undesirable_weight=2.0, kl=torch.tensor(0.5))
    out.loss.backward()
    assert_close(out.losses, torch.tensor([0.182426, 0.364851]))
    assert_close(out.loss, torch.tensor(0.273638))
    assert_close(out.rewards, torch.tensor([2.0, -1.0]))
    assert_close(out.kl, torch.tensor(0.5))
    assert_close(logps.grad, torch.tensor([-0.074573, 0.149146]))


@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_kto_kl_is_a_detached_mean(backend, caplog, monkeypatch):
    """(-1 - -3 + -2 - -1) / 2 = 0.5; triton has no kernel for this batch mean: it runs compiled, logged once."""
    monkeypatch.setattr(dispatch, "_logged_fallbacks", set())
    kl_logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="fusedrl"), fusedrl.use_kernels(preference=backend):
        for _ in range(2):
            kl = fusedrl.kto_kl(kl_logps, torch.tensor([-3.0, -1.0]))
            assert_close(kl, torch.tensor(0.5))
            assert not kl.requires_grad
    notes = [r for r in caplog.records if "KL estimate is a batch mean" in r.getMessage()]
    assert len(notes) == (1 if backend == "triton" else 0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck_unpaired_op(backend):
    logps, ref_logps = (torch.randn(6) * 10).requires_grad_(), (torch.randn(6) * 10).requires_grad_()
    labels = torch.tensor([True, False, False, True, True, False])
    torch.library.opcheck(fused.unpaired_losses_op, (logps, ref_logps, labels, torch.tensor(0.3), 0.2, 1.5, 0.5,
                                                     backend))


@pytest.mark.parametrize("call,match", [
    (lambda t: fusedrl.kto_loss(t, t, t > 0), r"'kto' needs kl, or kl_logps"),
    (lambda t: fusedrl.kto_loss(t, t, t > 0, loss_type="sigmoid"), r"Unknown KTO loss_type 'sigmoid'"),
    (lambda t: fusedrl.kto_loss(t, t[:2], t > 0, kl=t[0]), r"ref_logps must match logps"),
    (lambda t: fusedrl.orpo_loss(t, t, chosen_nll=t), r"chosen_nll must be a scalar"),
], ids=["kto-without-kl", "kto-loss-type", "kto-shapes", "orpo-nll"])
def test_orpo_kto_errors_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(3))


# ---------------------------------------------------------------------------------------------------------------
# linear_preference_loss


def _linear_reference(hidden, weight, labels, bias, ref_hidden, opts, average, softcap=None):
    """Full fp32 [2B, T, V] logits for the policy and the reference (both soft-capped by ``softcap``), then the
    reference loss."""
    mask = labels != -100
    head = {"bias": bias, "softcap": softcap}
    logps = sequence_logps(linear_token_logprobs_reference(hidden, weight, labels, **head)[0], mask, average=average)
    with torch.no_grad():
        ref_logps = sequence_logps(linear_token_logprobs_reference(ref_hidden, weight, labels, **head)[0], mask,
                                   average=average)
    tokens, _ = linear_token_logprobs_reference(hidden, weight, labels, **head)
    num_pairs = labels.shape[0] // 2
    nll = token_mean_nll(tokens[:num_pairs], mask[:num_pairs])
    refs = (ref_logps[:num_pairs], ref_logps[num_pairs:]) if opts["family"] == "dpo" else (None, None)
    with fusedrl.use_kernels(preference="reference"):
        out = fusedrl.preference_loss(logps[:num_pairs], logps[num_pairs:], *refs, chosen_nll=nll,
                                      chosen_lengths=mask[:num_pairs].sum(-1),
                                      rejected_lengths=mask[num_pairs:].sum(-1), **opts)
    return out, logps, nll


@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
@pytest.mark.parametrize("case", ["realistic", "awkward", "ignored_rows", "cpo_simpo_mean", "awkward_capped"])
def test_linear_preference_loss(backend, case):
    """Unfused, every backend, against full fp32 logits; ``awkward_capped``: a soft-capped head (cap 2 against logits
    of std ~3), on the policy's and the reference's hidden states."""
    num_pairs, T, H, V = {"realistic": (2, 16, 32, 256)}.get(case, (3, 7, 24, 123) if case.startswith("awkward")
                                                              else (2, 9, 16, 97))
    softcap = 2.0 if case == "awkward_capped" else None
    hidden = torch.randn(2 * num_pairs, T, H)
    weight = torch.randn(V, H) / H**0.5 * 3
    bias = torch.randn(V) if case != "realistic" else None
    labels = torch.randint(0, V, (2 * num_pairs, T))
    labels[:, : T // 2] = -100  # the prompt
    if case == "ignored_rows":
        labels[1] = -100  # a fully ignored chosen row: logps 0, no gradient through it
        labels[-1, -2:] = -100  # padding
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    average = case == "cpo_simpo_mean"
    opts = _options("cpo", "simpo", cpo_alpha=0.3) if average else _options("dpo", "sigmoid")
    tensors = (hidden, weight) + ((bias,) if bias is not None else ())
    leaves, ref_leaves = ([t.clone().requires_grad_() for t in tensors] for _ in range(2))
    with fusedrl.use_kernels(all=backend):
        out = fusedrl.linear_preference_loss(
            leaves[0], leaves[1], labels, bias=leaves[2] if bias is not None else None,
            ref_hidden=None if average else ref_hidden, average_log_prob=average, softcap=softcap, **opts,
        )
    expected, logps, nll = _linear_reference(ref_leaves[0], ref_leaves[1], labels,
                                             ref_leaves[2] if bias is not None else None, ref_hidden, opts, average,
                                             softcap)
    (out.loss + out.losses.sum()).backward()
    (expected.loss + expected.losses.sum()).backward()
    for name in ("loss", "losses", "chosen_rewards", "rejected_rewards"):
        assert_close(getattr(out, name), getattr(expected, name), name=name)
    assert_close(out.chosen_logps, logps[:num_pairs], name="chosen_logps")
    assert_close(out.rejected_logps, logps[num_pairs:], name="rejected_logps")
    assert_close(out.chosen_nll, nll, name="chosen_nll")
    for name, leaf, ref_leaf in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        assert_close(leaf.grad, ref_leaf.grad, name=f"grad {name}")
    if case == "ignored_rows":
        assert out.chosen_logps[1] == 0 and (leaves[0].grad[1] == 0).all()


def test_linear_precomputed_reference_logps_match_ref_hidden():
    """ref_hidden computed here == the same reference log-probs passed precomputed (bitwise: same kernels)."""
    hidden, ref_hidden = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    weight, labels = torch.randn(40, 8), torch.randint(0, 40, (4, 6))
    ref_tokens = fusedrl.linear_token_logprobs(ref_hidden, weight, labels)
    ref_logps = sequence_logps(ref_tokens, labels != -100)
    a = fusedrl.linear_preference_loss(hidden, weight, labels, ref_hidden=ref_hidden)
    b = fusedrl.linear_preference_loss(hidden, weight, labels, ref_chosen_logps=ref_logps[:2],
                                       ref_rejected_logps=ref_logps[2:])
    assert torch.equal(a.loss, b.loss) and torch.equal(a.chosen_rewards, b.chosen_rewards)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile capture, opcheck, errors


def _region(hidden, weight, labels, ref_hidden, loss_type):
    out = fusedrl.linear_preference_loss(hidden, weight, labels, ref_hidden=ref_hidden, loss_type=loss_type,
                                         label_smoothing=0.1)
    return out.loss + 0.01 * out.chosen_nll


@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "aot"])
def test_zero_graph_breaks(backend, loss_type):
    hidden = torch.randn(4, 5, 8, requires_grad=True)
    weight = torch.randn(37, 8, requires_grad=True)
    labels = torch.randint(0, 37, (4, 5))
    labels[:, :2] = -100
    ref_hidden = torch.randn(4, 5, 8)
    with fusedrl.use_kernels(all=backend):
        explanation = torch._dynamo.explain(_region)(hidden, weight, labels, ref_hidden, loss_type)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        torch._dynamo.reset()
        loss = torch.compile(_region, fullgraph=True, backend="aot_eager")(hidden, weight, labels, ref_hidden,
                                                                          loss_type)
        loss.backward()
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with fusedrl.use_kernels(all="reference"):
        expected = _region(h, w, labels, ref_hidden, loss_type)
    expected.backward()
    assert_close(loss, expected, name="loss")
    assert_close(hidden.grad, h.grad, name="grad hidden")
    assert_close(weight.grad, w.grad, name="grad weight")
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck_pair_op(backend):
    logps = [(torch.randn(5) * 10).requires_grad_() for _ in range(4)]
    scale = [1.0 / torch.randint(1, 9, (5,)).float() for _ in range(2)]
    params = (0.1, 0.1, 0.05, 0.0, 0.5, 1.0, backend)
    torch.library.opcheck(fused.pair_losses_op, (*logps, None, None, None, "logistic", "reverse_kl", *params))
    torch.library.opcheck(fused.pair_losses_op, (*logps, *scale, torch.rand(5), "square", "js_divergence", *params))
    torch.library.opcheck(fused.pair_losses_op, (*logps[:2], None, None, None, None, None, "logistic", "alphapo",
                                                 *params))


@pytest.mark.parametrize("kwargs,match", [
    ({"family": "cpo", "loss_type": "simpo"}, "no reference model"),
    ({"loss_type": "ipo"}, "chosen/rejected_lengths"),
    ({"loss_type": "sft"}, "chosen_nll"),
    ({"loss_type": "exo_pair"}, "label_smoothing"),
    ({"loss_type": "bco_pair", "f_divergence_type": "js_divergence"}, "only applies"),
    ({"family": "kto"}, "family must be one of"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_errors_name_the_problem(kwargs, match):
    logps = [torch.randn(3) for _ in range(4)]
    with pytest.raises(ValueError, match=match):
        fusedrl.preference_loss(*logps, **kwargs)
