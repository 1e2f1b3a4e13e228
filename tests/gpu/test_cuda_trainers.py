"""Every trainer, two optimizer steps on a CUDA device with the default kernels (Triton there), fp32 and bf16.

- fp32: the kernels really ran on Triton (launches counted per op at ``dispatch.run_with_fallback``, through which
  every Triton launch of a ``define_op`` custom op goes) and none failed to build (a default selection would fall
  back to ``compiled`` silently, bar one log line); the first step's loss and gradient norm equal those of the same
  run with ``kernels="all=reference"`` (same model, data, seed, hence the same sampled completions for the online
  trainers); every loss is finite and the LM head moves;
- bf16 (``bf16=True`` autocast with fp32 weights, and a model loaded in bf16): finite losses and gradient norms,
  Triton ran, nothing fell back; for the preference trainers, whose data is fixed, the first loss is within bf16
  tolerance of the fp32 reference run's.

The tiny preset model and the bundled arithmetic data, as the CPU trainer tests; the launch counts per op go to the
test report (``record_property``), and from there into ``fusedrl gpu-check``'s results file.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from fusedrl import trainers
from fusedrl.cli import presets
from fusedrl.ops import dispatch
from tests.helpers.online import char_reward, train_quietly
from tests.utils import assert_close

pytestmark = pytest.mark.cuda

COMMON = {"max_steps": 2, "logging_steps": 1, "learning_rate": 1e-3, "report_to": "none", "save_strategy": "no",
          "disable_tqdm": True, "gradient_checkpointing": False, "dataloader_pin_memory": False, "seed": 0}
# name: (trainer, config, dataset kind, config fields of this trainer, takes reward functions)
TRAINERS = {
    "dpo": ("DPOTrainer", "DPOConfig", "preference", {"per_device_train_batch_size": 4, "max_length": 48}, False),
    "orpo": ("ORPOTrainer", "ORPOConfig", "preference", {"per_device_train_batch_size": 4, "max_length": 48}, False),
    "cpo": ("CPOTrainer", "CPOConfig", "preference", {"per_device_train_batch_size": 4, "max_length": 48}, False),
    "kto": ("KTOTrainer", "KTOConfig", "unpaired", {"per_device_train_batch_size": 4, "max_length": 48}, False),
    "grpo": ("GRPOTrainer", "GRPOConfig", "prompt",
             {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8, "beta": 0.04}, True),
    "rloo": ("RLOOTrainer", "RLOOConfig", "prompt",
             {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8}, True),
    "ppo": ("PPOTrainer", "PPOConfig", "prompt",
            {"per_device_train_batch_size": 4, "num_mini_batches": 1, "num_ppo_epochs": 1, "response_length": 8}, True),
    "online-dpo": ("OnlineDPOTrainer", "OnlineDPOConfig", "prompt",
                   {"per_device_train_batch_size": 4, "max_new_tokens": 8}, True),
}
PREFERENCE = ("dpo", "orpo", "cpo", "kto")


@pytest.fixture
def triton_launches(monkeypatch) -> Counter:
    """Successful Triton launches per op from now on; the run-time fallback state starts empty (and is checked
    empty by the tests: a kernel that failed to build would have run ``compiled`` instead)."""
    counts: Counter = Counter()
    original = dispatch.run_with_fallback

    def spy(op, triton_fn, fallback_fn, *args, **kwargs):
        def launched(*inner_args, **inner_kwargs):
            result = triton_fn(*inner_args, **inner_kwargs)
            counts[op] += 1
            return result

        return original(op, launched, fallback_fn, *args, **kwargs)

    monkeypatch.setattr(dispatch, "run_with_fallback", spy)
    monkeypatch.setattr(dispatch, "_failed_triton", {})
    return counts


def _train(name: str, output_dir, *, model_dtype=torch.float32, **fields):
    """``name`` trained for ``max_steps`` on the tiny preset: (its logged entries with a loss, the head's weight
    before, the trainer)."""
    trainer_name, config_name, kind, own_fields, takes_rewards = TRAINERS[name]
    tokenizer = presets.build_tokenizer()
    model = presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer).to(model_dtype)
    config = getattr(trainers, config_name)(output_dir=str(output_dir), **{**COMMON, **own_fields, **fields})
    data = presets.load_preset_dataset("arithmetic", kind=kind, n=32, seed=0)
    extra = {}
    if takes_rewards:
        extra["reward_funcs"] = [presets.answer_reward, char_reward] if name in ("grpo", "rloo") else [char_reward]
    trainer = getattr(trainers, trainer_name)(model, args=config, train_dataset=data, processing_class=tokenizer,
                                              **extra)
    head_before = trainer.model.get_output_embeddings().weight.detach().clone()
    return train_quietly(trainer), head_before, trainer


def _check_run(logs, head_before, trainer, device) -> None:
    assert trainer.accelerator.device.type == device.type
    assert len(logs) == COMMON["max_steps"], logs
    for entry in logs:
        assert math.isfinite(entry["loss"]), entry
        assert "grad_norm" not in entry or math.isfinite(entry["grad_norm"]), entry
    head_after = trainer.model.get_output_embeddings().weight.detach()
    assert not torch.equal(head_after.to(head_before.dtype), head_before), "the LM head did not move"


@pytest.mark.parametrize("name", list(TRAINERS))
def test_default_kernels_train_and_match_reference(device, compiled_triton, triton_launches, record_property,
                                                   tmp_path, name):
    logs, head_before, trainer = _train(name, tmp_path / "default", bf16=False)
    record_property("triton_launches", dict(triton_launches))
    _check_run(logs, head_before, trainer, device)
    assert sum(triton_launches.values()) > 0, "no Triton kernel ran with the default selection on CUDA"
    assert dispatch._failed_triton == {}, dispatch._failed_triton
    reference, _, _ = _train(name, tmp_path / "reference", bf16=False, kernels="all=reference")
    # Same model, data and seed: the first step sees the same batch (and the same samples); the fused head sums
    # its chunks in another order than the full-logits reference, and the tiny model's embedding gradients
    # accumulate with atomics on CUDA, hence fp32 rounding (rtol 1e-4) rather than bitwise.
    for key in ("loss", "grad_norm"):
        if key in reference[0]:
            assert_close(torch.tensor(logs[0][key]), torch.tensor(reference[0][key]), name=f"step 1 {key}",
                         rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["autocast", "bf16-weights"])
@pytest.mark.parametrize("name", list(TRAINERS))
def test_bf16_steps(device, compiled_triton, triton_launches, needs_dtype, record_property, tmp_path, name,
                    precision):
    needs_dtype(torch.bfloat16)
    model_dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    logs, head_before, trainer = _train(name, tmp_path / "bf16", bf16=True, model_dtype=model_dtype)
    record_property("triton_launches", dict(triton_launches))
    _check_run(logs, head_before, trainer, device)
    assert sum(triton_launches.values()) > 0, "no Triton kernel ran with the default selection on CUDA"
    assert dispatch._failed_triton == {}, dispatch._failed_triton
    if name in PREFERENCE:
        reference, _, _ = _train(name, tmp_path / "fp32", bf16=False, kernels="all=reference")
        assert_close(torch.tensor(logs[0]["loss"]), torch.tensor(reference[0]["loss"]), dtype=torch.bfloat16,
                     name="step 1 loss, bf16 vs fp32")
