"""``shared_prefix=True`` in every trainer it serves: the same logged losses and metrics and the same trained weights
as the plain layout (``shared_prefix=False``) to fp32 tolerance, on awkward batches (prompts of different lengths,
completions from one token to many, truncation, left-padded prompts with right-padded completions), while the trunk
runs fewer positions (policy and reference passes alike)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from datasets import Dataset

import fusedrl
from fusedrl.cli import presets
from fusedrl.cli.presets import build_tokenizer
from fusedrl.trainers.data import unpair_preference_dataset
from tests.helpers.data import CHOSEN, PROMPTS, REJECTED
from tests.helpers.online import char_reward, digit_count, train_quietly
from tests.helpers.parity import base_settings, train_logs

# Prompts of 27 to 53 tokens (a context sentence of varying length in front of each arithmetic prompt) and
# completions of 1 to 25 tokens, so pairs share long prompts and completion lengths differ a lot.
_CONTEXTS = ["Solve this. ", "Think step by step, then answer. ", "Quiz: ", "Be brief and exact here. "]


def _long_prompt_pairs() -> Dataset:
    prompts = [f"{_CONTEXTS[i % 4]}Item {i}. {prompt}" for i, prompt in enumerate(PROMPTS)]
    chosen = list(CHOSEN)
    chosen[0] = "4"  # one character + EOS
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": list(REJECTED)})


def _preference_trainer(name: str, model_dir: str, output_dir, **overrides):
    trainer_cls, config_cls = {
        "dpo": (fusedrl.DPOTrainer, fusedrl.DPOConfig),
        "orpo": (fusedrl.ORPOTrainer, fusedrl.ORPOConfig),
        "cpo": (fusedrl.CPOTrainer, fusedrl.CPOConfig),
        "kto": (fusedrl.KTOTrainer, fusedrl.KTOConfig),
    }[name]
    data = _long_prompt_pairs()
    if name == "kto":
        data = unpair_preference_dataset(data)
    settings = base_settings(output_dir, **{"max_length": 60, **overrides})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer_cls(model=model_dir, args=config_cls(**settings), train_dataset=data,
                           processing_class=build_tokenizer())


# The online trainers' prompts: the preset arithmetic questions behind a worked-examples context of 28-49
# characters (the preset tokenizer is character level), so a prompt's G completions share ~40-60 tokens.
_ONLINE_CONTEXTS = ["Worked examples:\n3+4=7\n12-5=7\n", "Examples:\n20+22=42\n9-3=6\n1+1=2\n",
                    "Answer in digits.\n5+5=10\n", "Worked examples:\n13+29=42\n8-6=2\n7+7=14\n"]


def _online_prompts(n: int, seed: int = 0) -> Dataset:
    data = presets.load_preset_dataset("arithmetic", kind="prompt", n=n, seed=seed)
    return data.map(lambda row, index: {"prompt": _ONLINE_CONTEXTS[index % 4] + row["prompt"]}, with_indices=True)


def _online_trainer(name: str, output_dir, **overrides):
    settings = {"output_dir": str(output_dir), "max_steps": 2, "logging_steps": 1, "bf16": False,
                "report_to": [], "save_strategy": "no", "use_cpu": True, "dataloader_pin_memory": False,
                "disable_tqdm": True, "kernels": "all=reference"}
    tokenizer = build_tokenizer()
    model = presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer)
    if name == "online_dpo":
        settings.update(per_device_train_batch_size=4, max_new_tokens=6, learning_rate=1e-3, seed=0, **overrides)
        trainer_cls, config = fusedrl.OnlineDPOTrainer, fusedrl.OnlineDPOConfig(**settings)
        kwargs = {"reward_funcs": [digit_count], "train_dataset": _online_prompts(8)}
    else:
        # beta > 0: the reference forward runs too; GRPO's two generation steps per round give it old log-probs.
        settings.update(per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                        learning_rate=1e-2, seed=3, beta=0.05, **overrides)
        if name == "grpo":
            settings.update(steps_per_generation=2)
        trainer_cls = fusedrl.GRPOTrainer if name == "grpo" else fusedrl.RLOOTrainer
        config = (fusedrl.GRPOConfig if name == "grpo" else fusedrl.RLOOConfig)(**settings)
        kwargs = {"reward_funcs": [presets.answer_reward, char_reward], "train_dataset": _online_prompts(16, 1)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer_cls(model, args=config, processing_class=tokenizer, **kwargs)


def _build(name: str, model_dir: str, output_dir, **overrides):
    if name in ("grpo", "rloo", "online_dpo"):
        return _online_trainer(name, output_dir, **overrides)
    return _preference_trainer(name, model_dir, output_dir, **overrides)


def _run(trainer) -> list[dict]:
    if isinstance(trainer, fusedrl.DPOTrainer | fusedrl.ORPOTrainer | fusedrl.CPOTrainer | fusedrl.KTOTrainer):
        return train_logs(trainer)
    return train_quietly(trainer)


def _assert_same_run(shared, plain, shared_logs, plain_logs) -> None:
    assert len(shared_logs) == len(plain_logs) >= 2
    for step, (ours, theirs) in enumerate(zip(shared_logs, plain_logs)):
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            if ("runtime" in key or "time" in key or "per_second" in key or key == "total_flos"
                    or key.startswith("memory/")
                    or not isinstance(value, float)):
                continue
            assert math.isclose(ours[key], value, rel_tol=1e-4, abs_tol=1e-5), (step, key, ours[key], value)
    # After AdamW steps: Adam moves every entry by ~lr whatever its gradient's size, so an entry whose gradient is
    # rounding noise (~1e-9) moves by +-lr in either run; measured up to 9e-5 of a tensor's norm after 2 steps at lr
    # 1e-2. The gradients themselves are compared at 1e-5 (test_first_gradients_equal_the_plain_layout).
    plain_params = dict(plain.model.named_parameters())
    for name, param in shared.model.named_parameters():
        expected = plain_params[name].detach()
        error = (param.detach() - expected).norm() / expected.norm().clamp_min(1e-12)
        assert error < 1e-3, (name, float(error))


TRAINERS = ["dpo", "orpo", "cpo", "kto", "grpo", "rloo", "online_dpo"]


@pytest.mark.parametrize("name", TRAINERS)
def test_shared_prefix_trains_like_the_plain_layout(name, model_dir, tmp_path):
    shared = _build(name, model_dir, tmp_path / "shared", shared_prefix=True)
    shared_logs = _run(shared)
    plain = _build(name, model_dir, tmp_path / "plain", shared_prefix=False)
    plain_logs = _run(plain)
    _assert_same_run(shared, plain, shared_logs, plain_logs)
    assert plain.prefix_sharing.counts["trunk"] == plain.prefix_sharing.counts["plain"] > 0
    # Fewer trunk positions than the plain run's (KTO's reference pass runs examples and KL rows as one batch, so
    # its "would have run" count differs from the plain run's two batches).
    assert shared.prefix_sharing.counts["trunk"] < plain.prefix_sharing.counts["trunk"], (
        shared.prefix_sharing.counts, plain.prefix_sharing.counts)


@pytest.mark.parametrize("overrides", [
    pytest.param({"max_length": 40, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, id="truncated-sft"),
    pytest.param({"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2,
                  "precompute_ref_log_probs": True}, id="odd-batches-precomputed"),
    pytest.param({"gradient_checkpointing": False, "ld_alpha": 0.5}, id="no-checkpointing-ld"),
])
def test_dpo_variants(overrides, model_dir, tmp_path):
    shared = _build("dpo", model_dir, tmp_path / "shared", shared_prefix=True, **overrides)
    shared_logs = _run(shared)
    plain = _build("dpo", model_dir, tmp_path / "plain", shared_prefix=False, **overrides)
    _assert_same_run(shared, plain, shared_logs, _run(plain))
    assert shared.prefix_sharing.counts["trunk"] < shared.prefix_sharing.counts["plain"]


def test_dpo_with_lora_and_compile(model_dir, tmp_path):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    from peft import LoraConfig

    def build(output_dir, **overrides):
        data = _long_prompt_pairs()
        settings = base_settings(output_dir, max_length=60, compile=True, compile_blocks=True, **overrides)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fusedrl.DPOTrainer(model=model_dir, args=fusedrl.DPOConfig(**settings), train_dataset=data,
                                      processing_class=build_tokenizer(), peft_config=LoraConfig(**lora))

    shared = build(tmp_path / "shared", shared_prefix=True)
    shared_logs = _run(shared)
    plain = build(tmp_path / "plain", shared_prefix=False)
    _assert_same_run(shared, plain, shared_logs, _run(plain))
    assert shared.prefix_sharing.counts["trunk"] < shared.prefix_sharing.counts["plain"]


@pytest.mark.parametrize("name", ["dpo", "orpo", "cpo", "kto"])
def test_first_gradients_equal_the_plain_layout(name, model_dir, tmp_path):
    """One batch's loss and every gradient, shared layout vs plain, on the same trainer and weights."""
    trainer = _build(name, model_dir, tmp_path, shared_prefix=True, per_device_train_batch_size=8)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    results = {}
    for shared in (True, False):
        trainer.prefix_sharing.enabled = shared
        trainer.model.zero_grad()
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results[shared] = (loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                           if p.grad is not None})
    assert trainer.prefix_sharing.counts["trunk"] < trainer.prefix_sharing.counts["plain"]
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    assert results[True][1].keys() == results[False][1].keys() and results[True][1]
    for param_name, grad in results[False][1].items():
        error = (results[True][1][param_name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 1e-5, (param_name, float(error))


def test_reference_pass_is_shared_too(model_dir, tmp_path):
    """DPO's live reference forward runs the shared layout: twice the policy's positions saved in a step."""
    trainer = _build("dpo", model_dir, tmp_path, shared_prefix=True, max_steps=1)
    _run(trainer)
    counts = trainer.prefix_sharing.counts
    # One policy and one reference forward of the same batch: both save the same number of positions.
    assert counts["plain"] % 2 == 0 and counts["trunk"] % 2 == 0
    assert counts["trunk"] < counts["plain"]


def test_unsupported_model_logs_and_keeps_the_plain_layout(model_dir, tmp_path, caplog):
    trainer = _build("dpo", model_dir, tmp_path, shared_prefix=True, max_steps=1)
    trainer.model.config._attn_implementation = "flash_attention_2"
    with caplog.at_level("WARNING", logger="fusedrl"):
        trainer.prefix_sharing.layout(trainer.model, {"input_ids": torch.ones(2, 4, dtype=torch.long),
                                                      "attention_mask": torch.ones(2, 4, dtype=torch.long)})
    assert "shared_prefix: off" in caplog.text and "flash_attention_2" in caplog.text


def test_joint_adapters_share_prefixes_within_each_adapter(tmp_path):
    """Two LoRA adapters trained together (one union forward, rows routed per adapter) with shared prefixes: rows of
    one adapter share their prompts, rows of different adapters never do, and each adapter ends where its own
    shared-prefix run ends."""
    from peft import LoraConfig

    from tests.helpers.adapters import adapter_state, lora_adapters
    from tests.helpers.models import tiny_llama

    names = ["p0", "p1"]
    start = lora_adapters(tiny_llama(), (*names, "frozen"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    data = _long_prompt_pairs()
    datasets = {"p0": data.select(range(4)), "p1": data.select(range(4, 8))}

    def run(model, adapter, train_dataset, output_dir):
        args = fusedrl.DPOConfig(**base_settings(output_dir, max_length=60, per_device_train_batch_size=2,
                                                 learning_rate=1e-2, model_adapter_name=adapter,
                                                 ref_adapter_name="frozen", max_grad_norm=0.05))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = fusedrl.DPOTrainer(model, args=args, train_dataset=train_dataset,
                                         processing_class=build_tokenizer())
        return trainer, train_logs(trainer)

    import copy

    joint, joint_logs = run(copy.deepcopy(start), names, datasets, tmp_path / "joint")
    assert joint.prefix_sharing.counts["trunk"] < joint.prefix_sharing.counts["plain"]
    for name in names:
        alone, logs = run(copy.deepcopy(start), name, datasets[name], tmp_path / name)
        for key, weight in adapter_state(alone.model, name).items():
            torch.testing.assert_close(adapter_state(joint.model, name)[key], weight, rtol=0, atol=1e-5)
        for own, together in zip(logs, joint_logs):
            assert together[f"{name}/grad_norm"] == pytest.approx(own["grad_norm"], rel=1e-5)
            assert together[f"{name}/rewards/margins"] == pytest.approx(own["rewards/margins"], rel=1e-5, abs=1e-6)
