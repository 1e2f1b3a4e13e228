"""TRL-compatible trainers on fusedrl's fused kernels: swap ``from trl import DPOTrainer, DPOConfig`` for
``from fusedrl.trainers import DPOTrainer, DPOConfig`` (fusedrl never imports trl)."""

from fusedrl.trainers.base import FusedConfig, FusedTrainer
from fusedrl.trainers.dpo import DPOTrainer
from fusedrl.trainers.dpo_config import DPOConfig

__all__ = ["DPOConfig", "DPOTrainer", "FusedConfig", "FusedTrainer"]

from fusedrl.trainers.cpo import CPOTrainer
from fusedrl.trainers.cpo_config import CPOConfig
from fusedrl.trainers.kto import KTOTrainer
from fusedrl.trainers.kto_config import KTOConfig
from fusedrl.trainers.orpo import ORPOTrainer
from fusedrl.trainers.orpo_config import ORPOConfig

__all__ += ["CPOConfig", "CPOTrainer", "KTOConfig", "KTOTrainer", "ORPOConfig", "ORPOTrainer"]
