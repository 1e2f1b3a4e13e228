"""bf16 through every public op and backend: values and every gradient against the fp32 reference of the same inputs.

Two ways a model runs in bf16, each on every backend (Triton under the interpreter):
- ``bf16``: the inputs are bf16 tensors (a model loaded in bf16); the expected values are the fp32 reference backend
  on the same values upcast to fp32;
- ``autocast``: fp32 inputs, forward and backward inside ``torch.autocast("cpu", torch.bfloat16)`` (``bf16=True``
  mixed precision); the expected values are the fp32 reference on the same inputs with autocast off. The LM head then
  multiplies in bf16 as ``nn.Linear`` would, and its backward used to fail there ("Expected out tensor to have dtype
  BFloat16": the custom op's matmuls inherited the caller's autocast).
Comparisons use ``assert_close(..., dtype=torch.bfloat16)`` (RMS relative error, tests/utils.py); gradients come back
in their inputs' dtypes and everything stays finite, extreme logits (+-1e4, -inf) included.
Shapes are awkward (not powers of two) and small: the interpreter runs Triton ~600x slower than torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

import fusedrl
from tests.utils import assert_close

BACKENDS = ("reference", "compiled", "triton")
MODES = ("bf16", "autocast")
IGNORE = -100
B, T, H, V = 3, 7, 24, 123  # sequences, positions, hidden, vocabulary


class Case(NamedTuple):
    """fp32 ``inputs`` (float ones are cast per mode, others passed as they are), the names among them that get a
    gradient, and ``call(**inputs) -> (outputs, objective)``: named outputs to compare (None where absent) and the
    scalar to backpropagate (None for an op without autograd)."""

    inputs: dict[str, torch.Tensor]
    leaves: tuple[str, ...]
    call: Callable[..., tuple[dict[str, torch.Tensor | None], torch.Tensor | None]]


def _labels(rows: int, prompt: int = 2) -> torch.Tensor:
    """Token labels ``[rows, T]`` with the first ``prompt`` positions ignored, as a trainer's are."""
    labels = torch.randint(0, V, (rows, T))
    labels[:, :prompt] = IGNORE
    return labels


def _head(rows: int, bias: bool = False) -> dict[str, torch.Tensor]:
    # Weights scaled so that the logits have a spread of ~3, as a trained head's do.
    head = {"hidden": torch.randn(rows, T, H), "weight": torch.randn(V, H) * 3 / H**0.5}
    return {**head, "bias": torch.randn(V)} if bias else head


def _mask(rows: int) -> torch.Tensor:
    mask = torch.ones(rows, T, dtype=torch.bool)
    mask[0, -3:] = False  # a padded completion
    return mask


def _token_logprobs() -> Case:
    labels = _labels(B)
    g_logprobs, g_entropy = torch.randn(B, T), torch.randn(B, T)

    def call(logits):
        out = fusedrl.token_logprobs_and_entropy(logits, labels, temperature=0.7)
        return ({"logprobs": out.logprobs, "entropy": out.entropy},
                (out.logprobs * g_logprobs + out.entropy * g_entropy).sum())

    return Case({"logits": torch.randn(B, T, V) * 3}, ("logits",), call)


def _token_logprobs_only() -> Case:
    labels = _labels(B)
    g_logprobs = torch.randn(B, T)

    def call(logits):
        logprobs = fusedrl.token_logprobs(logits, labels)
        return {"logprobs": logprobs}, (logprobs * g_logprobs).sum()

    return Case({"logits": torch.randn(B, T, V) * 3}, ("logits",), call)


def _linear_token_logprobs() -> Case:
    labels = _labels(B)
    g_logprobs, g_entropy = torch.randn(B, T), torch.randn(B, T)

    def call(hidden, weight, bias):
        out = fusedrl.linear_token_logprobs(hidden, weight, labels, bias=bias, with_entropy=True)
        return ({"logprobs": out.logprobs, "entropy": out.entropy},
                (out.logprobs * g_logprobs + out.entropy * g_entropy).sum())

    return Case(_head(B, bias=True), ("hidden", "weight", "bias"), call)


