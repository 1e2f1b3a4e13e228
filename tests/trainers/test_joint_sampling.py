"""Several adapters trained together by the sampling trainers (GRPO, RLOO; adapters/joint_rollout.py): each adapter
samples its own rounds from its own RNG stream and ends where its own run ends; PPO and Online DPO refuse."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig

import fusedrl
from fusedrl.cli import presets
from fusedrl.trainers.adapters import routing
from tests.helpers.adapters import lora_adapters
from tests.helpers.online import char_reward

NAMES = ("p0", "p1")
REF = "frozen"


def adapters_model() -> torch.nn.Module:
    return lora_adapters(presets.load_preset_model("tiny", seed=0, tokenizer=presets.build_tokenizer()),
                         (*NAMES, REF), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def prompt_datasets() -> dict:
    prompts = presets.load_preset_dataset("arithmetic", kind="prompt", n=16)
    return {NAMES[0]: prompts.select(range(8)), NAMES[1]: prompts.select(range(8, 16))}


def run(method: str, model, names, datasets, tmp_path, **overrides):
    config_cls, trainer_cls = getattr(fusedrl, f"{method}Config"), getattr(fusedrl, f"{method}Trainer")
    # Two rounds of two loss steps each: the second round samples from weights the first round moved.
    args = config_cls(str(tmp_path / method / "-".join(names if isinstance(names, list) else [names])),
                      per_device_train_batch_size=4, num_generations=2, max_completion_length=5, max_steps=3,
                      steps_per_generation=2, learning_rate=1e-2, logging_steps=1, report_to=[], bf16=False,
                      use_cpu=True, save_strategy="no", beta=0.1, ref_adapter_name=REF, max_grad_norm=0.05,
                      model_adapter_name=names, **overrides)
    trainer = trainer_cls(model, reward_funcs=[char_reward], args=args, train_dataset=datasets,
                          processing_class=presets.build_tokenizer())
    trainer.train()
    return trainer


@pytest.mark.parametrize("method", ["GRPO", "RLOO"])
def test_each_adapter_samples_and_ends_as_in_its_own_run(method, tmp_path):
    start, datasets = adapters_model(), prompt_datasets()
    # The plain layout: the union batch of a joint run would share prefixes where a run alone's smaller batch does
    # not (the layout is chosen per batch by cost), and the rounding would differ by more than this test's 5e-6.
    # Joint mode with shared prefixes: tests/trainers/test_shared_prefix_trainers.py.
    joint = run(method, copy.deepcopy(start), list(NAMES), datasets, tmp_path, shared_prefix=False)
    joint_logs = [log for log in joint.state.log_history if "loss" in log]
    for name in NAMES:
        alone = run(method, copy.deepcopy(start), name, datasets[name], tmp_path, shared_prefix=False)
        params = dict(joint.model.named_parameters())
        for key, param in alone.model.named_parameters():
            if f".{name}." in key:
                torch.testing.assert_close(params[key], param, rtol=0, atol=5e-6)
        logs = [log for log in alone.state.log_history if "loss" in log]
        assert len(logs) == len(joint_logs) == 3
        for own, together in zip(logs, joint_logs):
            assert together[f"{name}/grad_norm"] == pytest.approx(own["grad_norm"], rel=1e-5)
            if "reward" in own:  # logged at each sampling round: the same completions were drawn
                assert together[f"{name}/reward"] == own["reward"]
                assert together[f"{name}/completions/mean_length"] == own["completions/mean_length"]


def test_loss_steps_run_one_trunk_forward_for_every_adapter(tmp_path, monkeypatch):
    model = adapters_model()
    adapter_sets = []
    original = routing.multi_lora_linear

    def spy(x, weight, bias, lora_A, lora_B, scaling, adapter_ids):
        if torch.is_grad_enabled():
            adapter_sets.append((lora_A.shape[0], tuple(adapter_ids.unique().tolist())))
        return original(x, weight, bias, lora_A, lora_B, scaling, adapter_ids)

    monkeypatch.setattr(routing, "multi_lora_linear", spy)
    run("GRPO", model, list(NAMES), prompt_datasets(), tmp_path)
    # Every gradient-carrying LoRA call (forward and checkpoint recompute) covers both adapters' rows at once.
    assert adapter_sets and set(adapter_sets) == {(2, (0, 1))}


@pytest.mark.parametrize("method", ["PPO", "OnlineDPO"])
def test_trainers_without_joint_mode_refuse_it(method, tmp_path):
    config_cls, trainer_cls = getattr(fusedrl, f"{method}Config"), getattr(fusedrl, f"{method}Trainer")
    args = config_cls(str(tmp_path), model_adapter_name=list(NAMES), report_to=[], bf16=False, use_cpu=True)
    with pytest.raises(ValueError, match=f"{method}Trainer trains one adapter at a time: model_adapter_name"):
        trainer_cls(adapters_model(), args=args, train_dataset=prompt_datasets(),
                    processing_class=presets.build_tokenizer())
