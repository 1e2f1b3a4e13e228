"""bf16 end to end through one trainer per family (DPO, KTO, ORPO, GRPO, PPO): 2 optimizer steps on the tiny model,
run twice from the same config and seed, once in fp32 and once in bf16, in two ways:
- ``bf16_model``: the model loaded in bf16 (``model.to(torch.bfloat16)``; references, value models and optimizer
  state follow it), ``bf16=False``;
- ``autocast``: fp32 master weights with ``bf16=True, use_cpu=True`` (transformers' CPU autocast).
Each run trains without error, logs finite losses and gradient norms, moves every trainable parameter (keeping its
dtype), and its logged losses and first gradient norm are within bf16 tolerance (tests/utils.assert_close, RMS) of
the fp32 run's. The fused ops run on the ``compiled`` backend (the CPU default, named so the environment cannot
change it). The online trainers sample from the same RNG stream in both runs; the bf16 logits have sampled the
same completions on this model and seed, which the identical mean rewards check.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from datasets import Dataset

import fusedrl.trainers as fused
from fusedrl.cli import presets
from tests.helpers.data import CHOSEN, PROMPTS, REJECTED, standard_pairs
from tests.helpers.models import tiny_llama
from tests.helpers.online import char_reward, digit_count, train_quietly
from tests.utils import assert_close

MODES = ("bf16_model", "autocast")
FAMILIES = ("dpo", "kto", "orpo", "grpo", "ppo")
TOKENIZER = presets.build_tokenizer()
# lr 1e-2: in a bf16 model an Adam step of 1e-3 rounds away on the norm weights (1.0, whose bf16 spacing is
# 2^-8..2^-7), so they would not move; pure-bf16 training needs steps above half that spacing.
COMMON = {"max_steps": 2, "logging_steps": 1, "learning_rate": 1e-2, "report_to": [], "save_strategy": "no",
          "disable_tqdm": True, "dataloader_pin_memory": False, "use_cpu": True, "kernels": "all=compiled"}
PREFERENCE = {"dpo": (fused.DPOTrainer, fused.DPOConfig), "kto": (fused.KTOTrainer, fused.KTOConfig),
              "orpo": (fused.ORPOTrainer, fused.ORPOConfig)}


def _unpaired() -> Dataset:
    """The pairs as KTO rows, desirable and undesirable alternating, so each batch of 4 has both labels."""
    labels = [i % 2 == 0 for i in range(len(PROMPTS))]
    completions = [c if label else r for c, r, label in zip(CHOSEN, REJECTED, labels)]
    return Dataset.from_dict({"prompt": PROMPTS, "completion": completions, "label": labels})


def _trainer(family: str, model: torch.nn.Module, output_dir: str, *, bf16: bool):
    settings = {**COMMON, "output_dir": output_dir, "bf16": bf16}
    if family in PREFERENCE:
        trainer_cls, config_cls = PREFERENCE[family]
        config = config_cls(**settings, per_device_train_batch_size=4, max_length=48, seed=0)
        return trainer_cls(model=model, args=config, processing_class=TOKENIZER,
                           train_dataset=_unpaired() if family == "kto" else standard_pairs())
    if family == "grpo":
        # beta > 0: step 1's loss is exactly 0 (ratio 1, group-normalised advantages), step 2's is the KL term.
        config = fused.GRPOConfig(**settings, per_device_train_batch_size=8, num_generations=4,
                                  max_completion_length=5, activation_checkpointing=False, beta=0.1, seed=3)
        return fused.GRPOTrainer(model, reward_funcs=[presets.answer_reward, char_reward], args=config,
                                 train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=48, seed=1),
                                 processing_class=TOKENIZER)
    config = fused.PPOConfig(**settings, per_device_train_batch_size=4, num_mini_batches=1, num_ppo_epochs=1,
                             response_length=5, gradient_checkpointing=False, seed=0)
    return fused.PPOTrainer(model, reward_funcs=[digit_count], args=config, processing_class=TOKENIZER,
                            train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=8))


def _model(family: str) -> torch.nn.Module:
    """The preference trainers' tiny Llama, or the ``tiny`` preset for the online trainers (seed 0 both)."""
    if family in PREFERENCE:
        return tiny_llama()
    return presets.load_preset_model("tiny", seed=0, tokenizer=TOKENIZER)


def _train(family: str, mode: str, output_dir) -> tuple[list[dict], list[str]]:
    """The logged entries of a 2-step run and the trainable parameters that did not move (or changed dtype)."""
    model = _model(family)
    if mode == "bf16_model":
        model = model.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(family, model, str(output_dir), bf16=mode == "autocast")
    dtype = torch.bfloat16 if mode == "bf16_model" else torch.float32
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in before.values()} == {dtype}
    logs = train_quietly(trainer)
    unmoved = [n for n, p in trainer.model.named_parameters()
               if n in before and (p.dtype != dtype or torch.equal(p, before[n]))]
    return logs, unmoved


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    """The fp32 run of a family, trained once per module and shared by its two bf16 modes."""
    runs = {}

    def run(family: str) -> list[dict]:
        if family not in runs:
            logs, unmoved = _train(family, "fp32", tmp_path_factory.mktemp(f"{family}-fp32"))
            assert not unmoved, unmoved
            runs[family] = logs
        return runs[family]

    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_trains_like_fp32(family: str, mode: str, fp32_run, tmp_path):
    expected = fp32_run(family)
    logs, unmoved = _train(family, mode, tmp_path)
    assert len(logs) == len(expected) == 2
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) for e in logs), logs
    assert not unmoved, f"did not move (or changed dtype): {unmoved}"
    assert_close(torch.tensor([e["loss"] for e in logs]), torch.tensor([e["loss"] for e in expected]),
                 dtype=torch.bfloat16, name="losses")
    assert_close(torch.tensor(logs[0]["grad_norm"]), torch.tensor(expected[0]["grad_norm"]), dtype=torch.bfloat16,
                 name="first grad_norm")
    reward = {"grpo": "reward", "ppo": "objective/scores"}.get(family)
    if reward is not None:  # the same completions were sampled
        assert logs[0][reward] == expected[0][reward]
