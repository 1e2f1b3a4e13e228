"""Public GAE op and its torch.library registration.

Legend: B rows (sequences), T positions.

Backends of the ``gae`` op:
- ``reference``: ``reference.py``, a Python loop over T (plain torch; Dynamo unrolls it when traced);
- ``compiled``: the ``fusedrl::gae`` custom op running ``torch.compile`` of ``compiled.py`` (no loop over T);
- ``triton``: the same custom op running ``triton.py``: one launch, a program per block of rows; a kernel that fails
  to build falls back to ``compiled`` (``dispatch.define_op``).
The custom op has a fake implementation, so a ``torch.compile(fullgraph=True)`` region captures it as one node.
It has no autograd: GAE produces PPO's regression targets, which are constants (TRL computes them under no_grad).
Benchmarks: ``benchmarks/ops/gae.py``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from fusedrl.ops import checks, dispatch
from fusedrl.ops.compiler import compile_kernel
from fusedrl.ops.gae import compiled
from fusedrl.ops.gae.reference import gae_reference

dispatch.register_op("gae", "generalised advantage estimation (advantages, returns) over [B, T] rollouts")


class GAEResult(NamedTuple):
    """fp32 ``[B, T]`` advantages and returns (``advantages + values``), both 0 at masked positions, detached."""

    advantages: torch.Tensor
    returns: torch.Tensor


@functools.lru_cache(maxsize=32)
def _discount_inputs(gamma: float, lam: float, num_steps: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    # gamma and the discount powers go to the compiled graph as tensors: Dynamo specialises Python floats, so each
    # new value would recompile. Cached: a training run uses one (gamma, lam) and a few T; building them costs
    # ~0.1 ms per call, ~3% of a [256, 4096] GAE on one core.
    gamma_t = torch.tensor(gamma, dtype=torch.float32, device=device)
    return (gamma_t, *compiled.discount_tables(gamma, lam, num_steps, device))


def _compiled_gae(rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float,
                  lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    # Rows with padding between real positions need the compacting variant (scatter/gather, ~2x slower); the usual
    # left/right padding does not. The check is one pass over the mask (~1 ms at [256, 4096] on one core).
    gaps = int(compile_kernel(compiled.max_runs)(mask_BT)) > 1
    variant = compiled.gae_compacted if gaps else compiled.gae_contiguous
    discount = _discount_inputs(gamma, lam, rewards_BT.shape[1], rewards_BT.device)
    return compile_kernel(variant)(rewards_BT, values_BT, mask_BT, *discount)


def _fake_gae(rewards, values, mask, gamma, lam):
    out = rewards.new_empty(rewards.shape, dtype=torch.float32)
    return out, torch.empty_like(out)


# No autograd: GAE produces PPO's regression targets, which are constants.
_gae_op = dispatch.define_op("gae", op="gae", compiled=_compiled_gae, triton="fusedrl.ops.gae.triton:gae_fwd",
                             fake=_fake_gae)


def _check_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> None:
    checks.check_float("rewards", rewards, min_dim=2)
    checks.check_float("values", values, min_dim=2)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T] (one row per sequence), got shape {tuple(rewards.shape)}")
    if values.shape != rewards.shape or values.device != rewards.device:
        raise ValueError(f"values {tuple(values.shape)} on {values.device} must match rewards "
                         f"{tuple(rewards.shape)} on {rewards.device}")
    if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool or float (0/1) tensor, got {got}; pass completion_mask.bool()")
    if mask.shape != rewards.shape or mask.device != rewards.device:
        raise ValueError(f"mask {tuple(mask.shape)} on {mask.device} must match rewards "
                         f"{tuple(rewards.shape)} on {rewards.device}")
    for name, value in (("gamma", gamma), ("lam", lam)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> GAEResult:
    """Generalised advantage estimation over padded rollouts: ``GAEResult(advantages, returns)``, fp32 ``[B, T]``.

    rewards, values: ``[B, T]`` fp32 / bf16 / fp16 (computed in fp32); mask: ``[B, T]`` bool, or float read as
    ``mask != 0``; True marks a real position. gamma (discount) and lam (GAE lambda) in [0, 1].

    Per row, with ``c = gamma * lam`` and the real positions taken in order, masked positions skipped:
        delta_t = rewards_t + gamma * values_next - values_t,   A_t = delta_t + c * A_next,
    where ``next`` is the next REAL position (padding in between carries the state across) and the value and
    advantage after the last real position are 0 (the episode ends there). ``returns = advantages + values``.
    Both outputs are 0 at masked positions, whose rewards and values are never read. Without padding this is
    TRL's PPO loop. Example (gamma = 1, lam = 0.5, one row, mask [1, 0, 1]): rewards [0, 9, 1], values [0.5, 9, 1]
    -> deltas at the real positions: 0 + 1 * 1 - 0.5 = 0.5 and 1 + 0 - 1 = 0; A = [0.5 + 0.5 * 0, 0, 0],
    returns = [1.0, 0, 1.0].

    No autograd: GAE gives PPO its constant targets and runs under no_grad there. Inputs that require grad are
    accepted and read as constants (outputs are detached and have no grad_fn).
    """
    _check_gae(rewards, values, mask, gamma, lam)
    rewards, values = rewards.detach(), values.detach()
    mask = mask.detach() if mask.dtype == torch.bool else mask.detach() != 0
    backend = dispatch.traced_backend("gae", rewards.device)
    if backend == "reference":
        return GAEResult(*gae_reference(rewards, values, mask, gamma=float(gamma), lam=float(lam)))
    rewards_BT, values_BT = rewards.float().contiguous(), values.float().contiguous()
    return GAEResult(*_gae_op(rewards_BT, values_BT, mask.contiguous(), float(gamma), float(lam), backend))
