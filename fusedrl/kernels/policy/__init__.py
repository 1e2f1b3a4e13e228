"""RL policy and value losses: TRL 1.16's GRPO/PPO clipped objective, KL estimators and the clipped value loss.

``reference`` is the readable fp32 ground truth; ``tokenwise`` the same loss with its analytic gradient per row (the
compiled backend); ``triton_loss`` that math in one Triton launch (imported on first use by the engine).
"""

from fusedrl.kernels.policy.reference import (
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    PolicyLossOutput,
    aggregate,
    high_entropy_mask,
    kl_penalty_reference,
    policy_loss_reference,
    value_loss_reference,
)

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "PolicyLossOutput",
    "aggregate",
    "high_entropy_mask",
    "kl_penalty_reference",
    "policy_loss_reference",
    "value_loss_reference",
]