def _pair_logps() -> dict[str, torch.Tensor]:
    # Sequence log-probs of ~10-token completions, the reference close to the policy as at the start of training.
    chosen, rejected = -torch.rand(4) * 20 - 1, -torch.rand(4) * 20 - 1
    return {"chosen": chosen, "rejected": rejected, "ref_chosen": chosen + torch.randn(4),
            "ref_rejected": rejected + torch.randn(4)}


def _preference(loss_type: str) -> Callable[[], Case]:
    def build() -> Case:
        def call(chosen, rejected, ref_chosen, ref_rejected):
            out = fusedrl.preference_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=loss_type, beta=0.5)
            return out._asdict(), out.loss

        return Case(_pair_logps(), ("chosen", "rejected"), call)

    return build


def _cpo_simpo() -> Case:
    def call(chosen, rejected, chosen_nll):
        out = fusedrl.preference_loss(chosen, rejected, loss_type="simpo", family="cpo", beta=2.0,
                                      chosen_nll=chosen_nll)
        return out._asdict(), out.loss

    inputs = {"chosen": -torch.rand(4) * 3, "rejected": -torch.rand(4) * 3, "chosen_nll": torch.tensor(1.7)}
    return Case(inputs, ("chosen", "rejected", "chosen_nll"), call)


def _linear_preference(fused: bool) -> Callable[[], Case]:
    """``fused=True``: the head+loss path that forms the gradient in its forward (the reference backend runs the
    unfused path, the expected values), with its per-token metrics."""
    return lambda: _linear_preference_case(fused)


def _linear_preference_case(fused: bool) -> Case:
    labels = _labels(4)  # 2 pairs: [chosen; rejected]

    def call(hidden, weight, ref_hidden):
        out = fusedrl.linear_preference_loss(hidden, weight, labels, ref_hidden=ref_hidden, beta=0.1, fused=fused,
                                             with_metrics=fused)
        return out._asdict(), out.loss

    # A flatter reference (half the policy's logits, as a policy that training sharpened): log-ratios of several
    # nats. Each sequence log-prob (~-35) carries a bf16 error of ~0.03; a reference within a few hundredths of a
    # nat of the policy would make the rewards that difference of two roundings, and a log-ratio of ~20 nats at a
    # large beta saturates the sigmoid, whose gradient e^-z turns a 0.1% log-prob error into 5%.
    head = _head(4)
    return Case({**head, "ref_hidden": 0.5 * head["hidden"]}, ("hidden", "weight"), call)


def _orpo() -> Case:
    def call(chosen, rejected, chosen_nll):
        out = fusedrl.orpo_loss(chosen, rejected, chosen_nll=chosen_nll, beta=0.5)
        return out._asdict(), out.loss

    # Mean completion log-probs, in (-3, -0.1): the log-odds need log(1 - e^x) < 0.
    inputs = {"chosen": -torch.rand(4) * 3 - 0.1, "rejected": -torch.rand(4) * 3 - 0.1,
              "chosen_nll": torch.tensor(2.3)}
    return Case(inputs, ("chosen", "rejected", "chosen_nll"), call)


def _kto() -> Case:
    labels = torch.tensor([True, False, True, True, False, False])

    def call(logps, ref_logps, kl_logps, ref_kl_logps):
        out = fusedrl.kto_loss(logps, ref_logps, labels, beta=0.5, kl_logps=kl_logps, ref_kl_logps=ref_kl_logps)
        return out._asdict(), out.loss

    logps, kl_logps = -torch.rand(6) * 20, -torch.rand(6) * 20
    inputs = {"logps": logps, "ref_logps": logps + torch.randn(6), "kl_logps": kl_logps,
              "ref_kl_logps": kl_logps - torch.rand(6)}
    return Case(inputs, ("logps",), call)


def _policy() -> Case:
    mask = _mask(B)

    def call(logps, old_logps, advantages, ref_logps):
        out = fusedrl.policy_loss(logps, old_logps, advantages, mask, ref_logps_BT=ref_logps, beta=0.04,
                                  loss_type="grpo", epsilon_high=0.28)
        return out._asdict(), out.loss

    logps = -torch.rand(B, T) * 4
    # Old log-probs 0.3 apart on average: some tokens clip on each side.
    inputs = {"logps": logps, "old_logps": logps + 0.3 * torch.randn(B, T), "advantages": torch.randn(B),
              "ref_logps": logps + 0.1 * torch.randn(B, T)}
    return Case(inputs, ("logps",), call)


