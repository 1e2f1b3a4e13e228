"""Named adapters in training: the checkpoint layout (``output_dir/<adapter>/``), exact resume of the trained and
the synced reference adapter, and the online trainers (GRPO, RLOO, PPO, Online DPO) plus ORPO with
``model_adapter_name`` / ``ref_adapter_name``. Validation, switching and callbacks: tests/trainers/test_named_adapters.py.

Models: tests/helpers/models.tiny_llama (preference trainers) or the ``tiny`` preset (online trainers) with LoRA
adapters ``policy`` (trained) and ``anchor`` (the reference), drawn by tests/helpers/adapters.py.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel

from fusedrl.cli import presets
from fusedrl.trainers import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    OnlineDPOConfig,
    OnlineDPOTrainer,
    ORPOConfig,
    ORPOTrainer,
    PPOConfig,
    PPOTrainer,
    RLOOConfig,
    RLOOTrainer,
)
from fusedrl.trainers.adapters.named import load_adapters, save_adapters
from tests.helpers.adapters import adapter_copy, adapter_state, named_adapter_model
from tests.helpers.data import LORA, standard_pairs
from tests.helpers.models import tiny_llama
from tests.helpers.online import char_reward, digit_count, train_quietly
from tests.helpers.parity import base_settings, train_logs

TOKENIZER = presets.build_tokenizer()
NAMES = {"model_adapter_name": "policy", "ref_adapter_name": "anchor"}


def _dpo(model, output_dir, *, peft_config=None, **overrides) -> DPOTrainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPOTrainer(model=model, args=DPOConfig(**base_settings(output_dir, **overrides)),
                          train_dataset=standard_pairs(), processing_class=TOKENIZER, peft_config=peft_config)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 12)[None]).logits


def _assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    changed = [name for name, value in before.items() if not torch.equal(model.get_parameter(name), value)]
    assert not changed, f"moved: {changed}"


def _assert_moved(model, before: dict[str, torch.Tensor]) -> None:
    assert any(not torch.equal(model.get_parameter(name), value) for name, value in before.items())


# --- saving ----------------------------------------------------------------------------------------------------------


def test_save_writes_each_trained_adapter_under_its_name(tmp_path):
    model = named_adapter_model(tiny_llama(0))
    trainer = _dpo(model, tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1, **NAMES)
    train_logs(trainer)
    trainer.save_model(str(tmp_path / "out"))
    out = tmp_path / "out"
    assert sorted(os.listdir(out / "policy")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (out / "anchor").exists() and not (out / "adapter_model.safetensors").exists()  # frozen: not saved
    assert (out / "training_args.bin").exists() and (out / "tokenizer_config.json").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(0), str(out / "policy"))
    assert torch.equal(_logits(loaded), _logits(adapter_copy(model, "policy")))

    # load_best_model_at_end's load reads the same layout (checkpoint-1/policy).
    trained = adapter_state(model, "policy")
    with torch.no_grad():
        for name in trained:
            model.get_parameter(name).zero_()
    trainer.state.best_model_checkpoint = str(tmp_path / "run" / "checkpoint-1")
    trainer._load_best_model()
    _assert_unchanged(model, trained)


def test_default_named_adapter_from_peft_config(tmp_path):
    """``model_adapter_name="default"`` with peft_config: PEFT would write ``default`` to the directory itself; the
    named layout puts it under ``default/`` like any other name."""
    trainer = _dpo(tiny_llama(0), tmp_path / "run", max_steps=1, peft_config=LoraConfig(**LORA),
                   model_adapter_name="default")
    train_logs(trainer)
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "default" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "out" / "default"))
    assert torch.equal(_logits(loaded), _logits(trainer.model))


def test_several_adapters_save_and_load_in_place(tmp_path):
    """The layout of joint mode (several trained adapters): each under its name, loaded back into the same
    parameters (an optimizer holding them keeps working); a missing adapter directory is named."""
    source = named_adapter_model(tiny_llama(0), ("a", "b", "c"), seed=1)
    save_adapters(source, str(tmp_path), ["a", "b"])
    assert sorted(os.listdir(tmp_path)) == ["README.md", "a", "b"]
    target = named_adapter_model(tiny_llama(0), ("a", "b", "c"), seed=2)
    identities = {name: id(param) for name, param in target.named_parameters()}
    c_before = adapter_state(target, "c")
    load_adapters(target, str(tmp_path), ["a", "b"])
    for name in ("a", "b"):
        for key, value in adapter_state(source, name).items():
            assert torch.equal(target.get_parameter(key), value), key
    _assert_unchanged(target, c_before)
    assert identities == {name: id(param) for name, param in target.named_parameters()}
    with pytest.raises(ValueError, match="has no directory 'c' for adapter 'c'"):
        load_adapters(target, str(tmp_path), ["c"])


def test_resume_restores_trained_and_synced_reference_adapters_exactly(tmp_path):
    """6 steps straight vs resuming from the step-3 checkpoint: the same logged losses and metrics, and the same final
    ``policy`` and ``anchor`` (TR-DPO syncs policy into anchor every 2 steps, alpha 0.5, so the anchor is part of the
    state). 8 pairs at batch 2: the resume starts mid-epoch and crosses into epoch 2."""
    fields = {**NAMES, "max_steps": 6, "per_device_train_batch_size": 2, "save_strategy": "steps", "save_steps": 3,
              "sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.5, "learning_rate": 1e-2,
              "kernels": "all=reference", "use_cpu": True, "dataloader_pin_memory": False}
    straight = _dpo(named_adapter_model(tiny_llama(0)), tmp_path / "straight", **fields)
    full = train_logs(straight)
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert {"policy", "anchor"} <= set(os.listdir(checkpoint)) and not (checkpoint / "adapter_model.safetensors").exists()

    resumed = _dpo(named_adapter_model(tiny_llama(0)), tmp_path / "resumed", **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.train(resume_from_checkpoint=str(checkpoint))
    def untimed(entries):  # the RSS peaks are the process's, not the run's
        return [{k: v for k, v in entry.items() if not k.startswith("memory/")} for entry in entries]

    # The resumed history starts with the checkpoint's (steps 1-3); steps 4-6 are trained after the resume.
    tail = [{k: v for k, v in entry.items() if k not in ("epoch", "learning_rate", "step")}
            for entry in resumed.state.log_history if "loss" in entry and entry["step"] > 3]
    assert len(tail) == 3 and untimed(tail) == untimed(full[3:])
    assert len({entry["loss"] for entry in full}) == len(full), "the trajectory must move"
    for name in ("policy", "anchor"):
        for key, value in adapter_state(straight.model, name).items():
            assert torch.equal(resumed.model.get_parameter(key), value), key


# --- online trainers and ORPO ------------------------------------------------------------------------------------------


def _online_settings(tmp_path, **fields) -> dict:
    return {"output_dir": str(tmp_path), "max_steps": 1, "logging_steps": 1, "learning_rate": 1e-2, "bf16": False,
            "gradient_checkpointing": False, "report_to": [], "save_strategy": "no", "use_cpu": True,
            "kernels": "all=reference", "dataloader_pin_memory": False, "disable_tqdm": True, "seed": 0, **NAMES,
            **fields}


def _preset_model():
    return named_adapter_model(presets.load_preset_model("tiny", seed=0, tokenizer=TOKENIZER))


def _prompts(n: int = 8):
    return presets.load_preset_dataset("arithmetic", kind="prompt", n=n, seed=1)


@pytest.mark.parametrize("trainer_cls, config_cls", [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)],
                         ids=["grpo", "rloo"])
def test_grpo_family_reference_logps_are_the_ref_adapters(trainer_cls, config_cls, tmp_path):
    """The reference log-probs of a generation round equal the anchor adapter's on the same completions; the old
    log-probs and the samples are the policy's; training moves the policy only."""
    model = _preset_model()
    anchor = adapter_copy(model, "anchor")
    config = config_cls(**_online_settings(tmp_path, per_device_train_batch_size=4, num_generations=2,
                                           max_completion_length=5, beta=0.1, num_iterations=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model, reward_funcs=[char_reward], args=config, train_dataset=_prompts(),
                              processing_class=TOKENIZER)
    batch = trainer._generate_and_score([trainer.train_dataset[i // 2] for i in range(4)])
    assert torch.equal(batch["ref_per_token_logps"], trainer._sampled_logps(anchor, batch, 4))
    policy = adapter_copy(model, "policy")
    assert torch.equal(batch["old_per_token_logps"], trainer._sampled_logps(policy, batch, 4))
    anchor_before, policy_before = adapter_state(model, "anchor"), adapter_state(model, "policy")
    train_quietly(trainer)
    _assert_unchanged(model, anchor_before)
    _assert_moved(model, policy_before)


def test_grpo_syncs_into_the_ref_adapter(tmp_path):
    config = GRPOConfig(**_online_settings(tmp_path, per_device_train_batch_size=4, num_generations=2,
                                           max_completion_length=5, beta=0.1, sync_ref_model=True,
                                           ref_model_sync_steps=1, ref_model_mixup_alpha=1.0))
    model = _preset_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model, reward_funcs=[char_reward], args=config, train_dataset=_prompts(),
                              processing_class=TOKENIZER)
    train_quietly(trainer)
    for key, value in adapter_state(model, "policy").items():
        assert torch.equal(model.get_parameter(key.replace(".policy.", ".anchor.")), value), key


def test_ppo_with_named_adapters(tmp_path):
    model = _preset_model()
    anchor_before, policy_before = adapter_state(model, "anchor"), adapter_state(model, "policy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PPOTrainer(model, reward_funcs=[digit_count], train_dataset=_prompts(), processing_class=TOKENIZER,
                             args=PPOConfig(**_online_settings(tmp_path, per_device_train_batch_size=4,
                                                               num_mini_batches=1, num_ppo_epochs=1,
                                                               response_length=5)))
    assert trainer.ref_model is None and sorted(model.peft_config) == ["anchor", "policy"]
    logs = train_quietly(trainer)
    # Step 1's reference is the anchor, not the policy itself nor the base: the KL is that of two adapters.
    assert logs[0]["objective/kl"] != 0.0 and trainer.last_rollout["ref_logps"].ne(trainer.last_rollout["logps"]).any()
    _assert_unchanged(model, anchor_before)
    _assert_moved(model, policy_before)
    trainer.save_model(str(tmp_path / "out"))
    assert {"policy", "value_model"} <= set(os.listdir(tmp_path / "out"))


def test_online_dpo_with_named_adapters(tmp_path):
    model = _preset_model()
    anchor_before, policy_before = adapter_state(model, "anchor"), adapter_state(model, "policy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = OnlineDPOTrainer(model, reward_funcs=[digit_count], train_dataset=_prompts(),
                                   processing_class=TOKENIZER,
                                   args=OnlineDPOConfig(**_online_settings(tmp_path, per_device_train_batch_size=4,
                                                                           max_new_tokens=5)))
    with trainer.reference_context() as reference:
        assert torch.equal(_logits(reference), _logits(adapter_copy(model, "anchor")))
    logs = train_quietly(trainer)
    assert len(logs) == 1 and torch.isfinite(torch.tensor(logs[0]["loss"]))
    _assert_unchanged(model, anchor_before)
    _assert_moved(model, policy_before)


def test_orpo_trains_the_named_adapter_only(tmp_path):
    model = named_adapter_model(tiny_llama(0))
    model.set_adapter("anchor")
    anchor_before, policy_before = adapter_state(model, "anchor"), adapter_state(model, "policy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(model=model, args=ORPOConfig(**base_settings(tmp_path, max_steps=1,
                                                                           model_adapter_name="policy")),
                              train_dataset=standard_pairs(), processing_class=TOKENIZER)
    train_logs(trainer)
    _assert_unchanged(model, anchor_before)
    _assert_moved(model, policy_before)
