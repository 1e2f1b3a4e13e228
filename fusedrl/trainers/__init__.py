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

from fusedrl.trainers.grpo import GRPOTrainer
from fusedrl.trainers.grpo_config import GRPOConfig
from fusedrl.trainers.rloo import RLOOTrainer
from fusedrl.trainers.rloo_config import RLOOConfig

__all__ += ["GRPOConfig", "GRPOTrainer", "RLOOConfig", "RLOOTrainer"]

from fusedrl.trainers.online_dpo import OnlineDPOTrainer
from fusedrl.trainers.online_dpo_config import OnlineDPOConfig
from fusedrl.trainers.ppo import PPOTrainer
from fusedrl.trainers.ppo_config import PPOConfig

__all__ += ["OnlineDPOConfig", "OnlineDPOTrainer", "PPOConfig", "PPOTrainer"]
