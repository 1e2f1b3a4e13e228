"""The online-trainer runs of tests/trainers/test_online_resume.py (whose docstring describes the cases). Its worker
subprocesses import this module with ``PYTHONPATH`` at the repository.

Every case trains the ``tiny`` preset for ``MAX_STEPS`` optimizer steps on a few arithmetic prompts (CPU, fp32,
reference kernels), so that the generation rounds / PPO rollouts span several steps and the data crosses an epoch
boundary within the run.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForSequenceClassification

from fusedrl import trainers
from fusedrl.cli import presets
from tests.helpers.models import tiny_llama
from tests.helpers.online import char_reward, digit_count

MAX_STEPS = 6
KILL_AT = 4  # SIGKILL at the end of step 4 (before it saves): checkpoint-3 is the last one, inside a round
CASES = ("grpo_sync_ref", "grpo_lora_ga2", "joint_grpo", "rloo", "ppo_lora_reward_model", "online_dpo_reward_model")
JOINT_NAMES = ("p0", "p1")

_COMMON = {"max_steps": MAX_STEPS, "logging_steps": 1, "save_strategy": "steps", "save_steps": 1, "report_to": [],
           "bf16": False, "use_cpu": True, "kernels": "all=reference", "disable_tqdm": True,
           "dataloader_pin_memory": False, "seed": 0, "activation_checkpointing": False}
_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}

# Per case: trainer, config fields and number of prompts. GRPO/RLOO: generation rounds of steps_per_generation x
# num_iterations micro-steps; PPO: rollouts of num_ppo_epochs x num_mini_batches x accumulation micro-steps.
_SETUPS = {
    # 4 micro-steps a round (old log-probs, reference log-probs), the reference synced every 2 steps; 4 prompts are
    # one round, so epoch 2 starts at step 5.
    "grpo_sync_ref": ("GRPO", {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 5,
                               "steps_per_generation": 2, "num_iterations": 2, "beta": 0.1, "learning_rate": 1e-2,
                               "sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.5}, 4),
    # LoRA, 2 accumulation steps: a round is 2 optimizer steps; checkpoint-3 is half-way through the second.
    "grpo_lora_ga2": ("GRPO", {"per_device_train_batch_size": 2, "num_generations": 2, "max_completion_length": 5,
                               "steps_per_generation": 2, "num_iterations": 2, "gradient_accumulation_steps": 2,
                               "beta": 0.1, "learning_rate": 2e-2}, 4),
    # Two adapters trained together, each sampling from its own RNG stream; a reference adapter.
    "joint_grpo": ("GRPO", {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 5,
                            "steps_per_generation": 2, "beta": 0.1, "learning_rate": 1e-2, "max_grad_norm": 0.05,
                            "model_adapter_name": list(JOINT_NAMES), "ref_adapter_name": "frozen"}, 4),
    # Each completion sampled from a stream of its own, keyed by the optimizer step (online/row_seeds.py).
    "rloo": ("RLOO", {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 5,
                      "steps_per_generation": 2, "learning_rate": 1e-2, "rank_invariant_sampling": True}, 8),
    # LoRA policy (its reference: the adapter-disabled policy), a whole value model; 2 epochs x 2 minibatches a
    # rollout: 4 optimizer steps, each on a fresh permutation's half.
    "ppo_lora_reward_model": ("PPO", {"per_device_train_batch_size": 2, "num_mini_batches": 2, "num_ppo_epochs": 2,
                                 "response_length": 5, "learning_rate": 1e-3}, 4),
    "online_dpo_reward_model": ("OnlineDPO", {"per_device_train_batch_size": 2, "max_new_tokens": 5,
                                              "learning_rate": 1e-3}, 4),
}


def _reward_model() -> torch.nn.Module:
    """A tiny sequence classifier with a non-zero score head, seeded apart from the policy."""
    return tiny_llama(7, model_cls=LlamaForSequenceClassification, num_labels=1, hidden_size=32,
                      intermediate_size=64)


def _joint_model() -> torch.nn.Module:
    tokenizer = presets.build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = get_peft_model(presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer),
                               LoraConfig(**_LORA), adapter_name=JOINT_NAMES[0])
        for name in (*JOINT_NAMES[1:], "frozen"):
            model.add_adapter(name, LoraConfig(**_LORA))
        for key, param in model.named_parameters():
            if "lora_B" in key:  # non-zero adapters, so the reference adapter differs from the base
                param.data.normal_(0, 0.05)
    return model


def build_trainer(case: str, output_dir: str, *, callbacks=None, **overrides):
    """The trainer of ``case`` writing to ``output_dir``; ``overrides`` go to its config."""
    method, fields, num_prompts = _SETUPS[case]
    args = getattr(trainers, f"{method}Config")(output_dir, **{**_COMMON, **fields, **overrides})
    tokenizer = presets.build_tokenizer()
    prompts = presets.load_preset_dataset("arithmetic", kind="prompt", n=2 * num_prompts if case == "joint_grpo"
                                          else num_prompts)
    kwargs = {"args": args, "processing_class": tokenizer, "callbacks": callbacks}
    if case == "joint_grpo":
        model = _joint_model()
        kwargs["train_dataset"] = {name: prompts.select(range(k * num_prompts, (k + 1) * num_prompts))
                                   for k, name in enumerate(JOINT_NAMES)}
    else:
        model = presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer)
        kwargs["train_dataset"] = prompts
    if case in ("grpo_lora_ga2", "ppo_lora_reward_model"):
        kwargs["peft_config"] = LoraConfig(**_LORA)
    if case.endswith("reward_model"):
        kwargs["reward_funcs"] = [digit_count, _reward_model()]
        kwargs["reward_processing_classes"] = [None, tokenizer]
    else:
        kwargs["reward_funcs"] = [char_reward]
    return getattr(trainers, f"{method}Trainer")(model, **kwargs)
