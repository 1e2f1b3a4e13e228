"""TRL-compatible trainers on fusedrl's fused kernels: swap ``from trl import DPOTrainer, DPOConfig`` for
``from fusedrl.trainers import DPOTrainer, DPOConfig`` (fusedrl never imports trl)."""

from fusedrl.trainers.base import FusedConfig, FusedTrainer
from fusedrl.trainers.dpo import DPOTrainer
from fusedrl.trainers.dpo_config import DPOConfig

__all__ = ["DPOConfig", "DPOTrainer", "FusedConfig", "FusedTrainer"]
