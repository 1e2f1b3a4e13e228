"""fusedrl.GRPOTrainer's loss types cispo / sapo / luspo / vespo and its entropy bonus (static and adaptive) against
trl.GRPOTrainer 1.16, run side by side as tests/trainers/test_grpo_trainer.py does (tests/helpers/grpo_parity.py):
every metric TRL logs (loss, grad_norm, kl, entropy, clip ratios, cispo_clip_ratio, vespo/phi_seq_mean,
policy_loss, entropy_coef, rewards, completions/*) must match to 1e-5 relative, and the adaptive controller must end
on TRL's coefficient. Then what TRL does not pin: the controller's state in checkpoints, the config checks and
TRL's warnings.

Why the cases look as they do. CISPO and VESPO multiply ``logp`` itself, and their losses are near-cancelling sums
(about -0.017 at step 1 from terms of size |A logp| ~ 5), so an old log-prob that differs from the current one by
one rounding step moves them by ~1e-6. fusedrl's head gives bitwise the same log-probs for the same rows in the same
order only: cases that compute old log-probs (``num_iterations=2``) keep the whole round in one micro-batch; the
accumulation cases are on-policy (ratio exactly 1, as in TRL).
"""

from __future__ import annotations

import logging
import math

import pytest
import trl
from peft import LoraConfig

from fusedrl.cli import presets
from fusedrl.runtime import checkpoint
from fusedrl.trainers import GRPOConfig, GRPOTrainer
from tests.helpers.adapters import lora_adapters
from tests.helpers.grpo_parity import GRPO_BASE, TOKENIZER, assert_grpo_logs_match, run_grpo
from tests.helpers.online import char_reward, make_grpo_trainer, train_quietly
from tests.utils import count_calls

