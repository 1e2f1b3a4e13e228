"""Loop-free GAE for ``torch.compile``: a two-level blocked reverse scan, after compacting rows with gaps.

Legend: B rows, T positions, K positions per block, NB = ceil(T / K) blocks, W = NB * K (T padded to blocks).

Same semantics as ``reference.gae_reference`` (read its docstring). No Python loop over T:

1. Deltas. When each row's real positions form one run (right or left padding, or none: ``max_runs <= 1``),
   zeroing rewards and values at padding is enough: after the run, delta = 0 and the value read by its last position
   is 0; before it, nothing is read (the recurrence only looks forward). ``gae_contiguous`` does that.
   A row with gaps needs the padding removed: ``gae_compacted`` scatters each row's real positions to the front, in
   order, with zeros behind them, so "the next real position" becomes "the next column":
       delta_j = r_j + gamma * v_{j+1} - v_j,      A_j = sum_{i >= j} c^(i - j) delta_i,   c = gamma * lam,
   and gathers the result back. (Inductor's scatter and gather loops took ~80% of that graph's time at
   [256, 4096] on one core, about half of the whole call: the contiguous case, which RL batches hold, skips them.)
2. Blocked discounted reverse cumsum. Within a block of K columns, ``L = delta @ D_K`` with the triangular
   ``D_K[i, j] = c^(i - j)`` for i >= j gives each column's sum up to the block end. The sum from each block start
   to the row end is the same recurrence one level up, over NB block sums with factor c^K: ``S = L0 @ D_NB(c^K)``.
   Then ``A = L + c^(K - j) * S_next`` adds the part after the block (j = offset in the block).
   Every power is c^n with n >= 0, so nothing overflows for c in [0, 1] (the one-level form with c^-t would overflow
   fp32 past t ~ 87 / -log c); small c only underflows towards 0, which is the true value. A K-term fp32 dot per
   column keeps the result within a few ulps of the loop's running sum (K = 64).

Cost at B=256, T=4096: the K x K triangular matmul is 2 * B * T * K = 134 MFLOP (~0.9 ms on one core), the
NB x NB one 2 * B * NB^2 = 2 MFLOP, plus a few fused elementwise passes over [B, T]; the loop makes T = 4096 steps
of several small ops each.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BLOCK = 64


class DiscountTables(NamedTuple):
    """Powers of ``c = gamma * lam`` that the GAE variants multiply by, fp32. Built eagerly, outside the compiled
    graph: traced, Inductor fuses the ``pow`` into the [B, T] loops and evaluates it per element (measured at
    B=256, T=4096 on one core: 21 ms per call with the powers inside the graph, 11 ms with them passed in)."""

    within_KK: torch.Tensor  # [K, K]: c^(i - j) for i >= j, else 0
    across_NN: torch.Tensor  # [NB, NB]: (c^K)^(i - j) for i >= j, else 0
    tail_K: torch.Tensor  # [K]: c^(K - j), the discount from offset j to the next block's start


def _discount_matrix(factor: float, size: int, device: torch.device) -> torch.Tensor:
    """``[size, size]`` fp32 with ``M[i, j] = factor^(i - j)`` for i >= j, else 0 (so ``x @ M`` sums forward)."""
    idx = torch.arange(size, device=device, dtype=torch.float64)
    exponent = idx.unsqueeze(1) - idx.unsqueeze(0)
    # fp64 powers rounded once to fp32; pow(0, 0) = 1 keeps gamma * lam = 0 exact (TD(0)). Exponents are >= 0 in
    # the kept half, so nothing overflows; small factors underflow towards 0, their true value.
    powers = torch.pow(torch.tensor(factor, dtype=torch.float64, device=device), exponent.clamp_min(0))
    return torch.where(exponent >= 0, powers, 0.0).to(torch.float32)


def num_blocks(num_steps: int) -> int:
    return (num_steps + BLOCK - 1) // BLOCK


def discount_tables(gamma: float, lam: float, num_steps: int, device: torch.device) -> DiscountTables:
    discount = float(gamma) * float(lam)
    offset = torch.arange(BLOCK, device=device, dtype=torch.float64)
    return DiscountTables(
        within_KK=_discount_matrix(discount, BLOCK, device),
        across_NN=_discount_matrix(discount**BLOCK, num_blocks(num_steps), device),
        tail_K=torch.pow(torch.tensor(discount, dtype=torch.float64, device=device), BLOCK - offset).float(),
    )


def max_runs(mask_BT: torch.Tensor) -> torch.Tensor:
    """The largest number of separate runs of real positions in a row (0-d int32): above 1, some row has padding
    between real positions and needs :func:`gae_compacted`."""
    starts_BT1 = mask_BT[:, 1:] & ~mask_BT[:, :-1]
    return (mask_BT[:, 0].to(torch.int32) + starts_BT1.to(torch.int32).sum(1)).max()


def _discounted_reverse_cumsum(
    delta_BW: torch.Tensor, within_KK: torch.Tensor, across_NN: torch.Tensor, tail_K: torch.Tensor
) -> torch.Tensor:
    """``A_j = sum_{i >= j} c^(i - j) delta_i`` along each row of ``delta_BW`` (W = NB * K), by blocks."""
    B, nb = delta_BW.shape[0], across_NN.shape[0]
    local_BNK = delta_BW.view(B, nb, BLOCK) @ within_KK
    starts_BN = local_BNK[:, :, 0] @ across_NN
    after_BN = torch.cat([starts_BN[:, 1:], starts_BN.new_zeros(B, 1)], dim=1)
    return (local_BNK + tail_K * after_BN.unsqueeze(-1)).view(B, nb * BLOCK)


def gae_contiguous(
    rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: torch.Tensor,
    within_KK: torch.Tensor, across_NN: torch.Tensor, tail_K: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)`` fp32 ``[B, T]`` for masks without gaps (``max_runs(mask_BT) <= 1``).

    rewards, values: fp32 ``[B, T]``; mask: bool ``[B, T]``; gamma: fp32 0-d tensor and the
    :class:`DiscountTables` of ``discount_tables(gamma, lam, T)`` (tensors, so new gamma / lam values do not
    recompile the graph)."""
    T = rewards_BT.shape[1]
    width = across_NN.shape[0] * BLOCK
    rewards_BW = torch.nn.functional.pad(torch.where(mask_BT, rewards_BT, 0.0), (0, width - T))
    values_BW1 = torch.nn.functional.pad(torch.where(mask_BT, values_BT, 0.0), (0, width + 1 - T))
    delta_BW = rewards_BW + gamma * values_BW1[:, 1:] - values_BW1[:, :-1]
    advantages_BT = _discounted_reverse_cumsum(delta_BW, within_KK, across_NN, tail_K)[:, :T]
    advantages_BT = torch.where(mask_BT, advantages_BT, 0.0)
    return advantages_BT, torch.where(mask_BT, advantages_BT + values_BT, 0.0)


