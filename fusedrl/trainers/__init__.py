"""TRL-compatible trainers on fusedrl's fused kernels: swap ``from trl import DPOTrainer, DPOConfig`` for
``from fusedrl.trainers import DPOTrainer, DPOConfig`` (fusedrl never imports trl).

``preference/``: DPO, ORPO, CPO, KTO; ``online/``: GRPO, RLOO, PPO, Online DPO; ``base``: what they share.
"""

from fusedrl.trainers.base import FusedTrainer
from fusedrl.trainers.config import FusedConfig
from fusedrl.trainers.online.grpo import GRPOTrainer
from fusedrl.trainers.online.grpo_config import GRPOConfig
from fusedrl.trainers.online.online_dpo import OnlineDPOTrainer
from fusedrl.trainers.online.online_dpo_config import OnlineDPOConfig
from fusedrl.trainers.online.ppo import PPOTrainer
from fusedrl.trainers.online.ppo_config import PPOConfig
from fusedrl.trainers.online.rloo import RLOOTrainer
from fusedrl.trainers.online.rloo_config import RLOOConfig
from fusedrl.trainers.preference.cpo import CPOTrainer
from fusedrl.trainers.preference.cpo_config import CPOConfig
from fusedrl.trainers.preference.dpo import DPOTrainer
from fusedrl.trainers.preference.dpo_config import DPOConfig
from fusedrl.trainers.preference.kto import KTOTrainer
from fusedrl.trainers.preference.kto_config import KTOConfig
from fusedrl.trainers.preference.orpo import ORPOTrainer
from fusedrl.trainers.preference.orpo_config import ORPOConfig

__all__ = [
    "CPOConfig", "CPOTrainer", "DPOConfig", "DPOTrainer", "FusedConfig", "FusedTrainer", "GRPOConfig", "GRPOTrainer",
    "KTOConfig", "KTOTrainer", "ORPOConfig", "ORPOTrainer", "OnlineDPOConfig", "OnlineDPOTrainer", "PPOConfig",
    "PPOTrainer", "RLOOConfig", "RLOOTrainer",
]
