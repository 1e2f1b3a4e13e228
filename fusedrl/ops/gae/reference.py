"""Readable fp32 GAE: the reverse loop over T that the other backends are tested and benchmarked against.

Legend: B rows (sequences), T positions.

Semantics (shared by every backend of ``fusedrl.gae``). Per row, let ``t_1 < ... < t_n`` be the unmasked positions
and ``c = gamma * lam``. Masked (padding) positions are skipped, so the state is carried across them:
    next_value(t_k) = values[t_{k+1}]   (0 after the last unmasked position: the episode ends there)
    delta(t_k)      = rewards[t_k] + gamma * next_value(t_k) - values[t_k]
    A(t_k)          = delta(t_k) + c * A(t_{k+1})          (A after the last unmasked position is 0)
    returns(t_k)    = A(t_k) + values[t_k]
and both outputs are 0 at masked positions (their rewards and values are never read). Without padding this is the
textbook recurrence of Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
Estimation" (2016), and TRL's PPO loop.
"""

from __future__ import annotations

import torch


def gae_reference(
    rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)`` ``[B, T]`` by a Python loop over T vectorised over B (no autograd).

    rewards, values: ``[B, T]`` any float dtype; mask: ``[B, T]`` bool (True = a real position). Computes in fp32,
    or fp64 for fp64 inputs (the tests' ground truth for long rows).
    """
    dtype = torch.promote_types(rewards_BT.dtype, torch.float32)
    with torch.no_grad():
        rewards_BT, values_BT = rewards_BT.to(dtype), values_BT.to(dtype)
        mask_BT = mask_BT.bool()
        advantages_BT = torch.zeros_like(rewards_BT)
        next_value_B = rewards_BT.new_zeros(rewards_BT.shape[0])
        running_B = rewards_BT.new_zeros(rewards_BT.shape[0])
        for t in reversed(range(rewards_BT.shape[1])):
            real_B = mask_BT[:, t]
            delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
            # Padding leaves both carried quantities untouched: the next real position sees the state of the one
            # after the gap.
            running_B = torch.where(real_B, delta_B + gamma * lam * running_B, running_B)
            next_value_B = torch.where(real_B, values_BT[:, t], next_value_B)
            advantages_BT[:, t] = torch.where(real_B, running_B, 0.0)
        returns_BT = torch.where(mask_BT, advantages_BT + values_BT, 0.0)
    return advantages_BT, returns_BT
