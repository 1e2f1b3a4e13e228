"""fusedrl.GRPOTrainer against trl.GRPOTrainer 1.16 (the peer) on the tiny preset model, plus its own guarantees.

- parity: both trainers start from the same saved checkpoint, data, seed and config and run 2 optimizer steps;
  sampling draws from the same RNG stream, so the completions are identical (checked through the completion-length
  and reward metrics) and every metric TRL logs (loss, grad_norm, kl, entropy, clip ratios, rewards/<name>/mean,
  reward_std, frac_reward_zero_std, completions/*) must match to 1e-5 relative; across loss types, the KL with
  TRL's ratio-weighted estimate, several iterations per round (old log-probs), GSPO, gradient accumulation,
  conversational prompts, both multi-objective aggregations, masked truncated completions, top-entropy masking;
- PEFT: the reference is the adapter-disabled policy; only adapters move;
- a golden loss/reward trajectory (tests/golden/grpo_tiny.json; FUSEDRL_UPDATE_GOLDEN=1 rewrites it);
- bad configs and datasets fail at construction naming the field.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import trl
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from fusedrl.cli import presets
from fusedrl.trainers import GRPOConfig, GRPOTrainer
from tests.helpers.online import char_reward
from tests.utils import assert_close, spy_policy_backends

GOLDEN = Path(__file__).parents[1] / "golden" / "grpo_tiny.json"
TOKENIZER = presets.build_tokenizer()
BASE = {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 5, "max_steps": 2,
        "logging_steps": 1, "learning_rate": 1e-2, "bf16": False, "activation_checkpointing": False,
        "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "dataloader_pin_memory": False, "seed": 3}
IGNORED = {"step_time", "memory/peak_rss_mb", "epoch", "step"}


def _data(conversational=False, n=48):
    return presets.load_preset_dataset("arithmetic", kind="prompt", n=n, seed=1, conversational=conversational)


def _run(trainer_cls, config_cls, model_path, tmp_path, *, conversational=False, rewards=None, peft_config=None,
         kernels="all=reference", **fields):
    config = config_cls(str(tmp_path / trainer_cls.__module__.split(".")[0]), **{**BASE, **fields})
    if trainer_cls is GRPOTrainer:
        config.kernels = kernels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(AutoModelForCausalLM.from_pretrained(model_path),
                              reward_funcs=rewards or [presets.answer_reward, char_reward], args=config,
                              train_dataset=_data(conversational), processing_class=TOKENIZER,
                              peft_config=peft_config)
        before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
    moved = {name for name, p in trainer.model.named_parameters() if name in before and not torch.equal(p, before[name])}
    return [entry for entry in trainer.state.log_history if "loss" in entry], moved, set(before)


CASES = {
    "dapo_round_over_two_steps": {"steps_per_generation": 2, "per_device_train_batch_size": 4},
    "grpo_kl_two_iterations_masked_entropy_delta": {"loss_type": "grpo", "beta": 0.1, "num_iterations": 2,
                                                    "mask_truncated_completions": True, "top_entropy_quantile": 0.5,
                                                    "delta": 1.5, "max_completion_length": 8},
    "bnpo_batch_scale_gspo": {"loss_type": "bnpo", "scale_rewards": "batch", "importance_sampling_level": "sequence",
                              "num_iterations": 2, "epsilon_high": 0.28, "beta": 0.05, "use_bias_correction_kl": False},
    "dr_grpo_accumulation_conversational": {"loss_type": "dr_grpo", "gradient_accumulation_steps": 2,
                                            "per_device_train_batch_size": 4, "conversational": True,
                                            "multi_objective_aggregation": "normalize_then_sum",
                                            "reward_weights": [1.0, 0.5], "scale_rewards": "none"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_trl(preset_model_dir, tmp_path, case):
    fields = dict(CASES[case])
    ours, moved, trainable = _run(GRPOTrainer, GRPOConfig, preset_model_dir, tmp_path, **fields)
    theirs, _, _ = _run(trl.GRPOTrainer, trl.GRPOConfig, preset_model_dir, tmp_path, **fields)
    assert len(ours) == len(theirs) == 2
    for step, (mine, peer) in enumerate(zip(ours, theirs, strict=True), start=1):
        names = set(peer) - IGNORED
        assert names <= set(mine), f"step {step}: metrics TRL logs but fusedrl does not: {names - set(mine)}"
        for name in sorted(names):
            if peer[name] is None:
                continue
            assert math.isfinite(mine[name]), f"step {step} {name} = {mine[name]}"
            assert_close(torch.tensor(mine[name]), torch.tensor(peer[name]), name=f"step {step} {name}",
                         rtol=1e-5, atol=1e-6)
    assert moved == trainable, f"parameters that never moved: {sorted(trainable - moved)}"


def test_peft_reference_is_the_adapter_disabled_policy(preset_model_dir, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    logs, moved, trainable = _run(GRPOTrainer, GRPOConfig, preset_model_dir, tmp_path, beta=0.1, peft_config=lora,
                                  num_iterations=2)
    assert trainable and all("lora_" in name for name in trainable)
    assert moved == trainable
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # policy == base before the first update
    assert logs[-1]["kl"] > 0.0 and all(math.isfinite(entry["loss"]) for entry in logs)


@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
def test_policy_loss_flag_selects_what_runs(preset_model_dir, tmp_path, monkeypatch, backend):
    """One step, one micro-batch, beta != 0 with the ratio-weighted KL: the selected implementation of the
    policy-loss op (spied on in its module) runs once and the others never; the reference aggregation runs twice
    on reference (the loss and the KL term), never on the fast backends (the KL term uses their per-row weights)."""
    from fusedrl.ops.policy import reference

    spies = spy_policy_backends(monkeypatch)
    aggregate = mock.Mock(wraps=reference.aggregate)
    monkeypatch.setattr(reference, "aggregate", aggregate)
    logs, _, _ = _run(GRPOTrainer, GRPOConfig, preset_model_dir, tmp_path, beta=0.1, max_steps=1,
                      kernels=f"all=reference,policy_loss={backend}")
    assert math.isfinite(logs[0]["loss"]) and math.isfinite(logs[0]["kl"])
    assert {key: spy.call_count for key, spy in spies.items()} == {key: int(key == backend) for key in spies}
    assert aggregate.call_count == (2 if backend == "reference" else 0)


def test_golden_trajectory(preset_model_dir, tmp_path):
    """The first 3 steps' loss, reward and mean length on the reference backend (CPU, fp32)."""
    logs, _, _ = _run(GRPOTrainer, GRPOConfig, preset_model_dir, tmp_path, beta=0.04, max_steps=3)
    got = {key: [entry[key] for entry in logs] for key in ("loss", "reward", "completions/mean_length")}
    if os.environ.get("FUSEDRL_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for key, values in got.items():
        assert_close(torch.tensor(values), torch.tensor(golden[key]), name=key, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("fields", "match"), [
    ({"num_generations": 1}, "needs num_generations >= 2"),
    ({"per_device_train_batch_size": 6}, r"generation_batch_size \(6\) must be divisible by num_generations \(4\)"),
    ({"generation_batch_size": 16, "steps_per_generation": 2}, "cannot both be set"),
    ({"loss_type": "ppo"}, "loss_type must be one of"),
    ({"scale_rewards": "std"}, "scale_rewards must be group, batch or none"),
    ({"prompt_truncation": "keep_start"}, "prompt_truncation must be one of"),
    ({"reward_failure": "ignore"}, "reward_failure must be one of"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile must lie in"),
], ids=["one_generation", "partial_group", "both_batch_fields", "loss_type", "scale", "truncation", "failure",
        "entropy_quantile"])
def test_bad_config_names_the_field(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(str(tmp_path), **{**BASE, **fields})


def test_bad_inputs_fail_at_construction(preset_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(preset_model_dir)
    config = GRPOConfig(str(tmp_path), **BASE)
    from datasets import Dataset

    with pytest.raises(ValueError, match="needs a 'prompt' column"):
        GRPOTrainer(model, reward_funcs="accuracy", args=config, train_dataset=Dataset.from_dict({"text": ["a"]}),
                    processing_class=TOKENIZER)
    with pytest.raises(ValueError, match="reward_funcs is required"):
        GRPOTrainer(model, args=config, train_dataset=_data(), processing_class=TOKENIZER)
    with pytest.raises(ValueError, match="sync_ref_model=True needs a separate reference model"):
        GRPOTrainer(model, reward_funcs="accuracy", args=GRPOConfig(str(tmp_path), **BASE, sync_ref_model=True),
                    train_dataset=_data(), processing_class=TOKENIZER)


def test_overlong_prompts_are_rejected_when_asked(preset_model_dir, tmp_path):
    with pytest.raises(ValueError, match="more than max_prompt_length=4"):
        _run(GRPOTrainer, GRPOConfig, preset_model_dir, tmp_path, max_prompt_length=4, prompt_truncation="error")
    # keep_end trains on the truncated prompts.
    logs, _, _ = _run(GRPOTrainer, GRPOConfig, preset_model_dir, tmp_path, max_prompt_length=4, max_steps=1)
    assert math.isfinite(logs[0]["loss"])


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_cli_builds_and_trains(tmp_path, command):
    """`fusedrl grpo|rloo` on the presets: prompt rows with answers, rewards named on the command line."""
    from fusedrl.cli import launch

    job = launch.build_job(command, [
        "--model", "tiny", "--dataset", "arithmetic", "--num_rows", "16", "--output_dir", str(tmp_path),
        "--reward_funcs", "accuracy", "format", "--reward_weights", "1", "0.5", "--max_steps", "1",
        "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "3",
        "--activation_checkpointing", "False", "--report_to", "none", "--kernels", "all=reference",
    ])
    assert job.train_dataset.column_names == ["prompt", "answer"] and len(job.train_dataset) == 16
    trainer = job.trainer_cls(model=job.model, args=job.config, train_dataset=job.train_dataset,
                              processing_class=job.tokenizer)
    assert type(trainer).__name__ == f"{command.upper()}Trainer"
    assert trainer.reward_func_names == ["accuracy", "format"]
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_demo_grpo_stage_builds_and_reports_a_curve(tmp_path):
    """The demo's GRPO stage runs its recipe (here 2 steps, from an untrained demo model); ``reward_curve``
    averages the logged reward and accuracy per window: steps 1-2 -> (0.2+0.4)/2, (0+0.2)/2; step 3 -> 0.8, 0.6."""
    from fusedrl.cli import demo

    history = [{"step": 1, "reward": 0.2, "rewards/accuracy/mean": 0.0},
               {"step": 2, "reward": 0.4, "rewards/accuracy/mean": 0.2}, {"step": 2, "loss": 0.1},
               {"step": 3, "reward": 0.8, "rewards/accuracy/mean": 0.6}]
    curve = demo.reward_curve(history, 2)
    assert [row["steps"] for row in curve] == ["1-2", "3-4"]
    assert [row["reward"] for row in curve] == pytest.approx([0.3, 0.8])
    assert [row["accuracy"] for row in curve] == pytest.approx([0.1, 0.6])
    model = presets.load_preset_model("demo", seed=0, tokenizer=TOKENIZER)
    trainer = demo.build_grpo_trainer(model, tmp_path, max_steps=2, kernels="all=reference")
    assert len(trainer.train_dataset) == demo.GRPO_DEMO_RECIPE["num_prompts"]
    trainer.train()
    assert trainer.state.global_step == 2
