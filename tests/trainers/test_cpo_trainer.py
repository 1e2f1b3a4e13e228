"""fusedrl.CPOTrainer against trl.experimental.cpo.CPOTrainer 1.16 (the peer) on a tiny Llama.

- parity: for every loss type TRL ships (sigmoid, hinge, ipo, simpo and the alphapo sugar) plus label smoothing and
  an AlphaPO reward on the ipo loss, both trainers run 2 optimizer steps from the same checkpoint path, data,
  seed and config; every metric TRL logs must match to fp32 precision (rtol = atol = 1e-5), the loss must be finite
  and every trainable tensor must have moved. The data path is ORPO's (tests/trainers/test_orpo_trainer.py covers
  conversational data, truncation, gradient accumulation, evaluation and PEFT for both);
- kernels: the reference and compiled backends give the same first-step loss and gradients, and
  ``kernels="preference=..."`` runs that backend's loss and no other (counted calls);
- bad rows and bad configs fail at construction; the config has TRL's fields and defaults.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from datasets import Dataset

import fusedrl.trainers as fused
from fusedrl.cli.presets.tokenizer import build_tokenizer
from fusedrl.trainers.data import DatasetFormatError
from tests.helpers.data import CHOSEN, PROMPTS, standard_pairs
from tests.helpers.models import tiny_llama
from tests.helpers.parity import (
    assert_backends_agree,
    assert_matches_trl,
    assert_selected_backend_runs,
    assert_trl_fields,
    base_settings,
    first_step,
    train_logs,
    trainable_snapshot,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning: the peer is only compared against
    from trl.experimental import cpo as trl_cpo


def make_trainer(module, model, output_dir, *, train=None, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.CPOTrainer(model=model, args=module.CPOConfig(**base_settings(output_dir, **overrides)),
                                 train_dataset=standard_pairs() if train is None else train,
                                 processing_class=build_tokenizer())


# The loss types TRL 1.16 lists in CPOConfig.loss_type's choices: each gets its own parity case.
TRL_LOSS_TYPES = trl_cpo.CPOConfig.__dataclass_fields__["loss_type"].metadata["choices"]
assert set(TRL_LOSS_TYPES) == {"alphapo", "hinge", "ipo", "sigmoid", "simpo"}
PARITY_CASES = {loss_type: {"loss_type": loss_type} for loss_type in TRL_LOSS_TYPES}
PARITY_CASES["alphapo"]["alpha"] = 0.25  # alphapo with alpha = 0 would be SimPO without the NLL
# AlphaPO on a summed loss (sigmoid, hinge) overflows in TRL here: its p = exp(sum logp) underflows to 0 below -104
# and 0^-alpha = inf (the loss logs as 0.0); fusedrl's expm1 form stays finite. So alpha is checked on a mean loss.
PARITY_CASES.update({
    "sigmoid-smoothed": {"loss_type": "sigmoid", "label_smoothing": 0.1, "cpo_alpha": 0.5},
    "ipo-alpha": {"loss_type": "ipo", "alpha": 0.25},
})


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_matches_trl(name, model_dir, tmp_path):
    case = PARITY_CASES[name]
    expected = train_logs(make_trainer(trl_cpo, model_dir, tmp_path / "trl", **case))
    trainer = make_trainer(fused, model_dir, tmp_path / "fused", **case)
    before = trainable_snapshot(trainer)
    assert_matches_trl(train_logs(trainer), expected, before, trainer)


def test_alphapo_is_simpo_without_nll():
    config = fused.CPOConfig(**base_settings("unused", loss_type="alphapo", alpha=0.25))
    assert (config.loss_type, config.cpo_alpha) == ("simpo", 0.0)


def test_alphapo_reward_on_summed_logps_stays_finite(tmp_path):
    """The case TRL cannot run (see PARITY_CASES): sums of about -150 nats, where exp(logp) underflows to 0."""
    loss, grads = first_step(make_trainer(fused, tiny_llama(), tmp_path, loss_type="sigmoid", alpha=0.02))
    assert torch.isfinite(loss) and all(torch.isfinite(grad).all() for grad in grads.values())


def test_kernel_backends_agree(model_dir, tmp_path):
    assert_backends_agree(lambda backend: make_trainer(fused, model_dir, tmp_path / backend, loss_type="simpo",
                                                       kernels=f"linear_logprobs={backend}"))


@pytest.mark.parametrize("loss_type,alpha", [("simpo", 0.25), ("hinge", 0.0)])
def test_selected_preference_backend_runs(loss_type, alpha, model_dir, tmp_path, monkeypatch):
    """CPO's losses (AlphaPO reward included) run on the per-pair op under compiled and triton."""
    assert_selected_backend_runs(
        lambda backend: make_trainer(fused, model_dir, tmp_path / backend, loss_type=loss_type, alpha=alpha,
                                     kernels=f"all=reference,preference={backend}"),
        "fusedrl.ops.preference.reference.cpo:cpo_losses", monkeypatch)


def test_bad_rows_fail_at_construction(tmp_path):
    rows = Dataset.from_dict({"prompt": PROMPTS, "chosen": [*CHOSEN[:6], "", CHOSEN[7]],
                              "rejected": ["x"] * len(PROMPTS)})
    with pytest.raises(DatasetFormatError, match=re.escape("train dataset: row 6, field 'chosen': is empty")):
        make_trainer(fused, tiny_llama(), tmp_path, train=rows)


@pytest.mark.parametrize("loss_type, message", [("kto_pair", "removed from CPO"), ("dpo", "unknown loss_type")])
def test_bad_configs_fail_at_construction(loss_type, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_trainer(fused, tiny_llama(), tmp_path, loss_type=loss_type)


def test_config_has_trl_fields_and_defaults():
    assert_trl_fields(trl_cpo.CPOConfig, fused.CPOConfig)
