"""The DPO run of the resume cases (tests/runtime/test_resume.py, whose docstring describes them), which
tests/runtime/test_faults.py also kills and poisons. Both files also run it in worker subprocesses started with
``PYTHONPATH`` at the repository, which is how those import this module. :class:`KillAtStep` is the SIGKILL of every
resume test (tests/trainers/test_online_resume.py too)."""

from __future__ import annotations

import os
import signal

from peft import LoraConfig
from transformers import TrainerCallback

from fusedrl.cli import presets
from fusedrl.trainers.preference.dpo import DPOTrainer
from fusedrl.trainers.preference.dpo_config import DPOConfig

MAX_STEPS, SAVE_STEPS = 8, 3


class KillAtStep(TrainerCallback):
    """Test-only: SIGKILL this process at the end of optimizer step ``step`` (before that step logs or saves)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def build_trainer(case: str, output_dir: str, *, callbacks=None, **overrides) -> DPOTrainer:
    """The DPO trainer of ``case`` (``plain``, ``lora_ga2`` or ``sync_ref``); ``overrides`` go to DPOConfig."""
    fields = {
        "output_dir": output_dir, "kernels": "all=reference", "max_steps": MAX_STEPS, "save_strategy": "steps",
        "save_steps": SAVE_STEPS, "logging_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 3e-3,
        "beta": 0.2, "report_to": "none", "bf16": False, "use_cpu": True, "disable_tqdm": True,
        "dataloader_pin_memory": False, "gradient_checkpointing": False, "seed": 0, "max_length": 32,
    }
    peft_config = None
    if case == "lora_ga2":
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        fields.update(gradient_accumulation_steps=2, learning_rate=2e-2, logging_steps=2)
    elif case == "sync_ref":
        fields.update(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5)
    fields.update(overrides)
    tokenizer = presets.build_tokenizer()
    num_rows = 12 if case == "lora_ga2" else 10
    return DPOTrainer(
        model=presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer), args=DPOConfig(**fields),
        train_dataset=presets.load_preset_dataset("arithmetic", "train", n=num_rows, seed=0),
        processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
    )