def _linear_policy() -> Case:
    ids, mask = torch.randint(0, V, (B, T)), _mask(B)

    def call(hidden, weight, advantages):
        # On-policy (old = None): a clip flag of a token at the clip boundary could flip with the bf16 head's rounding.
        # No KL term: k3 = e^d - d - 1 (d = ref - logp) amplifies a log-prob error e^d-fold, which would measure the
        # estimator's conditioning rather than the op (policy_loss checks the KL path on exact inputs).
        out = fusedrl.linear_policy_loss(hidden, weight, ids, mask, None, advantages, loss_type="grpo")
        return out._asdict(), out.loss

    return Case({**_head(B), "advantages": torch.randn(B)}, ("hidden", "weight"), call)


def _gae() -> Case:
    mask = _mask(B)
    mask[1, 2] = False  # padding between real positions

    def call(rewards, values):
        out = fusedrl.gae(rewards, values, mask, gamma=0.99, lam=0.95)
        return out._asdict(), None  # no autograd: GAE gives constant targets

    return Case({"rewards": torch.randn(B, T), "values": torch.randn(B, T)}, (), call)


CASES = {
    "token_logprobs_and_entropy": _token_logprobs,
    "token_logprobs": _token_logprobs_only,
    "linear_token_logprobs": _linear_token_logprobs,
    "preference_loss-dpo_sigmoid": _preference("sigmoid"),
    "preference_loss-dpo_aot": _preference("aot"),  # couples the batch: torch.compile of the reference
    "preference_loss-cpo_simpo": _cpo_simpo,
    "linear_preference_loss": _linear_preference(fused=False),
    "linear_preference_loss-fused": _linear_preference(fused=True),
    "orpo_loss": _orpo,
    "kto_loss": _kto,
    "policy_loss": _policy,
    "linear_policy_loss": _linear_policy,
    "gae": _gae,
}


def _run(case: Case, inputs: dict[str, torch.Tensor], backend: str, autocast: bool):
    """Outputs and leaf gradients of ``case`` on ``inputs`` (fresh leaves), forward and backward in one region."""
    leaves = {name: inputs[name].detach().clone().requires_grad_() for name in case.leaves}
    tensors = {**inputs, **leaves}
    with fusedrl.use_kernels(all=backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs, objective = case.call(**tensors)
        if objective is not None:
            objective.backward()
    return outputs, leaves


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CASES))
def test_bf16_matches_fp32_reference(op: str, backend: str, mode: str):
    case = CASES[op]()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.inputs.items()}
    outputs, leaves = _run(case, inputs, backend, autocast=mode == "autocast")
    expected_inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    expected, expected_leaves = _run(case, expected_inputs, "reference", autocast=False)

    assert outputs.keys() == expected.keys()
    for name, value in outputs.items():
        assert (value is None) == (expected[name] is None), name
        if value is None:
            continue
        if not value.is_floating_point():
            # Top-1 flags: a bf16 tile could flip a near tie, which these random logits (gaps >> 2^-8 relative)
            # do not have.
            assert torch.equal(value, expected[name]), name
            continue
        assert torch.isfinite(value).all(), name
        assert_close(value, expected[name], dtype=torch.bfloat16, name=name)
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.dtype == dtype, f"grad {name}: {leaf.grad}"
        assert torch.isfinite(leaf.grad).all(), f"grad {name}"
        assert_close(leaf.grad, expected_leaves[name].grad, dtype=torch.bfloat16, name=f"grad {name}")


