"""fusedrl.DPOTrainer against trl.DPOTrainer 1.16 (the peer) on a tiny Llama, plus its own guarantees.

- parity: for every loss type TRL ships (and the options around them: MPO weights, LD-DPO, WPO, f-divergences,
  conversational data, truncation, gradient accumulation, evaluation, PEFT, precomputed reference), both trainers
  run 2 optimizer steps from the same checkpoint, data, seed and config; every metric TRL logs must match to fp32
  precision (tests/utils.assert_close: rtol = atol = 1e-5), the loss must be finite and every trainable tensor must
  have moved;
- kernels: the reference, compiled and Triton (interpreted on CPU) backends give the same first-step loss and
  gradients through the trainer, and ``kernels="preference=..."`` runs that backend's loss and no other (counted
  calls of the reference formula, the compiled stages and the Triton entry point; batch-coupled types too);
- PEFT: the reference is the base model with adapters disabled, or a frozen copy of a pretrained adapter;
- precomputed reference log-probs give the same trajectory as the live reference, with no reference model kept;
- bad rows and bad configs fail at construction, naming the row and the field;
- a golden loss trajectory (tests/golden/dpo_tiny_sigmoid.json; FUSEDRL_UPDATE_GOLDEN=1 rewrites it).

The model (tests/helpers/models.tiny_llama: hidden 48, 2 layers, vocab 128, 64 positions) is saved once per session
(the ``model_dir`` fixture, tests/trainers/conftest.py) and loaded by path by both trainers, as a TRL user would; TRL
reloads its reference from that path, fusedrl copies the loaded policy.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import trl
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import fusedrl.trainers as fused
from fusedrl.cli.presets.tokenizer import build_tokenizer
from fusedrl.ops import dispatch as registry
from fusedrl.ops.preference.reference import DPO_LOSS_TYPES
from fusedrl.trainers.data import DatasetFormatError
from fusedrl.trainers.head import IGNORE_INDEX
from tests.helpers.data import CHOSEN, LORA, PROMPTS, conversational_pairs, pair_rows, standard_pairs
from tests.helpers.models import tiny_llama
from tests.helpers.parity import (
    assert_trl_fields,
    base_settings,
    first_step,
    materialise_pair_case,
    train_logs,
    trainable_snapshot,
)
from tests.utils import PAIR_ENTRY_POINTS, assert_close, count_calls

GOLDEN = Path(__file__).parents[1] / "golden" / "dpo_tiny_sigmoid.json"

def make_trainer(module, model, output_dir, *, train=None, eval_dataset=None, peft_config=None, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.DPOTrainer(model=model, args=module.DPOConfig(**base_settings(output_dir, **overrides)),
                                 train_dataset=standard_pairs() if train is None else train,
                                 eval_dataset=eval_dataset, processing_class=build_tokenizer(),
                                 peft_config=peft_config)


# ------------------------------------------------------------------------------------------------------------------
# Parity with TRL
# ------------------------------------------------------------------------------------------------------------------

# The loss types TRL 1.16 documents in DPOConfig.loss_type's help text: each gets its own parity case.
TRL_LOSS_TYPES = sorted(set(re.findall(r"`'(\w+)'`", trl.DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])))
assert len(TRL_LOSS_TYPES) == 15 and set(TRL_LOSS_TYPES) == set(DPO_LOSS_TYPES)
PARITY_CASES = {loss_type: {"loss_type": [loss_type]} for loss_type in TRL_LOSS_TYPES}
PARITY_CASES["exo_pair"]["label_smoothing"] = 1e-3  # TRL requires it
PARITY_CASES.update({
    "robust-smoothed": {"loss_type": ["robust"], "label_smoothing": 0.1},
    "aot-smoothed": {"loss_type": ["aot"], "label_smoothing": 0.1},
    "mpo-weights": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    "ld_alpha": {"ld_alpha": 0.5},
    "wpo": {"loss_type": ["sigmoid", "ipo"], "use_weighting": True},
    "forward_kl": {"f_divergence_type": "forward_kl"},
    "js_divergence-hinge": {"loss_type": ["hinge"], "f_divergence_type": "js_divergence"},
    "alpha_divergence-ipo": {"loss_type": ["ipo"], "f_divergence_type": "alpha_divergence"},
    "conversational": {"train": "conversational"},
    "keep_start-20": {"max_length": 20},
    "keep_end-20": {"max_length": 20, "truncation_mode": "keep_end"},
    "no-truncation": {"max_length": None},
    "grad-accumulation": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
    "no-checkpointing-eval": {"gradient_checkpointing": False, "eval_dataset": "standard"},
    "peft-lora": {"peft_config": "lora"},
    "sync_ref_model": {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5},
    "precompute": {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 3},
})


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_matches_trl(name, model_dir, tmp_path):
    """Both trainers from the same checkpoint path: every metric TRL logs, fusedrl logs with the same value."""
    case = PARITY_CASES[name]
    evaluate = "eval_dataset" in case
    expected = train_logs(make_trainer(trl, model_dir, tmp_path / "trl", **materialise_pair_case(case)), evaluate)
    trainer = make_trainer(fused, model_dir, tmp_path / "fused", **materialise_pair_case(case))
    before = trainable_snapshot(trainer)
    actual = train_logs(trainer, evaluate)

    assert len(actual) == len(expected) == 2 + evaluate  # 2 steps (+ the evaluation)
    for step, (ours, theirs) in enumerate(zip(actual, expected)):
        assert theirs.keys() <= ours.keys(), f"step {step}: fusedrl does not log {theirs.keys() - ours.keys()}"
        for key, value in theirs.items():
            if "runtime" in key or "per_second" in key or key == "total_flos":
                continue
            assert_close(torch.tensor(ours[key]), torch.tensor(value), name=f"step {step} {key}")
    assert all(math.isfinite(entry["loss"]) for entry in actual[:2])
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"trainable tensors that did not move in 2 steps: {unchanged}"


# ------------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------------


# Batch-coupled types: the compiled backend is torch.compile of the reference (compiled.traced_reference).
COUPLED_ENTRY_POINTS = {**PAIR_ENTRY_POINTS, "compiled": "fusedrl.ops.preference.compiled:traced_reference"}


@pytest.mark.parametrize("loss_type", ["sigmoid", "aot"])
@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
def test_selected_preference_backend_runs(backend, loss_type, model_dir, tmp_path, monkeypatch):
    """One step under ``kernels="preference=<backend>"`` calls that backend's loss once and no other backend's.
    ``aot`` sorts the batch, which the per-pair Triton kernel cannot fuse: under ``triton`` it runs compiled."""
    entry_points = PAIR_ENTRY_POINTS if loss_type == "sigmoid" else COUPLED_ENTRY_POINTS
    counts = count_calls(monkeypatch, entry_points)
    trainer = make_trainer(fused, model_dir, tmp_path, loss_type=[loss_type], max_steps=1,
                           kernels=f"all=reference,preference={backend}")
    logs = train_logs(trainer)
    ran = "compiled" if (backend, loss_type) == ("triton", "aot") else backend
    assert counts == {name: int(name == ran) for name in entry_points}
    assert math.isfinite(logs[0]["loss"])


def test_kernel_backends_agree(model_dir, tmp_path):
    """The trainer's ``kernels`` selection reaches the op; every backend gives the reference's loss and gradients."""
    backends = ["reference", "compiled"] + (["triton"] if registry.triton_importable() else [])
    results = {}
    for backend in backends:
        trainer = make_trainer(fused, model_dir, tmp_path / backend, kernels=f"linear_logprobs={backend}")
        with trainer.compute_loss_context_manager():
            assert registry.resolve("linear_logprobs", "cpu") == backend
        results[backend] = first_step(trainer)
    expected_loss, expected_grads = results["reference"]
    for backend in backends[1:]:
        loss, grads = results[backend]
        assert_close(loss, expected_loss, name=f"{backend} loss")
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert_close(grad, expected_grads[name], name=f"{backend} grad {name}")


# ------------------------------------------------------------------------------------------------------------------
# Reference model: PEFT, precompute
# ------------------------------------------------------------------------------------------------------------------


def _batch_logps(trainer, model) -> torch.Tensor:
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader(trainer.train_dataset))))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        return trainer.token_logprobs(model, inputs, labels).logps


def _perturb_adapter(model, adapter: str = "default") -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                param.normal_(0.0, 0.5)


def test_peft_reference_is_base_with_adapters_disabled(model_dir, tmp_path):
    trainer = make_trainer(fused, model_dir, tmp_path, peft_config=LoraConfig(**LORA))
    assert trainer.ref_model is None
    _perturb_adapter(trainer.model)  # the policy now differs from the base
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with trainer.reference_context() as reference:
        ref_logps = _batch_logps(trainer, reference)
    assert_close(ref_logps, _batch_logps(trainer, base), name="reference = base")
    assert not torch.allclose(_batch_logps(trainer, trainer.model), ref_logps)


def test_pretrained_adapter_gets_frozen_reference_copy(model_dir, tmp_path):
    """A PeftModel passed as the policy: the reference is a frozen copy of its adapter (named "ref"), not the base."""
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**LORA))
    _perturb_adapter(policy)
    trainer = make_trainer(fused, policy, tmp_path)
    assert trainer.ref_model is None and "ref" in trainer.model.peft_config
    ref_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".ref." in n}
    assert ref_before and not any(trainer.model.get_parameter(n).requires_grad for n in ref_before)
    with trainer.reference_context() as reference:
        ref_logps = _batch_logps(trainer, reference)
    assert_close(ref_logps, _batch_logps(trainer, trainer.model), name="reference = initial adapter")

    logs = train_logs(trainer)
    assert logs[0]["rewards/chosen"] == logs[0]["rewards/rejected"] == 0.0  # step 1: policy == reference
    for name, value in ref_before.items():
        assert torch.equal(trainer.model.get_parameter(name), value), f"{name} moved"
    assert trainer.model.active_adapter == "default"


def test_precompute_matches_live_reference(model_dir, tmp_path):
    live = train_logs(make_trainer(fused, model_dir, tmp_path / "live"))
    trainer = make_trainer(fused, model_dir, tmp_path / "pre", precompute_ref_log_probs=True)
    assert trainer.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
    precomputed = train_logs(trainer)
    for step, (ours, theirs) in enumerate(zip(precomputed[:2], live[:2])):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert_close(torch.tensor(ours[key]), torch.tensor(theirs[key]), name=f"step {step} {key}")


# ------------------------------------------------------------------------------------------------------------------
# Fail fast
# ------------------------------------------------------------------------------------------------------------------


def _with(values: list, index: int, value) -> list:
    values = list(values)
    values[index] = value
    return values


BAD_DATA = {
    "missing-column": (lambda: pair_rows(rejected=None), {}, r"missing column\(s\) \['rejected'\]"),
    "empty-chosen": (lambda: pair_rows(chosen=_with(CHOSEN, 3, "")), {}, r"row 3, field 'chosen': is empty"),
    "non-string-content": (
        lambda: conversational_pairs().map(
            lambda row, i: {"rejected": [{"role": "assistant", "content": None if i == 5 else "7"}]},
            with_indices=True),
        {}, r"row 5, field 'rejected', message 0: 'content' must be a string, got None"),
    "mixed-formats": (lambda: pair_rows(chosen=[[{"role": "assistant", "content": c}] for c in CHOSEN]), {},
                      r"row 0: fields mix formats"),
    "too-long-without-truncation": (lambda: pair_rows(prompt=_with(PROMPTS, 6, "1+" * 40 + "1=")), {"max_length": None},
                                    r"row 6, field 'chosen'.*longer than.*64 positions"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_rows_fail_at_construction(name, tmp_path):
    make_dataset, overrides, message = BAD_DATA[name]
    with pytest.raises(DatasetFormatError, match=message):
        make_trainer(fused, tiny_llama(), tmp_path, train=make_dataset(), **overrides)


BAD_CONFIGS = {
    "unknown-loss": ({"loss_type": ["simpo"]}, r"unknown loss_type \['simpo'\]"),
    "exo-without-smoothing": ({"loss_type": ["exo_pair"]}, r"'exo_pair' needs label_smoothing > 0"),
    "f-divergence-on-bco": ({"loss_type": ["bco_pair"], "f_divergence_type": "forward_kl"}, r"only applies to"),
    "kernel-typo": ({"kernels": "linear_logprobs=fast"}, r"unknown backend 'fast'"),
    "sync-with-precompute": ({"sync_ref_model": True, "precompute_ref_log_probs": True}, r"go stale"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_configs_fail_at_construction(name, tmp_path):
    overrides, message = BAD_CONFIGS[name]
    with pytest.raises(ValueError, match=message):
        make_trainer(fused, tiny_llama(), tmp_path, **overrides)


def test_config_has_trl_fields_and_defaults():
    """Every trl.DPOConfig field exists with TRL's default; fusedrl adds only the shared engine fields."""
    assert_trl_fields(trl.DPOConfig, fused.DPOConfig)


# ------------------------------------------------------------------------------------------------------------------
# Golden trajectory
# ------------------------------------------------------------------------------------------------------------------


def test_golden_loss_trajectory(tmp_path):
    """4 sigmoid steps of the tiny model (seed 0, batch 4, lr 1e-3) against the stored trajectory."""
    trainer = make_trainer(fused, tiny_llama(), tmp_path, max_steps=4)
    losses = [entry["loss"] for entry in train_logs(trainer)[:4]]
    if os.environ.get("FUSEDRL_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"loss": losses}, indent=1) + "\n")
    assert_close(torch.tensor(losses), torch.tensor(json.loads(GOLDEN.read_text())["loss"]), name="loss trajectory")
