"""fusedrl.KTOTrainer against trl.KTOTrainer 1.16 (the peer) on a tiny Llama.

- parity: for both loss types (kto, apo_zero_unpaired) and the options around them (paired input unpaired on the
  way in, truncation, conversational rows, desirable/undesirable weights with gradient accumulation and evaluation,
  PEFT, precomputed reference), both trainers run 2 optimizer steps from the same checkpoint path, data, seed and
  config; every metric TRL logs must match to fp32 precision (rtol = atol = 1e-5), the loss must be finite and every
  trainable tensor must have moved. The paired case's first batch has desirable rows only, so it also checks that
  an absent label logs nothing, as in TRL;
- kernels: the reference and compiled backends give the same first-step loss and gradients, and
  ``kernels="preference=..."`` runs that backend's loss and KL estimate and no other (counted calls);
- bad rows and bad configs fail at construction; the config has TRL's fields and defaults.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import trl
from datasets import Dataset, Value
from peft import LoraConfig

import fusedrl.trainers as fused
from fusedrl.cli.presets.tokenizer import build_tokenizer
from fusedrl.trainers.data import DatasetFormatError
from tests.helpers.data import CHOSEN, LORA, PROMPTS, REJECTED, standard_pairs
from tests.helpers.models import tiny_llama
from tests.helpers.parity import (
    assert_backends_agree,
    assert_matches_trl,
    assert_trl_fields,
    base_settings,
    first_step,
    train_logs,
    trainable_snapshot,
)
from tests.utils import count_calls

# Both labels in each batch of 4 (first batch 3 desirable + 1 undesirable, second 1 + 3).
LABELS = [True, False, True, True, False, True, False, False]


def unpaired(conversational: bool = False) -> Dataset:
    completions = [chosen if label else rejected for chosen, rejected, label in zip(CHOSEN, REJECTED, LABELS)]
    if conversational:
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS],
                                  "completion": [[{"role": "assistant", "content": c}] for c in completions],
                                  "label": LABELS})
    return Dataset.from_dict({"prompt": PROMPTS, "completion": completions, "label": LABELS})


def make_trainer(module, model, output_dir, *, train=None, eval_dataset=None, peft_config=None, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.KTOTrainer(model=model, args=module.KTOConfig(**base_settings(output_dir, **overrides)),
                                 train_dataset=unpaired() if train is None else train, eval_dataset=eval_dataset,
                                 processing_class=build_tokenizer(), peft_config=peft_config)


TRL_LOSS_TYPES = trl.KTOConfig.__dataclass_fields__["loss_type"].metadata["choices"]
assert set(TRL_LOSS_TYPES) == {"kto", "apo_zero_unpaired"}
PARITY_CASES = {loss_type: {"loss_type": loss_type} for loss_type in TRL_LOSS_TYPES}
PARITY_CASES.update({
    # Unpaired, the 8 pairs are 8 desirable rows then 8 undesirable; max_length=20 drops 2 prompts (4 rows) and cuts
    # others, so the first batch is all desirable and the second mixed.
    "paired-keep_start-20": {"train": "paired", "max_length": 20},
    "conversational": {"train": "conversational"},
    "weights-grad-accumulation-eval": {"desirable_weight": 1.5, "undesirable_weight": 0.5,
                                       "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                       "eval_dataset": "unpaired"},
    "peft-lora": {"peft_config": "lora"},
    "precompute": {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 3},
})


def _materialise(case: dict) -> dict:
    case = dict(case)
    case["train"] = {None: None, "paired": standard_pairs(), "conversational": unpaired(True)}[case.get("train")]
    if case.get("eval_dataset") == "unpaired":
        case["eval_dataset"] = Dataset.from_dict({"prompt": ["3+4=", "8-6=", "Twelve plus one:", "1+1="],
                                                  "completion": ["7", "14", " 13", "3"],
                                                  "label": [True, False, True, False]})
    if case.get("peft_config") == "lora":
        case["peft_config"] = LoraConfig(**LORA)
    return case


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_matches_trl(name, model_dir, tmp_path):
    case = PARITY_CASES[name]
    evaluate = "eval_dataset" in case
    expected = train_logs(make_trainer(trl, model_dir, tmp_path / "trl", **_materialise(case)), evaluate)
    trainer = make_trainer(fused, model_dir, tmp_path / "fused", **_materialise(case))
    before = trainable_snapshot(trainer)
    assert_matches_trl(train_logs(trainer, evaluate), expected, before, trainer, num_logs=2 + evaluate)


def test_kernel_backends_agree(model_dir, tmp_path):
    assert_backends_agree(lambda backend: make_trainer(fused, model_dir, tmp_path / backend,
                                                       kernels=f"linear_logprobs={backend}"))


# The per-example loss of each backend, and the KL estimate's: a batch mean, so compiled (torch.compile of the
# reference) serves it for both compiled and triton.
LOSS_ENTRY_POINTS = {"reference": "fusedrl.ops.preference.reference.kto:kto_losses",
                     "compiled": "fusedrl.ops.preference.compiled:unpaired_losses",
                     "triton": "fusedrl.ops.preference.triton:unpaired_preference_losses"}
KL_ENTRY_POINTS = {"reference": "fusedrl.ops.preference.reference.kto:kto_kl_estimate",
                   "compiled": "fusedrl.ops.preference.compiled:traced_reference"}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
def test_selected_preference_backend_runs(backend, loss_type, model_dir, tmp_path, monkeypatch):
    loss_counts = count_calls(monkeypatch, LOSS_ENTRY_POINTS)
    kl_counts = count_calls(monkeypatch, {f"kl {name}": target for name, target in KL_ENTRY_POINTS.items()})
    loss, _ = first_step(make_trainer(fused, model_dir, tmp_path, loss_type=loss_type,
                                      kernels=f"all=reference,preference={backend}"))
    assert loss_counts == {name: int(name == backend) for name in LOSS_ENTRY_POINTS}
    kl_backend = f"kl {'reference' if backend == 'reference' else 'compiled'}"
    assert kl_counts == {name: int(name == kl_backend and loss_type == "kto") for name in kl_counts}
    assert torch.isfinite(loss)


def test_kl_pairs_rotate_within_each_batch(tmp_path):
    trainer = make_trainer(fused, tiny_llama(), tmp_path, per_device_train_batch_size=3)
    completions, kl = trainer.train_dataset["completion_ids"], trainer.train_dataset["KL_completion_ids"]
    assert kl == [completions[2], *completions[0:2], completions[5], *completions[3:5], completions[7], completions[6]]


BAD_DATA = {
    "label-not-bool": (lambda: unpaired().cast_column("label", Value("int64")),
                       r"row 0, field 'label': expected a bool"),
    "empty-completion": (lambda: unpaired().map(lambda row, i: {"completion": "" if i == 4 else row["completion"]},
                                                with_indices=True),
                         r"row 4, field 'completion': is empty"),
    "missing-label": (lambda: unpaired().remove_columns("label"), re.escape("missing column(s) ['label']")),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_rows_fail_at_construction(name, tmp_path):
    make_dataset, message = BAD_DATA[name]
    with pytest.raises(DatasetFormatError, match=message):
        make_trainer(fused, tiny_llama(), tmp_path, train=make_dataset())


BAD_CONFIGS = {
    "unknown-loss": ({"loss_type": "sigmoid"}, r"unknown loss_type 'sigmoid'"),
    "batch-of-one": ({"per_device_train_batch_size": 1}, r"per_device_train_batch_size > 1"),
    "random-sampling": ({"train_sampling_strategy": "random"}, r"train_sampling_strategy='sequential'"),
    "sync-with-precompute": ({"sync_ref_model": True, "precompute_ref_log_probs": True}, r"go stale"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_configs_fail_at_construction(name, tmp_path):
    overrides, message = BAD_CONFIGS[name]
    with pytest.raises(ValueError, match=message):
        make_trainer(fused, tiny_llama(), tmp_path, **overrides)


def test_config_has_trl_fields_and_defaults():
    assert_trl_fields(trl.KTOConfig, fused.KTOConfig)
