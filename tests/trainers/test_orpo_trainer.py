"""fusedrl.ORPOTrainer against trl.experimental.orpo.ORPOTrainer 1.16 (the peer) on a tiny Llama.

- parity: both trainers run 2 optimizer steps from the same checkpoint path, data, seed and config; every metric TRL
  logs must match to fp32 precision (tests/utils.assert_close: rtol = atol = 1e-5), the loss must be finite and every
  trainable tensor must have moved (standard and conversational data, answers cut by max_length, gradient
  accumulation with evaluation, PEFT);
- kernels: the reference and compiled backends give the same first-step loss and gradients through the trainer;
- bad rows fail at construction naming the row and the field; the config has TRL's fields and defaults.

:func:`assert_matches_trl` is shared with tests/trainers/test_cpo_trainer.py and tests/trainers/test_kto_trainer.py.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

import fusedrl.trainers as fused
from fusedrl.cli.presets.tokenizer import build_tokenizer
from fusedrl.trainers.data import DatasetFormatError
from tests.trainers.test_dpo_trainer import (
    CHOSEN,
    LORA,
    PROMPTS,
    REJECTED,
    conversational_pairs,
    standard_pairs,
    tiny_model,
    train_logs,
    trainable_snapshot,
)
from tests.utils import assert_close

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning: the peer is only compared against
    from trl.experimental import orpo as trl_orpo

# Wall-clock and throughput entries differ between any two runs.
_UNTIMED = ("runtime", "per_second", "total_flos")
EVAL_PAIRS = {"prompt": ["3+4=", "8-6=", "Twelve plus one:"], "chosen": ["7", "2", " 13"], "rejected": ["8", "14", " 11"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """The tiny Llama saved once; both trainers load it by path, as a TRL user would."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model().save_pretrained(path)
    return str(path)


def base_settings(output_dir, **overrides) -> dict:
    settings = {"output_dir": str(output_dir), "per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1,
                "learning_rate": 1e-3, "bf16": False, "report_to": [], "save_strategy": "no", "seed": 0,
                "max_length": 48, "disable_tqdm": True}
    settings.update(overrides)
    return settings


def assert_matches_trl(actual: list[dict], expected: list[dict], before: dict[str, torch.Tensor], trainer,
                       num_logs: int = 2) -> None:
    """Every metric TRL logged, fusedrl logged with the same value; finite losses; every trainable tensor moved."""
    assert len(actual) == len(expected) == num_logs
    for step, (ours, theirs) in enumerate(zip(actual, expected)):
        assert theirs.keys() <= ours.keys(), f"log {step}: fusedrl does not log {theirs.keys() - ours.keys()}"
        for key, value in theirs.items():
            if not any(part in key for part in _UNTIMED):
                assert_close(torch.tensor(ours[key]), torch.tensor(value), name=f"log {step} {key}")
    assert all(math.isfinite(entry["loss"]) for entry in actual if "loss" in entry)
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"trainable tensors that did not move in 2 steps: {unchanged}"


def first_step(trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def assert_backends_agree(make) -> None:
    """``make(backend)`` builds a trainer; the compiled and Triton (interpreter, set in conftest) backends must give
    the reference's first-step loss and gradients."""
    ref_loss, ref_grads = first_step(make("reference"))
    for backend in ("compiled", "triton"):
        loss, grads = first_step(make(backend))
        assert_close(loss, ref_loss, name=f"{backend} loss")
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            assert_close(grad, ref_grads[name], name=f"{backend} grad {name}")


def assert_trl_fields(trl_config, our_config) -> None:
    """Every field of the TRL config exists with TRL's default; fusedrl adds only the shared engine fields of
    ``FusedConfig`` (kernels, compile, offloading, memory, fault handling), never a field of its own per trainer."""
    from transformers import TrainingArguments

    from fusedrl.trainers.base import FusedConfig

    def defaults(cls):
        return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls)}

    theirs, ours = defaults(trl_config), defaults(our_config)
    engine_fields = {f.name for f in dataclasses.fields(FusedConfig)}
    engine_fields -= {f.name for f in dataclasses.fields(TrainingArguments)}
    added = ours.keys() - theirs.keys()
    assert "kernels" in added and added <= engine_fields, added - engine_fields
    assert {k: ours.get(k) for k in theirs} == theirs


# ------------------------------------------------------------------------------------------------------------------


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


def _materialise(case: dict) -> dict:
    case = dict(case)
    if case.get("train") == "conversational":
        case["train"] = conversational_pairs()
    if case.get("eval_dataset") == "standard":
        case["eval_dataset"] = Dataset.from_dict(EVAL_PAIRS)
    if case.get("peft_config") == "lora":
        case["peft_config"] = LoraConfig(**LORA)
    return case


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_matches_trl(name, model_dir, tmp_path):
    case = PARITY_CASES[name]
    evaluate = "eval_dataset" in case
    expected = train_logs(make_trainer(trl_orpo, model_dir, tmp_path / "trl", **_materialise(case)), evaluate)
    trainer = make_trainer(fused, model_dir, tmp_path / "fused", **_materialise(case))
    before = trainable_snapshot(trainer)
    assert_matches_trl(train_logs(trainer, evaluate), expected, before, trainer, num_logs=2 + evaluate)


def test_kernel_backends_agree(model_dir, tmp_path):
    assert_backends_agree(lambda backend: make_trainer(fused, model_dir, tmp_path / backend,
                                                       kernels=f"linear_logprobs={backend}"))


def test_prompt_filling_max_length_is_dropped(tmp_path):
    """TRL keeps such a row with an empty answer (its mean log-prob is 0/0 = NaN); fusedrl drops it."""
    trainer = make_trainer(fused, tiny_model(), tmp_path, max_length=20)
    prompts = [p for p in PROMPTS if len(build_tokenizer()(p)["input_ids"]) >= 20]
    assert prompts and len(trainer.train_dataset) == len(PROMPTS) - len(prompts)
    assert all(len(row["chosen_prompt_ids"]) + len(row["chosen_ids"]) <= 20 for row in trainer.train_dataset)


def _rows(**columns) -> Dataset:
    rows = {"prompt": list(PROMPTS), "chosen": list(CHOSEN), "rejected": list(REJECTED)}
    rows.update(columns)
    return Dataset.from_dict({k: v for k, v in rows.items() if v is not None})


BAD_DATA = {
    "missing-column": (lambda: _rows(chosen=None), r"missing column\(s\) \['chosen'\]"),
    "empty-rejected": (lambda: _rows(rejected=[*REJECTED[:2], " ", *REJECTED[3:]]),
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
        make_trainer(fused, tiny_model(), tmp_path, train=make_dataset())


def test_refused_arguments(tmp_path):
    with pytest.raises(ValueError, match="generate_during_eval"):
        make_trainer(fused, tiny_model(), tmp_path, generate_during_eval=True)
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        make_trainer(fused, tiny_model(), tmp_path, kernels="linear_logprobs=fast")


def test_config_has_trl_fields_and_defaults():
    assert_trl_fields(trl_orpo.ORPOConfig, fused.ORPOConfig)
