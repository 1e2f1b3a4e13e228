"""Every trainer and loss type learns on the bundled task: over 24 steps on the tiny preset the loss falls on
average (mean of the last 8 logged losses below the mean of the first 8) and the parameters move.

Deterministic (seeded model, data and order), so a failure is a real regression, not noise.
"""

from __future__ import annotations

import pytest
import torch

from fusedrl.cli import presets
from fusedrl.ops.preference.reference.cpo import CPO_LOSS_TYPES
from fusedrl.ops.preference.reference.dpo import DPO_LOSS_TYPES
from fusedrl.trainers.preference.cpo import CPOTrainer
from fusedrl.trainers.preference.cpo_config import CPOConfig
from fusedrl.trainers.preference.dpo import DPOTrainer
from fusedrl.trainers.preference.dpo_config import DPOConfig
from fusedrl.trainers.preference.kto import KTOTrainer
from fusedrl.trainers.preference.kto_config import KTOConfig
from fusedrl.trainers.preference.orpo import ORPOTrainer
from fusedrl.trainers.preference.orpo_config import ORPOConfig

STEPS, WINDOW = 24, 8
# exo_pair needs label smoothing in (0, 1); the rest run with their defaults.
EXTRA = {"exo_pair": {"label_smoothing": 0.1}}

CASES = (
    [("dpo", loss) for loss in DPO_LOSS_TYPES]
    + [("cpo", loss) for loss in CPO_LOSS_TYPES]
    + [("kto", loss) for loss in ("kto", "apo_zero_unpaired")]
    + [("orpo", None)]
)
TRAINERS = {
    "dpo": (DPOTrainer, DPOConfig, "preference"),
    "cpo": (CPOTrainer, CPOConfig, "preference"),
    "orpo": (ORPOTrainer, ORPOConfig, "preference"),
    "kto": (KTOTrainer, KTOConfig, "unpaired"),
}


@pytest.mark.parametrize("trainer_name,loss_type", CASES, ids=[f"{t}-{loss}" for t, loss in CASES])
def test_loss_falls_and_parameters_move(trainer_name, loss_type, tmp_path):
    trainer_cls, config_cls, kind = TRAINERS[trainer_name]
    tokenizer = presets.build_tokenizer()
    model = presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer)
    fields = {"loss_type": loss_type, **EXTRA.get(loss_type, {})} if loss_type else {}
    config = config_cls(
        output_dir=str(tmp_path), max_steps=STEPS, learning_rate=3e-3, per_device_train_batch_size=8,
        logging_steps=1, max_length=32, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True,
        gradient_checkpointing=False, dataloader_pin_memory=False, seed=0, **fields,
    )
    data = presets.load_preset_dataset("arithmetic", "train", kind=kind, n=STEPS * 8, seed=0)
    trainer = trainer_cls(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = torch.tensor([e["loss"] for e in trainer.state.log_history if "loss" in e and "step" in e][:STEPS])
    assert losses.numel() == STEPS and torch.isfinite(losses).all()
    assert losses[-WINDOW:].mean() < losses[:WINDOW].mean(), losses.tolist()
    moved = [name for name, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])]
    assert len(moved) == len(before)
