"""Masked whitening and sequence-level advantage estimators (GRPO, RLOO, REINFORCE++): pure torch, vectorised.

Legend: N completions = num_prompts * G, G = ``num_generations``. Rows are grouped contiguously, as in TRL: rows
``g*G .. g*G+G-1`` are the G completions of prompt g, so ``rewards_N.view(-1, G)`` has one group per row.

The estimators are ``[N]`` ops costing microseconds, so each has one readable implementation (no registry, no
Triton). A NaN reward marks a completion no reward function could score (TRL's convention): it is left out of every
mean and standard deviation, and its advantage is 0. Every estimator returns finite values for groups of size 1 and
for all-equal rewards (their advantage is 0).
"""

from __future__ import annotations

import torch

# TRL's epsilons: 1e-8 inside the square root of masked whitening (PPO), 1e-4 added to the std of GRPO / RLOO.
WHITEN_EPS = 1e-8
STD_EPS = 1e-4
SCALE_REWARDS = ("group", "batch", "none")


# ---------------------------------------------------------------------------------------------------- masked moments


def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal x.shape {tuple(like.shape)}")
    return mask.to(like.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero, over ``dim`` (all dims when None).

    x: any float tensor; mask: bool or 0/1 float, same shape. ``sum(x * mask) / sum(mask)``: a slice with no
    unmasked position gives NaN (0 / 0), as in TRL's helper.
    """
    mask = _float_mask(mask, x)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the unmasked entries of ``x`` (a scalar), Bessel-corrected (``n / (n - 1)``) when ``unbiased``.

    An all-masked input raises ValueError (checked eagerly; skipped while torch.compile traces). With a single
    unmasked entry the unbiased variance is 0 * inf = NaN, as in TRL; pass ``unbiased=False`` there.
    """
    mask = _float_mask(mask, x)
    count = mask.sum()
    if not torch.compiler.is_compiling() and bool(count == 0):
        raise ValueError("mask has no nonzero entry: the masked variance of an empty selection is undefined")
    centered = x - masked_mean(x, mask)
    variance = masked_mean(centered * centered, mask)
    if unbiased:
        variance = variance * (count / (count - 1))
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` with the masked mean and unbiased masked variance of ``x`` (TRL's PPO
    whitening). With ``shift_mean=False`` the mean is added back: only the scale changes.

    x: any float tensor; mask: bool or 0/1 float, same shape. Every position is transformed, masked ones included
    (they do not enter the statistics); zero them afterwards if they must stay 0.
    Example: x = [1, 2, 3, 100], mask = [1, 1, 1, 0] -> mean 2, unbiased var 1 -> [-1, 0, 1, 98] (to ~5e-9).
    """
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + WHITEN_EPS)
    return whitened if shift_mean else whitened + mean


# ------------------------------------------------------------------------------------------------------- estimators


def _grouped(rewards_N: torch.Tensor, num_generations: int) -> torch.Tensor:
    if not isinstance(rewards_N, torch.Tensor) or not rewards_N.is_floating_point() or rewards_N.dim() != 1:
        got = f"{rewards_N.dtype} {tuple(rewards_N.shape)}" if isinstance(rewards_N, torch.Tensor) else type(rewards_N)
        raise ValueError(f"rewards must be a 1-D float tensor [N], got {got}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be an int >= 1, got {num_generations!r}")
    if rewards_N.numel() == 0 or rewards_N.numel() % num_generations:
        raise ValueError(
            f"rewards has {rewards_N.numel()} entries, not a positive multiple of num_generations={num_generations}; "
            "pass the G completions of every prompt, grouped contiguously"
        )
    return rewards_N.float().view(-1, num_generations)


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected std over non-NaN entries; NaN when fewer than two (TRL's ``nanstd``)."""
    count = (~x.isnan()).sum(dim=dim, keepdim=True)
    centered = x - x.nanmean(dim=dim, keepdim=True)
    variance = (centered * centered).nansum(dim=dim, keepdim=True) / (count - 1).clamp_min(1)
    std = torch.where(count > 1, variance.sqrt(), torch.nan)
    if keepdim:
        return std
    return std.reshape(()) if dim is None else std.squeeze(dim)


def group_advantages(rewards_N: torch.Tensor, num_generations: int, *, scale: str | bool = "group") -> torch.Tensor:
    """GRPO advantages (TRL 1.16 ``GRPOTrainer``, ``multi_objective_aggregation="sum_then_normalize"``), fp32 ``[N]``.

    ``A_i = (r_i - mean_group(r)) / (std + 1e-4)`` with std (Bessel-corrected) by ``scale`` (TRL's
    ``GRPOConfig.scale_rewards``; True means "group", False "none"):
    - ``"group"``: the std of the completion's own group (0 when G = 1);
    - ``"batch"``: the std of all N rewards (0 when N = 1); the baseline is still the group mean;
    - ``"none"``: no division (Dr. GRPO).
    Example: G = 2, rewards [1, 3, 5, 5]: group means [2, 5], group stds [sqrt 2, 0] ->
    "group": [-1/(1.41421+1e-4), +1/(1.41421+1e-4), 0, 0] ~ [-0.70706, 0.70706, 0, 0]; "none": [-1, 1, 0, 0].
    """
    scale = {True: "group", False: "none"}.get(scale, scale) if isinstance(scale, bool) else scale
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {', '.join(SCALE_REWARDS)} (or True / False), got {scale!r}")
    grouped_PG = _grouped(rewards_N, num_generations)
    centered_PG = grouped_PG - grouped_PG.nanmean(1, keepdim=True)
    if scale == "group":
        std = _nanstd(grouped_PG, 1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped_PG)
        centered_PG = centered_PG / (std + STD_EPS)
    elif scale == "batch":
        std = _nanstd(grouped_PG) if grouped_PG.numel() > 1 else grouped_PG.new_zeros(())
        centered_PG = centered_PG / (std + STD_EPS)
    return torch.nan_to_num(centered_PG.reshape(-1), nan=0.0)


def rloo_advantages(rewards_N: torch.Tensor, num_generations: int, *, normalize: bool = False) -> torch.Tensor:
    """RLOO leave-one-out advantages (TRL 1.16 ``RLOOTrainer``), fp32 ``[N]``.

    ``A_i = r_i - (sum_group(r) - r_i) / (G - 1)``: each completion's baseline is the mean of its G - 1 siblings
    (Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
    LLMs", 2024). G = 1 gives 0. ``normalize`` is TRL's ``normalize_advantages``: then
    ``(A - mean(A)) / (std(A) + 1e-4)`` over all N.
    Example: G = 3, rewards [1, 2, 6]: baselines [4, 3.5, 1.5] -> [-3, -1.5, 4.5].
    """
    grouped_PG = _grouped(rewards_N, num_generations)
    if num_generations == 1:
        advantages_N = torch.zeros_like(grouped_PG).reshape(-1)
    else:
        scorable_P1 = (~grouped_PG.isnan()).sum(1, keepdim=True)
        baseline_PG = (grouped_PG.nansum(1, keepdim=True) - grouped_PG) / (scorable_P1 - 1)
        advantages_N = (grouped_PG - baseline_PG).reshape(-1)
    if normalize:
        std = _nanstd(advantages_N) if advantages_N.numel() > 1 else advantages_N.new_zeros(())
        advantages_N = (advantages_N - advantages_N.nanmean()) / (std + STD_EPS)
    return torch.nan_to_num(advantages_N, nan=0.0)


def _batch_whiten(x_N: torch.Tensor) -> torch.Tensor:
    """:func:`masked_whiten` over the non-NaN entries; 0 when fewer than two (no variance to divide by)."""
    scorable_N = ~x_N.isnan()
    if int(scorable_N.sum()) < 2:
        return torch.zeros_like(x_N)
    return torch.where(scorable_N, masked_whiten(torch.nan_to_num(x_N, nan=0.0), scorable_N), 0.0)


def reinforce_pp_advantages(rewards_N: torch.Tensor, num_generations: int, *, baseline: bool = True) -> torch.Tensor:
    """REINFORCE++ sequence-level advantages (Hu et al., "REINFORCE++: An Efficient RLHF Algorithm with Robustness
    to Both Prompt and Reward Models", 2025), fp32 ``[N]``.

    - ``baseline=True`` (REINFORCE++-baseline): subtract the group mean, then whiten over the batch:
      ``A = whiten(r - mean_group(r))``;
    - ``baseline=False``: ``A = whiten(r)`` over the batch (global advantage normalisation, no critic, no group).
    ``whiten`` is :func:`masked_whiten`: ``(x - mean) / sqrt(var + 1e-8)`` with the unbiased variance over the N
    scorable entries (a batch of one gives 0). The paper's token-level KL shaping of the reward is the trainer's.
    Example: G = 2, rewards [1, 3, 5, 5], baseline: centred [-1, 1, 0, 0], mean 0, unbiased var 2/3 ->
    [-1.22474, 1.22474, 0, 0]; no baseline: mean 3.5, var 11/3 -> [-1.30558, -0.26112, 0.78335, 0.78335].
    """
    grouped_PG = _grouped(rewards_N, num_generations)
    if baseline:
        grouped_PG = grouped_PG - grouped_PG.nanmean(1, keepdim=True)
    return torch.nan_to_num(_batch_whiten(grouped_PG.reshape(-1)), nan=0.0)
