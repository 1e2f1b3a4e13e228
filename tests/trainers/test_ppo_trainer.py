"""PPOTrainer on the tiny preset model and the bundled arithmetic prompts (CPU, reference kernels).

- a few steps train: finite losses, policy and value head move, TRL's metric names are logged;
- the rollout's advantages and returns equal an obvious per-row loop (KL-shaped rewards, GAE, whitening) over the
  rollout's own log-probs, values and scores, with and without reward whitening;
- the value model built from the policy starts at 0 and shares the policy's trunk weights;
- checkpoints: the policy is a loadable causal LM, the value model a loadable classifier; resuming restores both;
- bad input: reward functions that raise / return the wrong length / NaN, configuration errors;
- a golden loss trajectory (tests/golden/ppo_tiny.json; FUSEDRL_UPDATE_GOLDEN=1 rewrites it).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fusedrl.cli import presets
from fusedrl.trainers.online.ppo import VALUE_MODEL_DIR, PPOTrainer
from fusedrl.trainers.online.ppo_config import PPOConfig
from fusedrl.trainers.online.value_head import token_values, value_model_from_policy
from fusedrl.trainers.rewards import resolve_rewards
from tests.helpers.online import digit_count, make_ppo_trainer, train_quietly
from tests.utils import assert_close, spy_policy_backends

GOLDEN = Path(__file__).parents[1] / "golden" / "ppo_tiny.json"

TRL_METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg",
               "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/ratio_var",
               "val/num_eos_tokens", "episode")


def test_ppo_trains_policy_and_value_head(tmp_path):
    trainer = make_ppo_trainer(tmp_path, num_mini_batches=2, num_ppo_epochs=2, max_steps=4)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    logs = train_quietly(trainer)
    assert len(logs) == 4  # one rollout = num_ppo_epochs x num_mini_batches optimizer steps
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert "value_model.score.weight" in moved
    assert any(name.startswith("policy.lm_head") for name in moved)
    assert any(name.startswith("value_model.model.layers") for name in moved)
    first = logs[0]
    assert set(TRL_METRICS) <= first.keys()
    assert "rewards/digit_count/mean" in first
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5)  # first minibatch: the policy that sampled
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is the initial policy
    assert logs[-1]["episode"] == 8  # one rollout of 4 x 2 prompts
    losses = [entry["loss"] for entry in logs]
    if os.environ.get("FUSEDRL_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"loss": losses}, indent=1) + "\n")
    assert_close(torch.tensor(losses), torch.tensor(json.loads(GOLDEN.read_text())["loss"]), name="loss trajectory")


def hand_targets(rollout, *, kl_coef, kl_estimator, whiten_rewards, gamma, lam):
    """The textbook PPO targets, one row and one position at a time (right padding only)."""
    mask = rollout["completion_mask"].bool()
    rows, width = mask.shape
    rewards = torch.zeros(rows, width, dtype=torch.float64)
    for b in range(rows):
        length = int(mask[b].sum())
        for t in range(length):
            d = float(rollout["logps"][b, t] - rollout["ref_logps"][b, t])
            kl = d if kl_estimator == "k1" else math.exp(-d) + d - 1
            rewards[b, t] = -kl_coef * kl
        rewards[b, length - 1] += float(rollout["scores"][b])
    selected = rewards[mask]
    if whiten_rewards:
        # TRL's shift_mean=False: whiten, then add the mean back (the scale changes, the mean does not)
        mean = selected.mean()
        rewards = torch.where(mask, (rewards - mean) / math.sqrt(selected.var().item() + 1e-8) + mean, 0.0)
    advantages = torch.zeros(rows, width, dtype=torch.float64)
    returns = torch.zeros(rows, width, dtype=torch.float64)
    values = rollout["values"].double()
    for b in range(rows):
        length, running = int(mask[b].sum()), 0.0
        for t in reversed(range(length)):
            next_value = float(values[b, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            advantages[b, t] = running
            returns[b, t] = running + float(values[b, t])
    selected = advantages[mask]
    whitened = (advantages - selected.mean()) / math.sqrt(selected.var().item() + 1e-8)
    return torch.where(mask, whitened, 0.0), returns


@pytest.mark.parametrize("whiten_rewards,kl_estimator", [(False, "k1"), (True, "k3")], ids=["plain-k1", "whiten-k3"])
def test_advantages_equal_hand_loop(tmp_path, whiten_rewards, kl_estimator):
    """Second rollout (the policy has moved, so the KL term is nonzero), gamma and lam below 1."""
    options = {"kl_coef": 0.3, "kl_estimator": kl_estimator, "whiten_rewards": whiten_rewards, "gamma": 0.9,
               "lam": 0.8}
    trainer = make_ppo_trainer(tmp_path, max_steps=2, learning_rate=2e-2, **options)
    train_quietly(trainer)
    rollout = trainer.last_rollout
    assert trainer._num_rollouts == 2
    assert rollout["kl"].abs().sum() > 0
    advantages, returns = hand_targets(rollout, **options)
    torch.testing.assert_close(rollout["advantages"].double(), advantages, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rollout["returns"].double(), returns, atol=1e-5, rtol=1e-5)


def test_value_model_from_policy_starts_at_zero():
    tokenizer = presets.build_tokenizer()
    policy = presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer)
    value_model = value_model_from_policy(policy)
    for name, param in policy.model.state_dict().items():
        assert torch.equal(param, value_model.model.state_dict()[name]), name
    ids = torch.randint(7, 100, (2, 9))
    values = token_values(value_model, ids, torch.ones_like(ids))
    assert values.shape == (2, 9) and torch.equal(values, torch.zeros(2, 9))


def test_save_and_resume_keep_policy_and_value_model(tmp_path):
    trainer = make_ppo_trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    train_quietly(trainer)
    checkpoint = tmp_path / "checkpoint-1"
    policy = AutoModelForCausalLM.from_pretrained(checkpoint)
    value_model = AutoModelForSequenceClassification.from_pretrained(checkpoint / VALUE_MODEL_DIR)
    saved_head = value_model.score.weight.detach().clone()
    assert torch.equal(saved_head, trainer.model.value_model.score.weight)
    assert torch.equal(policy.lm_head.weight, trainer.model.policy.lm_head.weight)

    resumed = make_ppo_trainer(tmp_path / "resumed", max_steps=2)
    assert not torch.equal(resumed.model.value_model.score.weight, saved_head)  # a fresh zero head
    resumed._load_from_checkpoint(str(checkpoint))  # what train(resume_from_checkpoint=...) calls first
    assert torch.equal(resumed.model.value_model.score.weight, saved_head)
    assert torch.equal(resumed.model.policy.lm_head.weight, policy.lm_head.weight)
    logs = train_quietly(resumed, resume_from_checkpoint=str(checkpoint))
    assert [entry["step"] for entry in logs] == [1, 2]  # the checkpoint's log history, then the resumed step
    assert resumed.state.global_step == 2


def test_bad_reward_function_is_named(tmp_path):
    trainer = make_ppo_trainer(tmp_path, max_steps=1)
    rows = [trainer.train_dataset[i] for i in range(4)]
    cases = [
        (lambda completions, **kw: 1 / 0, r"reward function 'broken' raised ZeroDivisionError"),
        (lambda completions, **kw: [1.0], r"reward function 'broken' returned 1 rewards for 4 completions"),
        (lambda completions, **kw: [math.nan] * len(completions), r"reward function 'broken' returned nan"),
    ]
    for reward, match in cases:  # one trainer; each case swaps the reward and runs the rollout a step starts with
        reward.__name__ = "broken"
        trainer.rewards = resolve_rewards([reward])
        with pytest.raises(ValueError, match=match):
            trainer._rollout(rows)


def test_reward_failure_skip_trains_on(tmp_path):
    def broken(completions, **kwargs):
        raise RuntimeError("offline")

    trainer = make_ppo_trainer(tmp_path, reward_funcs=(digit_count, broken), max_steps=1, reward_failure="skip")
    logs = train_quietly(trainer)
    assert logs[0]["rewards/broken/failures"] == 1.0 and math.isfinite(logs[0]["loss"])


@pytest.mark.parametrize("overrides,match", [
    ({"kl_estimator": "k2"}, r"kl_estimator must be one of"),
    ({"stop_token": "eos", "stop_token_id": 3}, r"mutually exclusive"),
    ({"num_ppo_epochs": 0}, r"num_ppo_epochs must be >= 1"),
    ({"missing_eos_penalty": -1.0}, r"missing_eos_penalty must be >= 0"),
], ids=["k2", "two-stop-tokens", "zero-epochs", "negative-penalty"])
def test_config_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(output_dir=str(tmp_path), **overrides)


def test_trainer_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"fewer than one rollout batch"):
        make_ppo_trainer(tmp_path, rows=2)
    with pytest.raises(ValueError, match=r"reward_funcs is required"):
        make_ppo_trainer(tmp_path, reward_funcs=())


@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
def test_policy_loss_flag_selects_what_runs(tmp_path, monkeypatch, backend):
    """One PPO step (one micro-batch of 4 rows): the selected implementation of the policy-loss op (spied on in its
    module) runs once and the other two never."""
    spies = spy_policy_backends(monkeypatch)
    logs = train_quietly(make_ppo_trainer(tmp_path, max_steps=1, kernels=f"all=reference,policy_loss={backend}"))
    assert math.isfinite(logs[0]["loss"])
    assert {key: spy.call_count for key, spy in spies.items()} == {key: int(key == backend) for key in spies}


def test_peft_policy_uses_adapter_disabled_reference(tmp_path):
    from peft import LoraConfig

    import fusedrl

    assert fusedrl.PPOTrainer is PPOTrainer and fusedrl.PPOConfig is PPOConfig
    tokenizer = presets.build_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PPOTrainer(
            presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer), reward_funcs=[digit_count],
            args=PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_ppo_epochs=1, max_steps=2,
                           response_length=5, learning_rate=2e-2, bf16=False, report_to=[], save_strategy="no",
                           logging_steps=1, use_cpu=True, kernels="all=reference", dataloader_pin_memory=False,
                           disable_tqdm=True),
            train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=8), processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert trainer.ref_model is None  # the reference is the policy with its adapter disabled
    logs = train_quietly(trainer)
    assert logs[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity
    assert trainer.last_rollout["kl"].abs().sum() > 0  # after one update the adapter makes a difference
