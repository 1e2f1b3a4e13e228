"""GAE as one Triton launch: a program per block of BLOCK_B rows runs the reverse recurrence in registers.

Legend: B rows, T positions, BLOCK_B rows per program (one row per thread).

Same semantics as ``reference.gae_reference``. Each program walks t = T-1 .. 0 once, holding two fp32 values per
row in registers: the running advantage and the value of the next real position; a masked position leaves both
unchanged, which is how the state is carried across padding. Every input element is read once and every output
written once (17 bytes per position with a bool mask: the minimum; the AOT report's traffic model).

Parallelism is over rows only (the recurrence is sequential in t): at B=256 that is 8 programs of 32 rows. A step's
loads do not depend on the carried state, so the loop's latency is the chain of two FMAs per step, not the loads.
The 32 rows of a program read 32 different rows at each step (stride T); each 32-byte sector then serves 8
consecutive steps from L1/L2, so DRAM traffic stays near the model (a modelled figure, not measured on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 32
NUM_WARPS = 1


@triton.jit
def _gae_fwd_kernel(
    rewards_ptr,  # [B, T] fp32, rows ``stride_row`` elements apart, positions contiguous
    values_ptr,  # [B, T] fp32, same layout
    mask_ptr,  # [B, T] bool (i1), same layout; True = a real position
    advantages_ptr,  # [B, T] fp32 out, same layout; 0 at masked positions
    returns_ptr,  # [B, T] fp32 out, same layout; advantages + values, 0 at masked positions
    num_rows,  # B
    num_steps,  # T
    stride_row,  # elements between two rows of every tensor
    gamma,  # discount, fp32
    discount,  # gamma * lam, fp32
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < num_rows
    # int64: B * T passes 2^31 at B = 512, T = 4M, or sooner with padded strides.
    row_start = rows.to(tl.int64) * stride_row
    running = tl.zeros([BLOCK_B], dtype=tl.float32)
    next_value = tl.zeros([BLOCK_B], dtype=tl.float32)
    for step in range(num_steps):
        offsets = row_start + (num_steps - 1 - step)
        real = tl.load(mask_ptr + offsets, mask=row_ok, other=0) != 0
        # Padding's rewards and values are never read (other=0 keeps the discarded math finite).
        reward = tl.load(rewards_ptr + offsets, mask=row_ok & real, other=0.0)
        value = tl.load(values_ptr + offsets, mask=row_ok & real, other=0.0)
        delta = reward + gamma * next_value - value
        running = tl.where(real, delta + discount * running, running)
        next_value = tl.where(real, value, next_value)
        tl.store(advantages_ptr + offsets, tl.where(real, running, 0.0), mask=row_ok)
        tl.store(returns_ptr + offsets, tl.where(real, running + value, 0.0), mask=row_ok)


def gae_fwd(
    rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)`` fp32 ``[B, T]``. rewards, values: fp32 ``[B, T]``; mask: bool ``[B, T]``; all
    three contiguous (the op wrapper makes them so)."""
    rewards_BT, values_BT, mask_BT = rewards_BT.contiguous(), values_BT.contiguous(), mask_BT.contiguous()
    num_rows, num_steps = rewards_BT.shape
    advantages_BT = torch.empty_like(rewards_BT, dtype=torch.float32)
    returns_BT = torch.empty_like(advantages_BT)
    if advantages_BT.numel() == 0:
        return advantages_BT, returns_BT
    grid = (triton.cdiv(num_rows, BLOCK_ROWS),)
    _gae_fwd_kernel[grid](
        rewards_BT, values_BT, mask_BT, advantages_BT, returns_BT,
        num_rows, num_steps, num_steps, float(gamma), float(gamma) * float(lam),
        BLOCK_B=BLOCK_ROWS, num_warps=NUM_WARPS,
    )
    return advantages_BT, returns_BT