ACCUMULATE = {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4}
CASES = {
    # cap 1.02 on ratios near 1: about half the positive-advantage tokens are capped at step 2
    "cispo_two_iterations_kl": {"loss_type": "cispo", "num_iterations": 2, "epsilon_high": 1.02, "beta": 0.05},
    # on-policy ratio 1 > cap 0.9: every positive-advantage sequence counts as capped (TRL's default cap is 0.2)
    "cispo_sequence_accumulation": {"loss_type": "cispo", "importance_sampling_level": "sequence",
                                    "epsilon_high": 0.9, **ACCUMULATE},
    "sapo_two_iterations_kl_temperatures": {"loss_type": "sapo", "num_iterations": 2, "beta": 0.05,
                                            "sapo_temperature_pos": 0.8, "sapo_temperature_neg": 1.3},
    "sapo_sequence_two_iterations": {"loss_type": "sapo", "importance_sampling_level": "sequence",
                                     "num_iterations": 2},
    "luspo_sequence_accumulation_delta": {"loss_type": "luspo", "importance_sampling_level": "sequence",
                                          "num_iterations": 2, "delta": 1.5, **ACCUMULATE},
    "vespo_two_iterations_kl": {"loss_type": "vespo", "num_iterations": 2, "beta": 0.05, "vespo_k_pos": 1.5,
                                "vespo_lambda_neg": 2.5},
    "vespo_accumulation_masked_truncation": {"loss_type": "vespo", "mask_truncated_completions": True,
                                             "max_completion_length": 8, **ACCUMULATE},
    # the bonus is divided by the accumulation steps for every loss type (grpo divides its policy term too, dapo not)
    "entropy_grpo_accumulation": {"loss_type": "grpo", "entropy_coef": 0.1, **ACCUMULATE},
    "entropy_dapo_accumulation": {"loss_type": "dapo", "entropy_coef": 0.3, **ACCUMULATE},
    # the bonus acts on the top-entropy tokens only (the unfused path)
    "entropy_top_quantile_luspo": {"loss_type": "luspo", "entropy_coef": 0.2, "top_entropy_quantile": 0.5,
                                   "importance_sampling_level": "sequence", "num_iterations": 2},
    # entropy (~4.8 nats) below the target: +delta per optimizer step, the bonus applies from step 2
    "adaptive_entropy_rising": {"entropy_coef": 0.01, "use_adaptive_entropy": True, "entropy_target": 15.0,
                                "entropy_coef_delta": 0.05, "max_steps": 3, **ACCUMULATE},
    # entropy above the target: -delta per step down to entropy_coef_min, and the gate keeps the bonus off
    "adaptive_entropy_falling_gated": {"loss_type": "sapo", "entropy_coef": 0.3, "use_adaptive_entropy": True,
                                       "entropy_target": 1.0, "entropy_coef_min": 0.1, "entropy_coef_delta": 0.15,
                                       "max_steps": 3},
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_trl(preset_model_dir, tmp_path, case):
    fields = dict(CASES[case])
    ours, our_logs, moved, trainable = run_grpo(GRPOTrainer, GRPOConfig, preset_model_dir, tmp_path, **fields)
    theirs, their_logs, _, _ = run_grpo(trl.GRPOTrainer, trl.GRPOConfig, preset_model_dir, tmp_path, **fields)
    assert len(our_logs) == fields.get("max_steps", GRPO_BASE["max_steps"])
    assert_grpo_logs_match(our_logs, their_logs)
    assert ours.entropy_coef == pytest.approx(theirs.entropy_coef, abs=1e-12)
    assert moved == trainable, f"parameters that never moved: {sorted(trainable - moved)}"
    names = set(our_logs[-1])
    # The loss type's own metrics, and only those (TRL logs clip_ratio/* for the clipped loss types only).
    assert ("cispo_clip_ratio" in names) == (fields.get("loss_type") == "cispo")
    assert ("vespo/phi_seq_mean" in names) == (fields.get("loss_type") == "vespo")
    assert ("clip_ratio/region_mean" in names) == (fields.get("loss_type", "dapo") in ("grpo", "dapo", "luspo"))
    assert ("policy_loss" in names) == ("entropy_coef" in fields)


@pytest.mark.parametrize("backend", ["compiled", "triton"])
def test_fused_path_matches_trl(preset_model_dir, tmp_path, monkeypatch, backend):
    """The trainer's own path (``linear_policy_loss(fused=True)``: the VESPO rows and the entropy bonus's gradient
    inside the fused head) on the compiled and Triton backends, with the k3 KL and accumulation, against TRL."""
    fields = {"loss_type": "vespo", "entropy_coef": 0.2, "beta": 0.05, **ACCUMULATE}
    calls = count_calls(monkeypatch, {"fused": "fusedrl.ops.policy.fused_head:fused_policy_loss"})
    _, our_logs, moved, trainable = run_grpo(GRPOTrainer, GRPOConfig, preset_model_dir, tmp_path,
                                             kernels=f"all={backend}", **fields)
    _, their_logs, _, _ = run_grpo(trl.GRPOTrainer, trl.GRPOConfig, preset_model_dir, tmp_path, **fields)
    assert calls["fused"] == 4  # 2 optimizer steps of 2 micro-batches, each through the fused op
    assert_grpo_logs_match(our_logs, their_logs)
    assert moved == trainable


def test_adaptive_controller_steps_once_per_optimizer_step(preset_model_dir, tmp_path):
    """TRL's test_train_with_adaptive_entropy_gradient_accumulation: with the entropy below the target the coefficient
    grows by delta at each of the 3 optimizer steps (not at each of the 6 micro-batches): 0.01 + 3 x 0.005; logged
    after each step (0.015, 0.02, 0.025); the bonus of step 1 is gated off (no entropy measured yet)."""
    trainer, logs, _, _ = run_grpo(GRPOTrainer, GRPOConfig, preset_model_dir, tmp_path, entropy_coef=0.01,
                                   use_adaptive_entropy=True, entropy_target=15.0, max_steps=3, **ACCUMULATE)
    assert trainer.entropy_coef == pytest.approx(0.025, abs=1e-12)
    assert [entry["entropy_coef"] for entry in logs] == pytest.approx([0.015, 0.02, 0.025], abs=1e-12)
    assert trainer._last_world_entropy < 15.0 and trainer._entropy_window_stats is None  # window closed at the step


def test_resumed_run_continues_the_controller(tmp_path):
    """A run resumed from checkpoint-2 of 3 steps carries on with the saved coefficient (0.01 + 2 x 0.05) and the
    saved entropy, which opens the gate: step 3's loss, its bonus included, and the final coefficient are the
    uninterrupted run's. Without the state the coefficient would restart at 0.01 and the gate be closed (no entropy
    measured yet). A static coefficient adds nothing to the state (the config restores it)."""
    fields = {"entropy_coef": 0.01, "use_adaptive_entropy": True, "entropy_target": 15.0, "entropy_coef_delta": 0.05,
              "max_steps": 3, "save_strategy": "steps", "save_steps": 1}
    full = make_grpo_trainer(tmp_path / "full", **fields)
    full_logs = train_quietly(full)
    saved = checkpoint.load_json(str(tmp_path / "full" / "checkpoint-2" / checkpoint.STATE_FILE))
    assert saved["entropy_control"]["entropy_coef"] == pytest.approx(0.11, abs=1e-12)
    assert saved["entropy_control"]["last_world_entropy"] < 15.0
    resumed = make_grpo_trainer(tmp_path / "resumed", **fields)
    logs = train_quietly(resumed, resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.entropy_coef == full.entropy_coef == pytest.approx(0.16, abs=1e-12)
    for key in ("loss", "policy_loss", "entropy_coef", "entropy"):
        assert logs[-1][key] == full_logs[-1][key], key
    assert "entropy_control" not in make_grpo_trainer(tmp_path / "static", entropy_coef=0.1).fusedrl_state()


def test_adaptive_entropy_refuses_joint_adapters(tmp_path):
    """Several adapters trained together (model_adapter_name) each run compute_loss: one controller would step once
    per adapter. Refused at construction, naming both fields."""
    model = lora_adapters(presets.load_preset_model("tiny", seed=0, tokenizer=TOKENIZER), ("a", "b"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    prompts = presets.load_preset_dataset("arithmetic", kind="prompt", n=8)
    args = GRPOConfig(str(tmp_path), **{**GRPO_BASE, "per_device_train_batch_size": 4, "num_generations": 2},
                      model_adapter_name=["a", "b"], use_adaptive_entropy=True, use_cpu=True)
    with pytest.raises(ValueError, match="use_adaptive_entropy=True keeps one entropy coefficient, but "
                                         "model_adapter_name"):
        GRPOTrainer(model, reward_funcs=[char_reward], args=args, processing_class=TOKENIZER,
                    train_dataset={"a": prompts.select(range(4)), "b": prompts.select(range(4, 8))})


@pytest.mark.parametrize(("fields", "match"), [
    ({"loss_type": "ppo"}, "loss_type must be one of"),
    ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg must be a finite number > 0"),
    ({"vespo_lambda_pos": math.inf}, "vespo_lambda_pos must be a finite number"),
    ({"entropy_coef": math.nan}, "entropy_coef must be a finite number"),
    ({"use_adaptive_entropy": True, "entropy_coef_min": 0.5, "entropy_coef_max": 0.1},
     r"entropy_coef_min \(0.5\) must be <= entropy_coef_max \(0.1\)"),
    ({"use_adaptive_entropy": True, "entropy_coef_delta": -0.1}, "entropy_coef_delta must be >= 0"),
], ids=["loss_type", "sapo_temperature", "vespo_lambda", "entropy_coef", "coef_bounds", "coef_delta"])
def test_bad_config_names_the_field(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(str(tmp_path), **{**GRPO_BASE, **fields})


@pytest.mark.parametrize(("fields", "expected"), [
    ({"loss_type": "dapo", "importance_sampling_level": "sequence"}, "weights each sequence by its completion length"),
    ({"loss_type": "cispo", "importance_sampling_level": "sequence"}, "weights each sequence by its completion length"),
    ({"loss_type": "grpo", "importance_sampling_level": "sequence"}, None),
    ({"loss_type": "luspo"}, "`importance_sampling_level` should be set to `'sequence'`"),
    ({"loss_type": "vespo", "importance_sampling_level": "sequence"}, "should be set to `'token'`"),
], ids=["dapo_sequence", "cispo_sequence", "grpo_sequence", "luspo_token", "vespo_sequence"])
def test_trl_warnings_about_loss_type_and_level(tmp_path, caplog, fields, expected):
    """TRL 1.16's warnings (its tests pin 'weights each sequence by its completion length'), from the config."""
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        GRPOConfig(str(tmp_path), **{**GRPO_BASE, **fields})
    if expected is None:
        assert "completion length" not in caplog.text
    else:
        assert expected in caplog.text
