"""The two extension points (docs/extending.md): registered preference losses and new trainers, with their examples.

- registry: names (built-in refused, duplicates refused unless replaced, unknown names listed), ``needs`` inputs;
- values and gradients of a registered loss by hand, on every backend of ``fusedrl.preference_loss`` (triton routes
  to compiled with one logged note), alone and mixed with a built-in type (MPO), and through
  ``linear_preference_loss``; a built-in-only request through the registry path is ``dpo_losses`` bit for bit;
- DPOTrainer accepts registered names and lists them when a name is unknown;
- both examples train 2 steps on the tiny preset (``main(["--max_steps", "2"])``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fusedrl
from fusedrl.ops import dispatch
from fusedrl.ops.preference import registry as preference_registry
from fusedrl.ops.preference.reference import dpo_losses
from tests.utils import assert_close

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BACKENDS = ("reference", "compiled", "triton")


def squared_hinge(chosen_logratios, rejected_logratios, *, beta, margin=1.0):
    return torch.relu(margin - beta * (chosen_logratios - rejected_logratios)) ** 2


@pytest.fixture(autouse=True)
def _clean_registry():
    """Every test starts from an empty registry and leaves none of its names behind."""
    saved = dict(preference_registry._REGISTERED)
    preference_registry._REGISTERED.clear()
    yield
    preference_registry._REGISTERED.clear()
    preference_registry._REGISTERED.update(saved)


# ---------------------------------------------------------------------------------------------------------------
# The registry


def test_registered_name_becomes_a_loss_type():
    entry = fusedrl.register_preference_loss("squared_hinge", squared_hinge, description="hinge, squared")
    assert entry.needs == frozenset() and entry.fn is squared_hinge
    assert fusedrl.dpo_loss_types()[-1] == "squared_hinge"
    assert fusedrl.registered_preference_losses()["squared_hinge"] is entry
    fusedrl.unregister_preference_loss("squared_hinge")
    assert "squared_hinge" not in fusedrl.dpo_loss_types()


@pytest.mark.parametrize("name,kwargs,error,match", [
    ("sigmoid", {}, ValueError, r"'sigmoid' is a built-in DPO loss_type"),
    ("my loss", {}, ValueError, r"identifier-like"),
    ("mine", {"needs": ("chosen_logps",)}, ValueError, r"needs=\['chosen_logps'\].*choose from"),
], ids=["built-in", "not-identifier", "unknown-need"])
def test_bad_registrations_raise(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        fusedrl.register_preference_loss(name, squared_hinge, **kwargs)


def test_duplicates_need_replace():
    fusedrl.register_preference_loss("squared_hinge", squared_hinge)
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        fusedrl.register_preference_loss("squared_hinge", squared_hinge)
    other = lambda c, r, *, beta: -F.logsigmoid(beta * (c - r))
    assert fusedrl.register_preference_loss("squared_hinge", other, replace=True).fn is other
    with pytest.raises(ValueError, match=r"'nope' is not registered; registered: \['squared_hinge'\]"):
        fusedrl.unregister_preference_loss("nope")


@pytest.mark.parametrize("backend", ("reference", "compiled"))
def test_replacement_takes_effect(backend):
    """The compiled backend guards on the registered function: a replacement is traced again, not served stale."""
    logps = [torch.randn(4) for _ in range(4)]
    margin = (logps[0] - logps[2]) - (logps[1] - logps[3])
    with fusedrl.use_kernels(preference=backend):
        for scale in (1.0, 2.0):
            fusedrl.register_preference_loss("scaled", functools.partial(lambda c, r, *, beta, s: s * (c - r), s=scale),
                                             replace=True)
            assert_close(fusedrl.preference_loss(*logps, loss_type="scaled").losses, scale * margin,
                         name=f"scale {scale}")


def test_unknown_name_lists_builtin_and_registered():
    fusedrl.register_preference_loss("squared_hinge", squared_hinge)
    logps = [torch.randn(3) for _ in range(4)]
    with pytest.raises(ValueError, match=r"Unknown DPO loss_type \['nope'\].*'sigmoid_norm'\).*\('squared_hinge',\)"):
        fusedrl.preference_loss(*logps, loss_type=["squared_hinge", "nope"])


@pytest.mark.parametrize("kwargs,match", [
    ({"f_divergence_type": "js_divergence"}, r"f_divergence_type only applies to built-in types"),
    ({"chosen_lengths": None}, r"need chosen/rejected_lengths"),
    ({"chosen_nll": None}, r"need chosen_nll"),
], ids=["f-divergence", "lengths", "nll"])
def test_missing_needs_raise(kwargs, match):
    fusedrl.register_preference_loss("uses_all", lambda c, r, *, beta, **inputs: c - r,
                                     needs=("chosen_lengths", "rejected_lengths", "chosen_nll"))
    logps = [torch.randn(3) for _ in range(4)]
    options = {"chosen_lengths": torch.ones(3), "rejected_lengths": torch.ones(3), "chosen_nll": torch.tensor(1.0),
               **kwargs}
    with pytest.raises(ValueError, match=match):
        fusedrl.preference_loss(*logps, loss_type="uses_all", **options)


def test_wrong_output_shape_raises():
    fusedrl.register_preference_loss("batch_mean", lambda c, r, *, beta: (c - r).mean())
    logps = [torch.randn(3) for _ in range(4)]
    with fusedrl.use_kernels(preference="reference"), pytest.raises(ValueError, match=r"shape \(3,\) \(\[B\]\)"):
        fusedrl.preference_loss(*logps, loss_type="batch_mean")


# ---------------------------------------------------------------------------------------------------------------
# Values and gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_value_and_gradients_mixed_with_builtin(backend, caplog, monkeypatch):
    """policy c (-10, -12) r (-14, -11), reference c (-11, -11) r (-12, -12): log-ratios c = (1, -1), r = (-2, 1);
    beta = 0.5, so beta (c - r) = (1.5, -1.0). squared_hinge relu(1 - x)^2 = (0, 4); sigmoid -logsig(x) =
    (0.201413, 1.313262). loss_type [squared_hinge, sigmoid], weights [0.5, 1]: losses (0.201413, 3.313262),
    loss 1.757337. d loss / d policy_chosen = (-beta sig(-x) + 0.5 * 2 relu(1 - x) (-beta)) / B =
    (-0.045606, -0.682765); rejected and the references get the negatives. Rewards beta * log-ratios."""
    monkeypatch.setattr(dispatch, "_logged_fallbacks", set())
    fusedrl.register_preference_loss("squared_hinge", squared_hinge)
    leaves = [torch.tensor(v, requires_grad=True) for v in ([-10.0, -12.0], [-14.0, -11.0], [-11.0, -11.0],
                                                             [-12.0, -12.0])]
    with caplog.at_level(logging.WARNING, logger="fusedrl"), fusedrl.use_kernels(preference=backend):
        out = fusedrl.preference_loss(*leaves, loss_type=["squared_hinge", "sigmoid"], loss_weights=[0.5, 1.0],
                                      beta=0.5)
    out.loss.backward()
    assert_close(out.losses, torch.tensor([0.201413, 3.313262]), name="losses")
    assert_close(out.loss, torch.tensor(1.757337), name="loss")
    assert_close(out.chosen_rewards, torch.tensor([0.5, -0.5]), name="chosen rewards")
    assert_close(out.rejected_rewards, torch.tensor([-1.0, 0.5]), name="rejected rewards")
    grad_chosen = torch.tensor([-0.045606, -0.682765])
    for leaf, sign, name in zip(leaves, (1, -1, -1, 1), ("chosen", "rejected", "ref_chosen", "ref_rejected")):
        assert_close(leaf.grad, sign * grad_chosen, name=f"grad {name}")
    notes = [r for r in caplog.records if "registered Python losses" in r.getMessage()]
    assert len(notes) == (1 if backend == "triton" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_needs_inputs_and_pair_weights_match_autograd(backend):
    """Awkward B = 7 with +-1e4 log-ratios: a loss reading every ``needs`` input, WPO weights and
    ``reference_free``, against the same formula written out with autograd."""

    def length_normalised(c, r, *, beta, chosen_lengths, rejected_lengths, chosen_nll, label_smoothing):
        return -F.logsigmoid(beta * (c / chosen_lengths - r / rejected_lengths)) * (1 - label_smoothing) + chosen_nll

    fusedrl.register_preference_loss("length_normalised", length_normalised,
                                     needs=("chosen_lengths", "rejected_lengths", "chosen_nll", "label_smoothing"))
    chosen, rejected = torch.randn(7) * 20 - 50, torch.randn(7) * 20 - 50
    chosen[0], rejected[1] = 1e4, -1e4
    lengths = [torch.randint(1, 40, (7,)) for _ in range(2)]
    pair_weights, nll = torch.rand(7), torch.tensor(1.3)
    policy = [chosen.clone().requires_grad_(), rejected.clone().requires_grad_(), nll.clone().requires_grad_()]
    with fusedrl.use_kernels(preference=backend):
        out = fusedrl.preference_loss(policy[0], policy[1], loss_type="length_normalised", beta=0.1,
                                      label_smoothing=0.1, reference_free=True, chosen_lengths=lengths[0],
                                      rejected_lengths=lengths[1], chosen_nll=policy[2], pair_weights=pair_weights)
    out.loss.backward()
    expected = [chosen.clone().requires_grad_(), rejected.clone().requires_grad_(), nll.clone().requires_grad_()]
    losses = (length_normalised(expected[0], expected[1], beta=0.1, chosen_lengths=lengths[0].float(),
                                rejected_lengths=lengths[1].float(), chosen_nll=expected[2], label_smoothing=0.1)
              * pair_weights)
    losses.mean().backward()
    assert torch.isfinite(out.losses).all()
    assert_close(out.losses, losses, name="losses")
    assert_close(out.chosen_rewards, 0.1 * chosen, name="chosen rewards")
    for got, want, name in zip(policy, expected, ("chosen", "rejected", "chosen_nll")):
        assert_close(got.grad, want.grad, name=f"grad {name}")


def test_builtin_only_request_is_dpo_losses_bitwise():
    logps = [torch.randn(5) * 20 - 50 for _ in range(4)]
    lengths = {"chosen_lengths": torch.randint(1, 9, (5,)), "rejected_lengths": torch.randint(1, 9, (5,))}
    options = {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.3], "beta": 0.2, **lengths}
    ours = preference_registry.dpo_losses_with_registered(*logps, **options)
    theirs = dpo_losses(*logps, **options)
    for a, b in zip((ours.losses, ours.chosen_rewards, *ours.components),
                    (theirs.losses, theirs.chosen_rewards, *theirs.components)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ("reference", "compiled"))
def test_linear_preference_loss_takes_registered_names(backend):
    """The op from hidden states gives the loss of ``preference_loss`` on its own sequence log-probs."""
    fusedrl.register_preference_loss("squared_hinge", squared_hinge)
    hidden, ref_hidden = torch.randn(6, 5, 8, requires_grad=True), torch.randn(6, 5, 8)
    weight = torch.randn(37, 8, requires_grad=True)
    labels = torch.randint(0, 37, (6, 5))
    labels[:, :2] = -100
    with fusedrl.use_kernels(all=backend):
        out = fusedrl.linear_preference_loss(hidden, weight, labels, ref_hidden=ref_hidden, loss_type="squared_hinge",
                                             beta=0.5)
        ref = fusedrl.linear_preference_loss(ref_hidden, weight, labels, ref_hidden=ref_hidden, loss_type="sigmoid")
    out.loss.backward()
    ref_chosen, ref_rejected = ref.chosen_logps.detach(), ref.rejected_logps.detach()
    c, r = out.chosen_logps.detach() - ref_chosen, out.rejected_logps.detach() - ref_rejected
    assert_close(out.losses, squared_hinge(c, r, beta=0.5), name="losses")
    assert hidden.grad is not None and torch.isfinite(weight.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# DPOTrainer configuration


def test_dpo_config_check_accepts_registered_names():
    from fusedrl.trainers.preference.dpo import _check_config

    fusedrl.register_preference_loss("squared_hinge", squared_hinge)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make = lambda **kw: fusedrl.DPOConfig("unused", report_to="none", bf16=False, **kw)
        _check_config(make(loss_type=["squared_hinge", "sigmoid"], loss_weights=[1.0, 0.5]))
        with pytest.raises(ValueError, match=r"unknown loss_type \['nope'\]; choose from \[.*'squared_hinge'\]"):
            _check_config(make(loss_type=["nope"]))
        with pytest.raises(ValueError, match=r"only applies to built-in types"):
            _check_config(make(loss_type="squared_hinge", f_divergence_type="forward_kl"))


# ---------------------------------------------------------------------------------------------------------------
# The examples


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"fusedrl_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building SLiCConfig
    spec.loader.exec_module(module)
    return module


def _run_example(name: str, argv: list[str]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load_example(name).main(argv)


def test_custom_preference_loss_example():
    """Step 1 has policy == reference, so every log-ratio is 0 and the loss is -logsig(-gamma) = log(1 + e^0.5) =
    0.974077 (gamma = 0.5); step 2 has moved."""
    result = _run_example("custom_preference_loss", ["--max_steps", "2"])
    losses = result["losses"]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(math.log1p(math.exp(0.5)), abs=1e-4)
    assert losses[1] != losses[0]
    assert "rewards/margins" in result["metrics"]
    assert "sigmoid_margin" in fusedrl.registered_preference_losses()


def test_custom_trainer_example():
    result = _run_example("custom_trainer", ["--max_steps", "2"])
    losses = result["losses"]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert losses[1] != losses[0]
    metrics = result["metrics"]
    # loss = hinge + 0.1 nll, up to the 4-digit rounding of logged values
    assert metrics["loss"] == pytest.approx(metrics["hinge_loss"] + 0.1 * metrics["nll_loss"], abs=1e-3)
    assert 0.0 <= metrics["rewards/accuracies"] <= 1.0 and metrics["num_tokens"] > 0
