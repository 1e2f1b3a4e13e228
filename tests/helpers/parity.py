"""A fusedrl trainer and its TRL peer side by side: the shared settings, quiet training, and the comparisons of the
preference trainers' parity tests (tests/trainers/test_{dpo,orpo,cpo,kto}_trainer.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import warnings

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainingArguments

from fusedrl.trainers.config import FusedConfig
from tests.helpers.data import EVAL_PAIRS, LORA, conversational_pairs
from tests.utils import PAIR_ENTRY_POINTS, assert_close, count_calls

# Wall-clock and throughput entries differ between any two runs.
_UNTIMED = ("runtime", "per_second", "total_flos")


def base_settings(output_dir, **overrides) -> dict:
    """The config fields every preference parity run shares (2 steps of batch 4, lr 1e-3, fp32, seed 0)."""
    settings = {"output_dir": str(output_dir), "per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1,
                "learning_rate": 1e-3, "bf16": False, "report_to": [], "save_strategy": "no", "seed": 0,
                "max_length": 48, "disable_tqdm": True}
    settings.update(overrides)
    return settings


def materialise_pair_case(case: dict) -> dict:
    """A pairwise parity case (DPO, ORPO) with its placeholders (``train="conversational"``,
    ``eval_dataset="standard"``, ``peft_config="lora"``) replaced by the objects; a fresh copy per trainer."""
    case = dict(case)
    if case.get("train") == "conversational":
        case["train"] = conversational_pairs()
    if case.get("eval_dataset") == "standard":
        case["eval_dataset"] = Dataset.from_dict(EVAL_PAIRS)
    if case.get("peft_config") == "lora":
        case["peft_config"] = LoraConfig(**LORA)
    return case


def train_logs(trainer, evaluate: bool = False) -> list[dict[str, float]]:
    # Trainer prints every log line when tqdm is off; the logs themselves are in state.log_history.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
        if evaluate:
            trainer.evaluate()
    return [{k: v for k, v in entry.items() if k not in ("epoch", "learning_rate", "step")}
            for entry in trainer.state.log_history if "loss" in entry or "eval_loss" in entry]


def trainable_snapshot(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def first_step(trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


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

    def defaults(cls):
        return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls)}

    theirs, ours = defaults(trl_config), defaults(our_config)
    engine_fields = {f.name for f in dataclasses.fields(FusedConfig)}
    engine_fields -= {f.name for f in dataclasses.fields(TrainingArguments)}
    added = ours.keys() - theirs.keys()
    assert "kernels" in added and added <= engine_fields, added - engine_fields
    assert {k: ours.get(k) for k in theirs} == theirs


def assert_selected_backend_runs(make, reference: str, monkeypatch) -> None:
    """``make(backend)`` builds a trainer with ``kernels="...preference=<backend>"``; its first step must call that
    backend's loss once (``reference``: the reference formula's ``"module:function"``) and no other backend's."""
    for backend in ("reference", "compiled", "triton"):
        with monkeypatch.context() as patch:
            entry_points = {**PAIR_ENTRY_POINTS, "reference": reference}
            counts = count_calls(patch, entry_points)
            loss, _ = first_step(make(backend))
        assert counts == {name: int(name == backend) for name in entry_points}, backend
        assert torch.isfinite(loss)
