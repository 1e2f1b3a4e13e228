"""Errors raised with TRL 1.16's exception types and first words, where TRL's own tests pin them (issue 14, cause
3), fusedrl's detail after them."""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM

import fusedrl
from fusedrl.cli import presets
from fusedrl.cli.presets import build_tokenizer
from tests.helpers.data import CHOSEN, EVAL_PAIRS, PROMPTS, REJECTED, standard_pairs
from tests.helpers.online import char_reward


def _config(method: str, tmp_path, **overrides):
    return getattr(fusedrl, f"{method}Config")(str(tmp_path), report_to=[], bf16=False, use_cpu=True, max_steps=1,
                                               per_device_train_batch_size=2, **overrides)


def _unpaired() -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS * 2, "completion": CHOSEN + REJECTED,
                              "label": [True] * 8 + [False] * 8})


@pytest.mark.parametrize(("method", "dataset"), [("DPO", standard_pairs), ("KTO", _unpaired)])
def test_precompute_with_an_iterable_dataset(method, dataset, model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^`precompute_ref_log_probs=True` is not supported with IterableDataset"):
        getattr(fusedrl, f"{method}Trainer")(
            AutoModelForCausalLM.from_pretrained(model_dir), args=_config(method, tmp_path,
                                                                          precompute_ref_log_probs=True),
            train_dataset=dataset().to_iterable_dataset(), processing_class=build_tokenizer())


def test_precompute_for_a_new_eval_dataset_after_training(model_dir, tmp_path):
    trainer = fusedrl.DPOTrainer(AutoModelForCausalLM.from_pretrained(model_dir),
                                 args=_config("DPO", tmp_path, precompute_ref_log_probs=True),
                                 train_dataset=standard_pairs(), processing_class=build_tokenizer())
    trainer.train()
    with pytest.raises(ValueError, match=r"^Cannot compute reference log-probs for a dataset passed to `evaluate\(\)`"):
        trainer.evaluate(Dataset.from_dict(EVAL_PAIRS))


@pytest.mark.parametrize("method", ["DPO", "KTO", "ORPO", "CPO", "GRPO"])
def test_train_dataset_is_required(method, model_dir, tmp_path):
    extra = {"reward_funcs": [char_reward]} if method == "GRPO" else {}
    overrides = {"num_generations": 2} if method == "GRPO" else {}
    with pytest.raises(ValueError, match=r"^`train_dataset` is required"):
        getattr(fusedrl, f"{method}Trainer")(AutoModelForCausalLM.from_pretrained(model_dir),
                                             args=_config(method, tmp_path, **overrides), train_dataset=None,
                                             processing_class=build_tokenizer(), **extra)


def test_reward_processing_classes_must_match(tmp_path):
    tokenizer = presets.build_tokenizer()
    with pytest.raises(ValueError, match=r"^The number of reward processing classes \(2\) must match the number of "
                                         r"reward functions \(1\)"):
        fusedrl.RLOOTrainer(presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer), reward_funcs=[char_reward],
                            args=_config("RLOO", tmp_path, num_generations=2),
                            train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=4),
                            processing_class=tokenizer, reward_processing_classes=[tokenizer, tokenizer])
