"""Preference-loss references (fusedrl.ops.preference.reference) against hand-derived values and TRL 1.16's own code.

Three kinds of test:
  * hand values: one test per loss type, the derivation in its docstring (torchtune ``test_dpo_loss.py`` style);
  * TRL parity: TRL's loss methods run on the same inputs, values and gradients compared. ORPO's
    ``odds_ratio_loss`` and CPO's ``cpo_loss`` are standalone methods called on a ``SimpleNamespace``. DPO and KTO
    compute their losses inline in ``_compute_loss(model, inputs)``; those run unbound on ``_TRLHarness`` (only the
    attributes the method reads, identity collectives) with ``_StubLM`` standing in for a model patched with TRL's
    fused LM head: it returns preset per-token log-probs, so gradients flow to the same leaf in both paths;
  * extremes: margins of +-1e4 keep values and gradients finite wherever the math is finite.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fusedrl.ops.preference.reference import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    cpo_losses,
    dpo_losses,
    kto_losses,
    ld_sequence_logps,
    log1mexp,
    orpo_loss,
    sequence_logps,
    token_mean_nll,
    wpo_pair_weights,
)
from tests.utils import assert_close


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------------------
# Hand values, DPO. The standard pair: policy (-10, -20), reference (-12, -15), so the log-ratios are c = 2 and
# r = -5, the margin d = c - r = 7 and with beta = 0.1: beta d = 0.7, beta c = 0.2, beta r = -0.5.
# ------------------------------------------------------------------------------------------------------------------


def _dpo(loss_type, **kwargs):
    kwargs.setdefault("beta", 0.1)
    return dpo_losses(t(-10.0), t(-20.0), t(-12.0), t(-15.0), loss_type=loss_type, **kwargs)


def test_dpo_sigmoid_hand_value():
    """sigmoid: -logsig(0.7) = log(1 + e^-0.7) = 0.403186; rewards beta c = 0.2, beta r = -0.5."""
    out = _dpo("sigmoid")
    assert_close(out.losses, [0.403186])
    assert_close(out.chosen_rewards, [0.2])
    assert_close(out.rejected_rewards, [-0.5])


def test_dpo_hinge_hand_value():
    """hinge: relu(1 - 0.7) = 0.3."""
    assert_close(_dpo("hinge").losses, [0.3])


def test_dpo_ipo_hand_value():
    """ipo, lengths 4 and 5: (2/4 - (-5)/5 - 1/(2*0.1))^2 = (1.5 - 5)^2 = 12.25."""
    assert_close(_dpo("ipo", chosen_lengths=t(4.0), rejected_lengths=t(5.0)).losses, [12.25])


def test_dpo_sigmoid_norm_hand_value():
    """sigmoid_norm, lengths 4 and 5: -logsig(0.1 * 1.5) = log(1 + e^-0.15) = 0.620957."""
    assert_close(_dpo("sigmoid_norm", chosen_lengths=t(4.0), rejected_lengths=t(5.0)).losses, [0.620957])


def test_dpo_exo_pair_hand_value():
    """exo_pair, eps = 1e-3: q = sig(0.7) = 0.668188;
    q ln(q / 0.999) + (1 - q) ln((1 - q) / 0.001) = 0.668188 * -0.402185 + 0.331812 * 5.804566 = 1.657292."""
    assert_close(_dpo("exo_pair", label_smoothing=1e-3).losses, [1.657292])


def test_dpo_robust_hand_value():
    """robust, eps = 0.1: (-0.9 logsig(0.7) + 0.1 logsig(-0.7)) / 0.8 = (0.362867 - 0.110319) / 0.8 = 0.315686."""
    assert_close(_dpo("robust", label_smoothing=0.1).losses, [0.315686])


def test_dpo_discopop_hand_value():
    """discopop, tau = 0.05: m = sig(0.7 / 0.05) = sig(14) = 0.99999917;
    -logsig(0.7) (1 - m) + e^-0.7 m = 0.403186 * 8.3e-7 + 0.496585 * 0.99999917 = 0.496585."""
    assert_close(_dpo("discopop").losses, [0.496585])


def test_dpo_nca_pair_hand_value():
    """nca_pair: -logsig(0.2) - logsig(-0.2) / 2 - logsig(0.5) / 2 = 0.598139 + 0.798139 / 2 + 0.474077 / 2
    = 1.234247."""
    assert_close(_dpo("nca_pair").losses, [1.234247])


def test_dpo_bco_pair_hand_value():
    """bco_pair: -logsig(0.2) - logsig(0.5) = 0.598139 + 0.474077 = 1.072216."""
    assert_close(_dpo("bco_pair").losses, [1.072216])


def test_dpo_sppo_hard_hand_value():
    """sppo_hard: (2 - 0.5/0.1)^2 + (-5 + 0.5/0.1)^2 = 9 + 0 = 9."""
    assert_close(_dpo("sppo_hard").losses, [9.0])


def test_dpo_apo_zero_hand_value():
    """apo_zero: 1 - sig(0.2) + sig(-0.5) = 0.450166 + 0.377541 = 0.827707."""
    assert_close(_dpo("apo_zero").losses, [0.827707])


def test_dpo_apo_down_hand_value():
    """apo_down: sig(0.2) + 1 - sig(0.1 * (2 - -5)) = 0.549834 + 0.331812 = 0.881646."""
    assert_close(_dpo("apo_down").losses, [0.881646])


def test_dpo_aot_sorts_margins_hand_value():
    """aot, beta = 1, two pairs: policy margins (3, -1), reference margins (0, 2). Sorted: (-1, 3) - (0, 2) = (-1, 1),
    so the losses are (-logsig(-1), -logsig(1)) = (1.313262, 0.313262) -- unsorted pairing would give (3, -3)."""
    out = dpo_losses(t(0.0, -1.0), t(-3.0, 0.0), t(0.0, 0.0), t(0.0, -2.0), loss_type="aot", beta=1.0)
    assert_close(out.losses, [1.313262, 0.313262])


def test_dpo_aot_unpaired_hand_value():
    """aot_unpaired, beta = 1: chosen log-ratios (2, -1), rejected (0, 3). Sorted: (-1, 2) - (0, 3) = (-1, -1), so
    both losses are -logsig(-1) = 1.313262."""
    out = dpo_losses(t(2.0, -1.0), t(0.0, 3.0), t(0.0, 0.0), t(0.0, 0.0), loss_type="aot_unpaired", beta=1.0)
    assert_close(out.losses, [1.313262, 1.313262])


def test_dpo_sft_hand_value():
    """sft: the chosen NLL passed in, 1.5, repeated per pair; from token log-probs (-1, -2 | -3, pad) with mask
    (1, 1 | 1, 0): -(-1 - 2 - 3) / 3 = 2."""
    assert_close(_dpo("sft", chosen_nll=torch.tensor(1.5)).losses, [1.5])
    assert_close(token_mean_nll(t(-1.0, -2.0, -3.0, 0.0).view(2, 2), t(1, 1, 1, 0).view(2, 2)), 2.0)


def test_dpo_mpo_weighted_sum_hand_value():
    """MPO, loss_type = (sigmoid, sft), loss_weights = (0.8, 0.2), nll 1.5: 0.8 * 0.403186 + 0.2 * 1.5 = 0.622549."""
    out = _dpo(["sigmoid", "sft"], loss_weights=[0.8, 0.2], chosen_nll=torch.tensor(1.5))
    assert_close(out.losses, [0.622549])
    assert_close(out.components[1], [1.5])


@pytest.mark.parametrize(
    "f_divergence_type, coef, chosen_ratio, expected",
    [
        pytest.param("forward_kl", 0.5, 2.0, 0.201413, id="forward_kl"),
        pytest.param("js_divergence", 0.5, 2.0, 0.405465, id="js_divergence"),
        pytest.param("alpha_divergence", 0.5, 4.0, 0.048587, id="alpha_divergence-0.5"),
    ],
)
def test_dpo_f_divergence_hand_values(f_divergence_type, coef, chosen_ratio, expected):
    """sigmoid, beta = 1, policy/reference ratios t_c = chosen_ratio and t_r = 1 / chosen_ratio:
    forward_kl f(t) = 1 - 1/t: f(2) - f(1/2) = 0.5 + 1 = 1.5, -logsig(1.5) = 0.201413;
    js f(t) = ln 2 + logsig(ln t): ln(4/3) - ln(2/3) = ln 2, -logsig(ln 2) = ln(3/2) = 0.405465;
    alpha (a = 0.5) f(t) = (t^-0.5 - 1) / -0.5: f(4) - f(1/4) = 1 - (-2) = 3, -logsig(3) = 0.048587."""
    log_ratio = math.log(chosen_ratio)
    out = dpo_losses(
        t(log_ratio),
        t(-log_ratio),
        t(0.0),
        t(0.0),
        loss_type="sigmoid",
        beta=1.0,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=coef,
    )
    assert_close(out.losses, [expected])
    assert_close(out.chosen_rewards, [log_ratio])  # rewards stay beta * log-ratio under every divergence


def test_dpo_reference_free_hand_value():
    """reference_free (no TRL 1.16 counterpart): references are 0, so sigmoid with policy (-10, -12), beta 0.1 gives
    -logsig(0.2) = 0.598139 and rewards (-1.0, -1.2)."""
    out = dpo_losses(t(-10.0), t(-12.0), None, None, loss_type="sigmoid", beta=0.1, reference_free=True)
    assert_close(out.losses, [0.598139])
    assert_close(out.chosen_rewards, [-1.0])


def test_wpo_weights_hand_value():
    """WPO: chosen token log-probs (-1, -1) against log sum p^2 (-0.5, -0.5): exp(mean(-0.5)) = e^-0.5; rejected (-2)
    against (-1): e^-1; pair weight e^-1.5 = 0.223130. sigmoid * weight 0.5 = 0.5 * 0.403186 = 0.201593."""
    token_logps = t(-1.0, -1.0, -2.0, 0.0).view(2, 2)
    lssp = t(-0.5, -0.5, -1.0, 0.0).view(2, 2)
    mask = t(1, 1, 1, 0).view(2, 2)
    assert_close(wpo_pair_weights(token_logps, lssp, mask), [0.223130])
    assert_close(_dpo("sigmoid", pair_weights=t(0.5)).losses, [0.201593])


def test_ld_dpo_logps_hand_value():
    """LD-DPO, ld_alpha = 0.5: chosen tokens (-1, -2, -3), rejected (-1, -1): shared length 2, so chosen
    -1 - 2 + 0.5 * -3 = -4.5 and rejected -2; ld_alpha = 1 is the plain sum."""
    token_logps = t(0.0, -1.0, -2.0, -3.0, 0.0, -1.0, -1.0, 0.0).view(2, 4)
    mask = t(0, 1, 1, 1, 0, 1, 1, 0).view(2, 4)
    assert_close(ld_sequence_logps(token_logps, mask, ld_alpha=0.5), [-4.5, -2.0])
    assert_close(ld_sequence_logps(token_logps, mask, ld_alpha=1.0), sequence_logps(token_logps, mask))


# ------------------------------------------------------------------------------------------------------------------
# Hand values, ORPO, KTO, CPO.
# ------------------------------------------------------------------------------------------------------------------


def test_orpo_hand_value():
    """ORPO, beta 0.1, mean log-probs ln 0.5 and ln 0.2: odds 1 and 1/4, log_odds = ln 4 = 1.386294;
    logsig(ln 4) = ln(4/5) = -0.223144; odds-ratio loss 0.0223144; with nll 1: loss 1.022314; rewards 0.1 ln 0.5."""
    out = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), chosen_nll=torch.tensor(1.0), beta=0.1)
    assert_close(out.log_odds_chosen, [1.386294])
    assert_close(out.log_odds_ratio, [-0.223144])
    assert_close(out.odds_ratio_losses, [0.0223144])
    assert_close(out.loss, 1.0223144)
    assert_close(out.chosen_rewards, [-0.0693147])


def test_kto_hand_value():
    """kto, beta 0.1, weights (1, 2): logps (-10, -10), ref (-12, -8), labels (desirable, undesirable) so log-ratios
    (2, -2); mismatched pairs give KL mean((-5, -5) - (-6, -6)) = 1.
    desirable 1 - sig(0.1 (2 - 1)) = 0.475021; undesirable 2 (1 - sig(0.1 (1 + 2))) = 0.851115; mean 0.663068."""
    out = kto_losses(
        t(-10.0, -10.0),
        t(-12.0, -8.0),
        torch.tensor([True, False]),
        beta=0.1,
        undesirable_weight=2.0,
        kl_logps=t(-5.0, -5.0),
        ref_kl_logps=t(-6.0, -6.0),
    )
    assert_close(out.losses, [0.475021, 0.851115])
    assert_close(out.losses.mean(), 0.663068)
    assert_close(out.kl, 1.0)
    assert_close(out.rewards, [0.2, -0.2])


def test_kto_negative_kl_is_clamped_hand_value():
    """kto: a KL estimate of mean(-6 - -5) = -1 is clamped to 0: desirable 1 - sig(0.1 * 2) = 0.450166."""
    out = kto_losses(t(-10.0), t(-12.0), torch.tensor([True]), beta=0.1, kl_logps=t(-6.0), ref_kl_logps=t(-5.0))
    assert_close(out.kl, 0.0)
    assert_close(out.losses, [0.450166])


def test_kto_apo_zero_unpaired_hand_value():
    """apo_zero_unpaired, beta 0.1, log-ratios (2, -2): desirable 1 - sig(0.2) = 0.450166, undesirable sig(-0.2) =
    0.450166; no KL (reported as 0)."""
    out = kto_losses(t(-10.0, -10.0), t(-12.0, -8.0), torch.tensor([True, False]), loss_type="apo_zero_unpaired")
    assert_close(out.losses, [0.450166, 0.450166])
    assert_close(out.kl, 0.0)


def test_cpo_sigmoid_hand_value():
    """cpo sigmoid, beta 0.1, summed log-probs -10 and -15: -logsig(0.5) = 0.474077; + cpo_alpha 1 * nll 2 = 2.474077;
    with label_smoothing 0.1: 0.9 * 0.474077 + 0.1 * 0.974077 = 0.524077."""
    out = cpo_losses(t(-10.0), t(-15.0), loss_type="sigmoid", chosen_nll=torch.tensor(2.0))
    assert_close(out.losses, [0.474077])
    assert_close(out.loss, 2.474077)
    assert_close(out.chosen_rewards, [-1.0])
    smoothed = cpo_losses(t(-10.0), t(-15.0), loss_type="sigmoid", label_smoothing=0.1, cpo_alpha=0.0)
    assert_close(smoothed.losses, [0.524077])


def test_cpo_hinge_hand_value():
    """cpo hinge: relu(1 - 0.1 * 5) = 0.5."""
    assert_close(cpo_losses(t(-10.0), t(-15.0), loss_type="hinge", cpo_alpha=0.0).losses, [0.5])


def test_cpo_ipo_hand_value():
    """cpo ipo, mean log-probs -1 and -2, beta 0.1: (1 - 1/(2 * 0.1))^2 = (1 - 5)^2 = 16."""
    assert_close(cpo_losses(t(-1.0), t(-2.0), loss_type="ipo", cpo_alpha=0.0).losses, [16.0])


def test_cpo_simpo_hand_value():
    """simpo, mean log-probs -1 and -2, beta 2, gamma 0.5: -logsig(2 * 1 - 0.5) = -logsig(1.5) = 0.201413."""
    out = cpo_losses(t(-1.0), t(-2.0), loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)
    assert_close(out.losses, [0.201413])


def test_cpo_alphapo_hand_value():
    """AlphaPO (simpo, alpha 1), mean log-probs ln(1/2), ln(1/4): rewards (1 - p^-1) / 1 = -1 and -3, x = 2;
    beta 1, gamma 0.5: -logsig(2 - 0.5) = 0.201413; reported rewards beta * (-1, -3)."""
    out = cpo_losses(
        t(math.log(0.5)), t(math.log(0.25)), loss_type="simpo", beta=1.0, alpha=1.0, simpo_gamma=0.5, cpo_alpha=0.0
    )
    assert_close(out.losses, [0.201413])
    assert_close(out.chosen_rewards, [-1.0])
    assert_close(out.rejected_rewards, [-3.0])


# ------------------------------------------------------------------------------------------------------------------
# TRL parity.
# ------------------------------------------------------------------------------------------------------------------


def _import_trl():
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning on the trl.experimental imports
        from trl import DPOTrainer, KTOTrainer
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
        from trl.trainer.utils import FusedCausalLMOutput
    return SimpleNamespace(
        DPOTrainer=DPOTrainer,
        KTOTrainer=KTOTrainer,
        CPOTrainer=CPOTrainer,
        ORPOTrainer=ORPOTrainer,
        FusedCausalLMOutput=FusedCausalLMOutput,
    )


class _TRLHarness:
    """The attributes TRL's ``_compute_loss`` reads, on one CPU process (collectives are identities).

    Subclasses borrow TRL's methods unbound, so the code under comparison is TRL's own, not a transcription.
    """

    def __init__(self, **attributes):
        identity = lambda x: x
        self.accelerator = SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity)
        self.model = SimpleNamespace(training=True)
        self.args = SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None)
        self.aux_loss_enabled = False
        self.precompute_ref_logps = True  # reference log-probs come in the batch: no reference model needed
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        self._tp_size = 1
        self.__dict__.update(attributes)


class _StubLM:
    """A model patched with TRL's fused LM head, reduced to its outputs: each call returns the preset per-token
    outputs of the ``input_ids`` tensor it receives (matched by identity)."""

    def __init__(self, outputs_by_input: list[tuple[torch.Tensor, object]]):
        self._outputs_by_input = outputs_by_input

    def __call__(self, *, input_ids, labels, fused_lm_head, **_):
        assert fused_lm_head
        for ids, outputs in self._outputs_by_input:
            if ids is input_ids:
                return outputs
        raise KeyError("unexpected input_ids")


def _completion_masks(num_rows: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``[num_rows, width]`` 0/1 masks of the shifted completion: a prompt, 1..rest completion tokens, then padding."""
    masks = torch.zeros(num_rows, width)
    for row in range(num_rows):
        start = int(torch.randint(0, width // 3, (1,), generator=generator))
        length = int(torch.randint(1, width - start + 1, (1,), generator=generator))
        masks[row, start : start + length] = 1.0
    return masks


def _fused_outputs(trl, token_logps_NT, log_sum_sq_probs_NT=None):
    zeros = torch.zeros_like(token_logps_NT.detach())
    return trl.FusedCausalLMOutput(
        log_probs=token_logps_NT,
        entropy=zeros,
        mean_logits=zeros,
        is_top1=zeros.bool(),
        log_sum_sq_probs=log_sum_sq_probs_NT,
    )


SHAPES = [pytest.param(8, 128, id="B8-T128"), pytest.param(3, 47, id="B3-T47-awkward")]

DPO_TRL_CASES = [pytest.param({"loss_type": [name]}, id=name) for name in DPO_LOSS_TYPES] + [
    pytest.param({"loss_type": ["exo_pair"], "label_smoothing": 0.01}, id="exo_pair-eps0.01"),
    pytest.param({"loss_type": ["robust"], "label_smoothing": 0.2}, id="robust-eps0.2"),
    pytest.param({"loss_type": ["aot"], "label_smoothing": 0.1}, id="aot-eps0.1"),
    pytest.param({"loss_type": ["discopop"], "discopop_tau": 0.5}, id="discopop-tau0.5"),
    pytest.param({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, id="mpo"),
    pytest.param({"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"}, id="sigmoid-forward_kl"),
    pytest.param({"loss_type": ["ipo"], "f_divergence_type": "js_divergence"}, id="ipo-js_divergence"),
    pytest.param(
        {
            "loss_type": ["robust", "sft"],
            "f_divergence_type": "alpha_divergence",
            "f_alpha_divergence_coef": 0.3,
            "label_smoothing": 0.1,
        },
        id="robust+sft-alpha_divergence",
    ),
    pytest.param({"loss_type": ["sigmoid"], "ld_alpha": 0.5}, id="sigmoid-ld_alpha0.5"),
    # Not "sft" with WPO: TRL 1.16 multiplies the expanded sft scalar in place and raises a RuntimeError.
    pytest.param({"loss_type": ["sigmoid", "bco_pair"], "use_weighting": True}, id="sigmoid+bco_pair-wpo"),
]


@pytest.mark.parametrize("config", DPO_TRL_CASES)
@pytest.mark.parametrize("num_pairs, width", SHAPES)
def test_dpo_matches_trl(config, num_pairs, width):
    """``dpo_losses(...).losses.mean()`` == ``DPOTrainer._compute_loss``: value, gradient of every per-token
    log-prob, and the logged reward metrics."""
    trl = _import_trl()
    generator = torch.Generator().manual_seed(num_pairs * 1000 + width)
    config = {
        "beta": 0.3,
        "label_smoothing": 0.0,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "discopop_tau": 0.05,
        "ld_alpha": None,
        "use_weighting": False,
        "loss_weights": None,
        **config,
    }
    if "exo_pair" in config["loss_type"] and config["label_smoothing"] == 0.0:
        config["label_smoothing"] = 1e-3
    num_rows = 2 * num_pairs
    mask_NT = _completion_masks(num_rows, width, generator)
    leaf_NT = (-3.0 * torch.rand(num_rows, width, generator=generator)).requires_grad_()
    log_sum_sq_probs_NT = -2.0 * torch.rand(num_rows, width, generator=generator) * mask_NT
    ref_logps = (leaf_NT.detach() * mask_NT).sum(-1) + 2.0 * torch.randn(num_rows, generator=generator)
    ref_chosen, ref_rejected = ref_logps.chunk(2)

    # TRL: the stub returns leaf * mask, as the fused head returns 0 where the label is -100.
    inputs = {
        "input_ids": torch.zeros(num_rows, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(num_rows, width + 1, dtype=torch.long),
        "completion_mask": torch.cat([torch.zeros(num_rows, 1), mask_NT], dim=1).long(),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    stub = _StubLM([(inputs["input_ids"], _fused_outputs(trl, leaf_NT * mask_NT, log_sum_sq_probs_NT))])
    harness = type("_DPOHarness", (_TRLHarness,), {"_compute_loss": trl.DPOTrainer._compute_loss})(
        beta=config["beta"],
        loss_types=config["loss_type"],
        loss_weights=config["loss_weights"] or [1.0] * len(config["loss_type"]),
        ld_alpha=config["ld_alpha"],
        f_divergence_type=config["f_divergence_type"],
        f_alpha_divergence_coef=config["f_alpha_divergence_coef"],
        label_smoothing=config["label_smoothing"],
        use_weighting=config["use_weighting"],
    )
    harness.args.discopop_tau = config["discopop_tau"]
    trl_loss = harness._compute_loss(stub, inputs, return_outputs=False)
    (trl_grad,) = torch.autograd.grad(trl_loss, leaf_NT)

    # fusedrl, from the same leaf.
    token_logps_NT = leaf_NT * mask_NT
    if config["ld_alpha"] is None:
        logps = sequence_logps(token_logps_NT, mask_NT)
    else:
        logps = ld_sequence_logps(token_logps_NT, mask_NT, ld_alpha=config["ld_alpha"])
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = mask_NT.sum(-1).chunk(2)
    pair_weights = wpo_pair_weights(token_logps_NT, log_sum_sq_probs_NT, mask_NT) if config["use_weighting"] else None
    out = dpo_losses(
        chosen_logps,
        rejected_logps,
        ref_chosen,
        ref_rejected,
        loss_type=config["loss_type"],
        beta=config["beta"],
        loss_weights=config["loss_weights"],
        label_smoothing=config["label_smoothing"],
        f_divergence_type=config["f_divergence_type"],
        f_alpha_divergence_coef=config["f_alpha_divergence_coef"],
        discopop_tau=config["discopop_tau"],
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        chosen_nll=token_mean_nll(token_logps_NT[:num_pairs], mask_NT[:num_pairs]),
        pair_weights=pair_weights,
    )
    loss = out.losses.mean()
    (grad,) = torch.autograd.grad(loss, leaf_NT)

    assert_close(loss, trl_loss.detach())
    assert_close(grad, trl_grad)
    metrics = harness._metrics["train"]
    assert_close(out.chosen_rewards.mean(), metrics["rewards/chosen"][-1])
    assert_close(out.rejected_rewards.mean(), metrics["rewards/rejected"][-1])


KTO_TRL_CASES = [
    pytest.param({"loss_type": "kto"}, id="kto"),
    pytest.param({"loss_type": "kto", "desirable_weight": 1.33, "undesirable_weight": 0.7}, id="kto-weighted"),
    pytest.param({"loss_type": "kto", "kl_shift": -5.0}, id="kto-negative-kl-clamped"),
    pytest.param({"loss_type": "kto", "only_desirable": True}, id="kto-only-desirable"),
    pytest.param({"loss_type": "apo_zero_unpaired"}, id="apo_zero_unpaired"),
    pytest.param({"loss_type": "apo_zero_unpaired", "undesirable_weight": 2.0}, id="apo_zero_unpaired-weighted"),
]


@pytest.mark.parametrize("config", KTO_TRL_CASES)
@pytest.mark.parametrize("num_rows, width", SHAPES)
def test_kto_matches_trl(config, num_rows, width):
    """``kto_losses(...).losses.mean()`` == ``KTOTrainer._compute_loss``: value, gradient of every per-token log-prob
    of the matched completions, the logged KL and reward metrics."""
    trl = _import_trl()
    generator = torch.Generator().manual_seed(7 * num_rows + width)
    loss_type = config["loss_type"]
    desirable_weight = config.get("desirable_weight", 1.0)
    undesirable_weight = config.get("undesirable_weight", 1.0)
    beta = 0.25
    labels = torch.arange(num_rows) % 3 != 1
    if config.get("only_desirable"):
        labels = torch.ones(num_rows, dtype=torch.bool)
    mask_NT = _completion_masks(num_rows, width, generator)
    kl_mask_NT = mask_NT.roll(1, dims=0)  # TRL pairs each prompt with the previous example's completion
    leaf_NT = (-3.0 * torch.rand(num_rows, width, generator=generator)).requires_grad_()
    kl_token_logps_NT = -3.0 * torch.rand(num_rows, width, generator=generator) * kl_mask_NT
    ref_logps = (leaf_NT.detach() * mask_NT).sum(-1) + 2.0 * torch.randn(num_rows, generator=generator)
    ref_kl_logps = kl_token_logps_NT.sum(-1) + config.get("kl_shift", 0.0) + torch.randn(num_rows, generator=generator)

    inputs = {
        "input_ids": torch.zeros(num_rows, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(num_rows, width + 1, dtype=torch.long),
        "completion_mask": torch.cat([torch.zeros(num_rows, 1), mask_NT], dim=1).long(),
        "label": labels,
        "ref_logps": ref_logps,
    }
    calculate_kl = loss_type == "kto"
    outputs = [(inputs["input_ids"], _fused_outputs(trl, leaf_NT * mask_NT))]
    if calculate_kl:
        inputs["KL_input_ids"] = torch.zeros(num_rows, width + 1, dtype=torch.long)
        inputs["KL_attention_mask"] = torch.ones(num_rows, width + 1, dtype=torch.long)
        inputs["KL_completion_mask"] = torch.cat([torch.zeros(num_rows, 1), kl_mask_NT], dim=1).long()
        inputs["ref_KL_logps"] = ref_kl_logps
        outputs.append((inputs["KL_input_ids"], _fused_outputs(trl, kl_token_logps_NT)))
    harness_type = type(
        "_KTOHarness",
        (_TRLHarness,),
        {"_compute_loss": trl.KTOTrainer._compute_loss, "_compute_kl_logps": trl.KTOTrainer._compute_kl_logps},
    )
    harness = harness_type(
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        calculate_KL=calculate_kl,
    )
    trl_loss = harness._compute_loss(_StubLM(outputs), inputs, return_outputs=False)
    (trl_grad,) = torch.autograd.grad(trl_loss, leaf_NT)

    out = kto_losses(
        sequence_logps(leaf_NT * mask_NT, mask_NT),
        ref_logps,
        labels,
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        kl_logps=kl_token_logps_NT.sum(-1) if calculate_kl else None,
        ref_kl_logps=ref_kl_logps if calculate_kl else None,
    )
    loss = out.losses.mean()
    (grad,) = torch.autograd.grad(loss, leaf_NT)

    assert_close(loss, trl_loss.detach())
    assert_close(grad, trl_grad)
    metrics = harness._metrics["train"]
    assert_close(out.kl, metrics["kl"][-1])
    assert_close(out.rewards[labels].mean(), metrics["rewards/chosen"][-1])
    if not labels.all():
        assert_close(out.rewards[~labels].mean(), metrics["rewards/rejected"][-1])


@pytest.mark.parametrize("num_pairs", [8, 3])
def test_orpo_matches_trl(num_pairs):
    """``orpo_loss`` == ``ORPOTrainer.odds_ratio_loss`` (called on a namespace holding ``beta`` and a device) plus
    TRL's ``nll - losses.mean()``: value, gradients of both mean log-probs and of the NLL, and every logged piece."""
    trl = _import_trl()
    generator = torch.Generator().manual_seed(num_pairs)
    chosen = (-3.0 * torch.rand(num_pairs, generator=generator) - 1e-3).requires_grad_()
    # Both sides of the log1mexp switch at -ln 2 are covered.
    rejected = (-3.0 * torch.rand(num_pairs, generator=generator) - 1e-3).requires_grad_()
    nll = torch.tensor(1.7, requires_grad=True)
    beta = 0.2
    namespace = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_terms, trl_chosen_rewards, trl_rejected_rewards, trl_ratio, trl_log_odds = trl.ORPOTrainer.odds_ratio_loss(
        namespace, chosen, rejected
    )
    trl_loss = nll - trl_terms.mean()
    trl_grads = torch.autograd.grad(trl_loss, (chosen, rejected, nll))

    out = orpo_loss(chosen, rejected, chosen_nll=nll, beta=beta)
    grads = torch.autograd.grad(out.loss, (chosen, rejected, nll))

    assert_close(out.loss, trl_loss.detach())
    for grad, trl_grad in zip(grads, trl_grads, strict=True):
        assert_close(grad, trl_grad)
    assert_close(out.odds_ratio_losses, -trl_terms.detach())
    assert_close(out.chosen_rewards, trl_chosen_rewards)
    assert_close(out.rejected_rewards, trl_rejected_rewards)
    assert_close(out.log_odds_ratio.mean(), trl_ratio.detach())
    assert_close(out.log_odds_chosen.mean(), trl_log_odds.detach())


CPO_TRL_CASES = [pytest.param({"loss_type": name}, id=name) for name in CPO_LOSS_TYPES] + [
    pytest.param({"loss_type": "sigmoid", "label_smoothing": 0.1}, id="sigmoid-eps0.1"),
    pytest.param({"loss_type": "simpo", "label_smoothing": 0.1, "simpo_gamma": 1.0}, id="simpo-eps0.1-gamma1"),
    pytest.param({"loss_type": "simpo", "alpha": 0.5, "cpo_alpha": 0.0}, id="alphapo-0.5"),
    pytest.param({"loss_type": "ipo", "alpha": -0.3}, id="ipo-alpha-0.3"),
]


@pytest.mark.parametrize("config", CPO_TRL_CASES)
@pytest.mark.parametrize("num_pairs", [8, 3])
def test_cpo_matches_trl(config, num_pairs):
    """``cpo_losses`` == ``CPOTrainer.cpo_loss`` (called on a namespace of ``CPOConfig`` fields) plus TRL's
    ``losses.mean() + cpo_alpha * nll``: value, gradients and rewards. Summed log-probs for sigmoid/hinge, means
    for ipo/simpo, as TRL's ``concatenated_forward`` produces them."""
    trl = _import_trl()
    config = {"beta": 0.3, "label_smoothing": 0.0, "simpo_gamma": 0.5, "alpha": 0.0, "cpo_alpha": 1.0, **config}
    generator = torch.Generator().manual_seed(num_pairs)
    scale = 1.0 if config["loss_type"] in ("ipo", "simpo") else 40.0
    chosen = (-scale * torch.rand(num_pairs, generator=generator)).requires_grad_()
    rejected = (-scale * torch.rand(num_pairs, generator=generator)).requires_grad_()
    nll = torch.tensor(2.3, requires_grad=True)
    namespace = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **config)
    trl_terms, trl_chosen_rewards, trl_rejected_rewards = trl.CPOTrainer.cpo_loss(namespace, chosen, rejected)
    trl_loss = trl_terms.mean() + config["cpo_alpha"] * nll
    trl_grads = torch.autograd.grad(trl_loss, (chosen, rejected, nll), allow_unused=True)

    out = cpo_losses(chosen, rejected, chosen_nll=nll, **config)
    grads = torch.autograd.grad(out.loss, (chosen, rejected, nll), allow_unused=True)

    assert_close(out.loss, trl_loss.detach())
    assert_close(out.losses, trl_terms.detach())
    for grad, trl_grad in zip(grads, trl_grads, strict=True):
        assert (grad is None) == (trl_grad is None)
        if grad is not None:
            assert_close(grad, trl_grad)
    assert_close(out.chosen_rewards, trl_chosen_rewards)
    assert_close(out.rejected_rewards, trl_rejected_rewards)


# ------------------------------------------------------------------------------------------------------------------
# Extreme inputs, dtypes, rejected requests.
# ------------------------------------------------------------------------------------------------------------------

_EXTREME_MARGINS = t(1e4, -1e4, 1e4, -1e4)


def _finite_values_and_grads(loss_fn, *leaves):
    loss = loss_fn(*leaves)
    grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
    assert torch.isfinite(loss).all(), loss
    for grad in grads:
        assert grad is None or torch.isfinite(grad).all(), grad
    return loss


@pytest.mark.parametrize(
    "loss_type, extra",
    [pytest.param(name, {}, id=name) for name in DPO_LOSS_TYPES]
    + [
        pytest.param("sigmoid", {"f_divergence_type": "js_divergence"}, id="sigmoid-js_divergence"),
        pytest.param("hinge", {"f_divergence_type": "alpha_divergence"}, id="hinge-alpha_divergence"),
        pytest.param("discopop", {"discopop_tau": 0.5}, id="discopop-tau0.5"),
    ],
)
def test_dpo_extreme_margins_stay_finite(loss_type, extra):
    """Margins of +-1e4 (log-ratios +-5e3 each side), beta 0.1: every loss and gradient is finite. discopop included:
    TRL's exp(-z) * sig(z / tau) is inf * 0 = NaN at z = -1e3, the limit (here) is 0 plus the logistic part 1e3.
    forward_kl is left out: 1 - 1/t at log t = -5e3 is -e^5000, not representable."""
    chosen = (_EXTREME_MARGINS / 2).requires_grad_()
    rejected = (-_EXTREME_MARGINS / 2).requires_grad_()
    kwargs = dict(
        loss_type=loss_type,
        beta=0.1,
        label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0,
        chosen_lengths=t(3, 5, 7, 11),
        rejected_lengths=t(2, 4, 6, 10),
        **extra,
    )
    nll = torch.tensor(3.0, requires_grad=True)
    zeros = torch.zeros(4)
    losses = _finite_values_and_grads(
        lambda c, r, n: dpo_losses(c, r, zeros, zeros, chosen_nll=n, **kwargs).losses, chosen, rejected, nll
    )
    if loss_type in ("sigmoid", "discopop") and not extra:
        assert_close(losses, [0.0, 1000.0, 0.0, 1000.0], atol=1e-3, rtol=0.0)


def test_orpo_extreme_log_probs_stay_finite():
    """Mean log-probs a hair below 0 (-1e-6, odds ~1e6) against -1e4 (odds e^-1e4), both ways round: log_odds =
    +-(1e4 + ln 1e6), finite loss and gradients. Only a mean log-prob of exactly 0 has infinite odds."""
    chosen = t(-1e-6, -1e4).requires_grad_()
    rejected = t(-1e4, -1e-6).requires_grad_()
    _finite_values_and_grads(
        lambda c, r: orpo_loss(c, r, chosen_nll=torch.tensor(1.0), beta=0.1).odds_ratio_losses, chosen, rejected
    )
    assert torch.isneginf(log1mexp(t(0.0))).all()


def test_log1mexp_is_accurate_on_both_branches():
    """log(1 - e^x) against float64 on either side of the -ln 2 switch, down to x = -1e-6 and -50."""
    x = t(-50.0, -5.0, -0.7, -0.69, -0.1, -1e-3, -1e-6)
    expected = torch.log(-torch.expm1(x.double())).float()
    assert_close(log1mexp(x), expected)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_extreme_log_ratios_stay_finite(loss_type):
    """KTO log-ratios +-1e4 with KL 0.5 for both labels: losses in [0, 1] and finite gradients."""
    logps = t(1e4, -1e4, 1e4, -1e4).requires_grad_()
    labels = torch.tensor([True, True, False, False])
    losses = _finite_values_and_grads(
        lambda lp: kto_losses(lp, torch.zeros(4), labels, loss_type=loss_type, kl=torch.tensor(0.5)).losses, logps
    )
    assert ((losses >= 0) & (losses <= 1)).all()


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_cpo_extreme_margins_stay_finite(loss_type):
    """CPO margins +-1e4, and AlphaPO (alpha 1e-3) at log-probs -1e4 where TRL's exp(-1e4)^-alpha is 0^-alpha = inf:
    here -expm1(10) / 1e-3 = -2.2e7, finite."""
    chosen = t(0.0, -1e4).requires_grad_()
    rejected = t(-1e4, 0.0).requires_grad_()
    _finite_values_and_grads(lambda c, r: cpo_losses(c, r, loss_type=loss_type, cpo_alpha=0.0).losses, chosen, rejected)
    _finite_values_and_grads(
        lambda c, r: cpo_losses(c, r, loss_type=loss_type, alpha=1e-3, cpo_alpha=0.0).losses, chosen, rejected
    )


def test_bf16_inputs_are_upcast_before_any_math():
    """bf16 sequence log-probs give fp32 results bitwise equal to feeding the same values as fp32."""
    generator = torch.Generator().manual_seed(0)
    values = [(-50.0 * torch.rand(5, generator=generator)).bfloat16() for _ in range(4)]
    low = dpo_losses(*values, loss_type=["sigmoid", "bco_pair"], beta=0.1)
    high = dpo_losses(*(v.float() for v in values), loss_type=["sigmoid", "bco_pair"], beta=0.1)
    assert low.losses.dtype == torch.float32
    torch.testing.assert_close(low.losses, high.losses, rtol=0.0, atol=0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"loss_type": "dpo"}, "Unknown DPO loss_type", id="unknown-type"),
        pytest.param({"loss_type": "exo_pair"}, "label_smoothing", id="exo_pair-without-smoothing"),
        pytest.param({"loss_type": "nca_pair", "f_divergence_type": "forward_kl"}, "f-divergence", id="nca-forward_kl"),
        pytest.param({"loss_type": "aot", "pair_weights": t(1.0)}, "WPO", id="aot-with-wpo"),
        pytest.param({"loss_type": "ipo"}, "lengths", id="ipo-without-lengths"),
        pytest.param({"loss_type": "sft"}, "chosen_nll", id="sft-without-nll"),
        pytest.param({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}, "loss_weights", id="weights-length"),
    ],
)
def test_dpo_rejects_requests_trl_rejects(kwargs, match):
    """Requests TRL's DPOConfig / DPOTrainer refuse (or that need an input not given) raise with the reason."""
    with pytest.raises(ValueError, match=match):
        dpo_losses(t(-1.0), t(-2.0), t(-1.0), t(-2.0), beta=0.1, **kwargs)


def test_other_trainers_reject_bad_requests():
    """KTO without any KL input, unknown KTO/CPO types, and CPO with cpo_alpha > 0 but no NLL all raise."""
    with pytest.raises(ValueError, match="kl"):
        kto_losses(t(-1.0), t(-2.0), torch.tensor([True]), loss_type="kto")
    with pytest.raises(ValueError, match="Unknown KTO"):
        kto_losses(t(-1.0), t(-2.0), torch.tensor([True]), loss_type="bco")
    with pytest.raises(ValueError, match="Unknown CPO"):
        cpo_losses(t(-1.0), t(-2.0), loss_type="alphapo", cpo_alpha=0.0)
    with pytest.raises(ValueError, match="chosen_nll"):
        cpo_losses(t(-1.0), t(-2.0), loss_type="sigmoid", cpo_alpha=1.0)
