"""``compute_metrics`` as TRL 1.16 feeds it (issue 14, cause 1): DPO and KTO pass the policy's ``[N, T, V]`` logits of
the eval batches' ``input_ids`` (built only when compute_metrics is set), ORPO and CPO ``[logits/chosen,
logits/rejected]`` per batch."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import fusedrl
from fusedrl.cli.presets import build_tokenizer
from tests.helpers.data import CHOSEN, EVAL_PAIRS, PROMPTS, REJECTED, standard_pairs


def _unpaired(prompts, chosen, rejected) -> Dataset:
    return Dataset.from_dict({"prompt": list(prompts) * 2, "completion": list(chosen) + list(rejected),
                              "label": [True] * len(chosen) + [False] * len(rejected)})


def _trainer(method, model_dir, tmp_path, compute_metrics):
    train, evaluation = standard_pairs(), Dataset.from_dict(EVAL_PAIRS)
    if method == "KTO":
        train = _unpaired(PROMPTS, CHOSEN, REJECTED)
        evaluation = _unpaired(EVAL_PAIRS["prompt"], EVAL_PAIRS["chosen"], EVAL_PAIRS["rejected"])
    args = getattr(fusedrl, f"{method}Config")(str(tmp_path), per_device_eval_batch_size=2, report_to=[], bf16=False,
                                               use_cpu=True)
    return getattr(fusedrl, f"{method}Trainer")(
        AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=train, eval_dataset=evaluation,
        processing_class=build_tokenizer(), compute_metrics=compute_metrics)


def _recording(value: float):
    """A compute_metrics that keeps what it is given and returns ``{"test": value}``."""
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        return {"test": value}

    return seen, compute_metrics


@pytest.mark.parametrize("method", ["DPO", "KTO"])
def test_logits_of_every_eval_row_reach_compute_metrics(method, model_dir, tmp_path):
    seen, compute_metrics = _recording(0.5)
    trainer = _trainer(method, model_dir, tmp_path, compute_metrics)
    metrics = trainer.evaluate()
    assert metrics["eval_test"] == 0.5 and len(seen) == 1
    logits, input_ids = seen[0].predictions, seen[0].label_ids
    assert logits.shape[:2] == input_ids.shape and logits.shape[2] == trainer.model.config.vocab_size
    # The first row, against the model's own logits of it, without its right padding (pad id 0 in the batch, -100
    # where Trainer padded a shorter batch).
    row = torch.as_tensor(input_ids[0])
    row = row[: int(((row != -100) & (row != 0)).nonzero().max()) + 1].unsqueeze(0)
    with torch.no_grad():
        expected = trainer.model(input_ids=row).logits[0]
    torch.testing.assert_close(torch.as_tensor(logits[0, :row.shape[1]]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ORPO", "CPO"])
def test_mean_logits_reach_compute_metrics(method, model_dir, tmp_path):
    seen, compute_metrics = _recording(0.0)
    trainer = _trainer(method, model_dir, tmp_path, compute_metrics)
    metrics = trainer.evaluate()
    # 3 pairs in batches of 2: [logits/chosen, logits/rejected] per batch, concatenated and cut to the 3 samples by
    # Trainer (as for TRL): [chosen 1, rejected 1, chosen 2].
    predictions = torch.as_tensor(seen[0].predictions)
    assert predictions.shape == (3,)
    assert metrics["eval_logits/chosen"] == pytest.approx((predictions[0] + predictions[2]).item() / 2, rel=1e-5)
    assert metrics["eval_test"] == 0.0


def test_no_logits_are_built_without_compute_metrics(model_dir, tmp_path, monkeypatch):
    trainer = _trainer("DPO", model_dir, tmp_path, None)
    monkeypatch.setattr(trainer, "sequence_logits", lambda *args: pytest.fail("logits built without a reader"))
    assert "eval_loss" in trainer.evaluate()