def gae_compacted(
    rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: torch.Tensor,
    within_KK: torch.Tensor, across_NN: torch.Tensor, tail_K: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`gae_contiguous`, for any mask: compacts each row's real positions first."""
    B = rewards_BT.shape[0]
    width = across_NN.shape[0] * BLOCK
    # Real position t goes to column (number of real positions before t); padding goes to a dump column past the
    # end (width + 1), which is dropped. Column `width` stays 0: the value after the last block.
    # int32 counts: aten's int64 cumsum took 5.6 ms at [256, 4096] on one core, int32 0.6 ms.
    slot_BT = (torch.cumsum(mask_BT.to(torch.int32), dim=1, dtype=torch.int32) - 1).to(torch.int64)
    target_BT = torch.where(mask_BT, slot_BT, width + 1)
    zeros = rewards_BT.new_zeros(B, width + 2)
    rewards_BW = zeros.scatter(1, target_BT, rewards_BT)[:, :width]
    values_BW1 = zeros.scatter(1, target_BT, values_BT)
    # Beyond a row's real count both are 0, so delta = 0 there and the last real column sees next value 0.
    delta_BW = rewards_BW + gamma * values_BW1[:, 1 : width + 1] - values_BW1[:, :width]
    advantages_BW = _discounted_reverse_cumsum(delta_BW, within_KK, across_NN, tail_K)
    # Padding (and leading padding, slot -1) reads column 0 and is zeroed.
    advantages_BT = torch.where(mask_BT, advantages_BW.gather(1, slot_BT.clamp_min(0)), 0.0)
    return advantages_BT, torch.where(mask_BT, advantages_BT + values_BT, 0.0)