def _extreme_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 logits ``[2, 4, V]`` with +-1e4, -inf and a row of tied 1e4 entries; labels never on a -inf logit."""
    logits = torch.randn(2, 4, V) * 3
    logits[..., 0], logits[..., 1], logits[..., 2] = 1e4, -1e4, float("-inf")
    logits[0, 0, : V // 2] = 1e4
    labels = torch.randint(3, V, (2, 4))
    labels[1, 0] = 1  # the label on the -1e4 logit: log p = -2e4, finite
    return logits.bfloat16(), labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_bf16_logits_stay_finite(backend: str):
    logits, labels = _extreme_logits()
    ours = logits.clone().requires_grad_()
    ref = logits.float().requires_grad_()
    with fusedrl.use_kernels(logprobs=backend):
        out = fusedrl.token_logprobs_and_entropy(ours, labels)
    expected = fusedrl.ops.logprobs.reference.token_logprobs_reference(ref, labels, with_entropy=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    (expected[0].sum() + expected[1].sum()).backward()
    for name, value, reference in (("logprobs", out.logprobs, expected[0]), ("entropy", out.entropy, expected[1]),
                                   ("grad logits", ours.grad, ref.grad)):
        assert torch.isfinite(value).all(), name
        assert_close(value, reference, dtype=torch.bfloat16, name=name)
    assert ours.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_bf16_head_stays_finite(backend: str):
    """Hidden states ~1e3 put the logits near +-1e4, where a bf16 logit rounds to a multiple of 64: the log-probs
    (of order -1e4) keep their relative accuracy and nothing overflows."""
    labels = _labels(2)
    head = {k: v.bfloat16() for k, v in _head(2).items()}
    head["hidden"] = head["hidden"] * 1e3
    ours = {k: v.clone().requires_grad_() for k, v in head.items()}
    refs = {k: v.float().requires_grad_() for k, v in head.items()}
    with fusedrl.use_kernels(linear_logprobs=backend):
        out = fusedrl.linear_token_logprobs(ours["hidden"], ours["weight"], labels, with_entropy=True)
    with fusedrl.use_kernels(linear_logprobs="reference"):
        expected = fusedrl.linear_token_logprobs(refs["hidden"], refs["weight"], labels, with_entropy=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    (expected.logprobs.sum() + expected.entropy.sum()).backward()
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all()
    assert_close(out.logprobs, expected.logprobs, dtype=torch.bfloat16, name="logprobs")
    for name in ("hidden", "weight"):
        assert ours[name].grad.dtype == torch.bfloat16 and torch.isfinite(ours[name].grad).all(), name


@pytest.mark.parametrize("backend", ("compiled", "triton"))
def test_autocast_backward_outside_the_region_is_the_same(backend: str):
    """The head's forward inside autocast and its backward after the block (transformers' Trainer calls backward
    outside the autocast of the forward) give bit for bit the gradients of a backward inside the block: the saved
    inputs are already bf16 and the custom ops ignore the caller's autocast."""
    labels = _labels(B)
    head = _head(B, bias=True)
    grads = []
    for backward_inside in (True, False):
        leaves = {k: v.clone().requires_grad_() for k, v in head.items()}
        with fusedrl.use_kernels(linear_logprobs=backend):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fusedrl.linear_token_logprobs(leaves["hidden"], leaves["weight"], labels, bias=leaves["bias"],
                                                    with_entropy=True)
                objective = out.logprobs.sum() + out.entropy.sum()
                if backward_inside:
                    objective.backward()
            if not backward_inside:
                objective.backward()
        grads.append([leaves[k].grad for k in ("hidden", "weight", "bias")])
    for inside, outside in zip(*grads):
        assert inside.dtype == torch.float32 and torch.equal(inside, outside)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_head_accepts_bf16_hidden_with_fp32_weight(backend: str):
    """Under autocast a bf16 trunk output meets fp32 master weights; the head casts both, as ``nn.Linear`` does,
    and each gradient comes back in its own input's dtype."""
    labels = _labels(B)
    head = _head(B)
    hidden = head["hidden"].bfloat16().requires_grad_()
    weight = head["weight"].clone().requires_grad_()
    ref_hidden, ref_weight = hidden.detach().float().requires_grad_(), weight.detach().clone().requires_grad_()
    with fusedrl.use_kernels(linear_logprobs=backend), torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs = fusedrl.linear_token_logprobs(hidden, weight, labels)
    with fusedrl.use_kernels(linear_logprobs="reference"):
        expected = fusedrl.linear_token_logprobs(ref_hidden, ref_weight, labels)
    logprobs.sum().backward()
    expected.sum().backward()
    assert logprobs.dtype == torch.float32
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    assert_close(logprobs, expected, dtype=torch.bfloat16, name="logprobs")
    assert_close(hidden.grad, ref_hidden.grad, dtype=torch.bfloat16, name="grad hidden")
    assert_close(weight.grad, ref_weight.grad, dtype=torch.bfloat16, name="grad weight")
