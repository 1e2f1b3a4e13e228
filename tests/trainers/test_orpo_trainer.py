"""fusedrl.ORPOTrainer against trl.experimental.orpo.ORPOTrainer 1.16 (the peer) on a tiny Llama.

- parity: both trainers run 2 optimizer steps from the same checkpoint path, data, seed and config; every metric TRL
  logs must match to fp32 precision (tests/utils.assert_close: rtol = atol = 1e-5), the loss must be finite and every
  trainable tensor must have moved (standard and conversational data, answers cut by max_length, gradient
  accumulation with evaluation, PEFT);
- kernels: the reference and compiled backends give the same first-step loss and gradients through the trainer,
  and ``kernels="preference=..."`` runs that backend's loss and no other (counted calls);
- bad rows fail at construction naming the row and the field; the config has TRL's fields and defaults.

The parity helpers these checks share with the DPO, CPO and KTO tests are in tests/helpers/parity.py.
"""

from __future__ import annotations

import warnings

import pytest

import fusedrl.trainers as fused
from fusedrl.cli.presets.tokenizer import build_tokenizer
from fusedrl.trainers.data import DatasetFormatError
from tests.helpers.data import PROMPTS, REJECTED, conversational_pairs, pair_rows, standard_pairs
from tests.helpers.models import tiny_llama
from tests.helpers.parity import (
    assert_backends_agree,
    assert_matches_trl,
    assert_selected_backend_runs,
    assert_trl_fields,
    base_settings,
    materialise_pair_case,
    train_logs,
    trainable_snapshot,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning: the peer is only compared against
    from trl.experimental import orpo as trl_orpo


def make_trainer(module, model, output_dir, *, train=None, eval_dataset=None, peft_config=None, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.ORPOTrainer(model=model, args=module.ORPOConfig(**base_settings(output_dir, **overrides)),
                                  train_dataset=standard_pairs() if train is None else train,
                                  eval_dataset=eval_dataset, processing_class=build_tokenizer(),
                                  peft_config=peft_config)


PARITY_CASES = {
    "standard": {},
    "conversational": {"train": "conversational"},
    # Prompts of up to 25 tokens: the longer answers are cut, no prompt fills the 26 positions.
    "answers-cut-26": {"max_length": 26},
    "grad-accumulation-eval": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                               "eval_dataset": "standard", "beta": 0.5},
    "peft-lora": {"peft_config": "lora"},
}


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_matches_trl(name, model_dir, tmp_path):
    case = PARITY_CASES[name]
    evaluate = "eval_dataset" in case
    expected = train_logs(make_trainer(trl_orpo, model_dir, tmp_path / "trl", **materialise_pair_case(case)), evaluate)
    trainer = make_trainer(fused, model_dir, tmp_path / "fused", **materialise_pair_case(case))
    before = trainable_snapshot(trainer)
    assert_matches_trl(train_logs(trainer, evaluate), expected, before, trainer, num_logs=2 + evaluate)


def test_kernel_backends_agree(model_dir, tmp_path):
    assert_backends_agree(lambda backend: make_trainer(fused, model_dir, tmp_path / backend,
                                                       kernels=f"linear_logprobs={backend}"))


def test_selected_preference_backend_runs(model_dir, tmp_path, monkeypatch):
    """ORPO's odds-ratio term is the per-pair op's logistic loss on the log-odds score under compiled and triton."""
    assert_selected_backend_runs(
        lambda backend: make_trainer(fused, model_dir, tmp_path / backend,
                                     kernels=f"all=reference,preference={backend}"),
        "fusedrl.ops.preference.reference.orpo:orpo_loss", monkeypatch)


def test_prompt_filling_max_length_is_dropped(tmp_path):
    """TRL keeps such a row with an empty answer (its mean log-prob is 0/0 = NaN); fusedrl drops it."""
    trainer = make_trainer(fused, tiny_llama(), tmp_path, max_length=20)
    prompts = [p for p in PROMPTS if len(build_tokenizer()(p)["input_ids"]) >= 20]
    assert prompts and len(trainer.train_dataset) == len(PROMPTS) - len(prompts)
    assert all(len(row["chosen_input_ids"]) <= 20 for row in trainer.train_dataset)


BAD_DATA = {
    "missing-column": (lambda: pair_rows(chosen=None), r"missing column\(s\) \['chosen'\]"),
    "empty-rejected": (lambda: pair_rows(rejected=[*REJECTED[:2], " ", *REJECTED[3:]]),
                       r"row 2, field 'rejected': is empty"),
    "non-string-content": (
        lambda: conversational_pairs().map(
            lambda row, i: {"chosen": [{"role": "assistant", "content": None if i == 5 else "7"}]},
            with_indices=True),
        r"row 5, field 'chosen', message 0: 'content' must be a string, got None"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_rows_fail_at_construction(name, tmp_path):
    make_dataset, message = BAD_DATA[name]
    with pytest.raises(DatasetFormatError, match=message):
        make_trainer(fused, tiny_llama(), tmp_path, train=make_dataset())


def test_refused_arguments(tmp_path):
    with pytest.raises(ValueError, match="generate_during_eval"):
        make_trainer(fused, tiny_llama(), tmp_path, generate_during_eval=True)
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        make_trainer(fused, tiny_llama(), tmp_path, kernels="linear_logprobs=fast")


def test_config_has_trl_fields_and_defaults():
    assert_trl_fields(trl_orpo.ORPOConfig, fused.ORPOConfig)
