"""Masked whitening and the sequence-level advantage estimators: hand-derived values (the docstring examples), TRL
1.16's formulas written inline, and finite results for groups of one and all-equal rewards."""

from __future__ import annotations

import math

import pytest
import torch

import fusedrl
from tests.utils import assert_close


def _trl_nanstd(x: torch.Tensor, dim=None) -> torch.Tensor:
    # trl.trainer.utils.nanstd, restated: NaN-ignoring mean of squared deviations times count / (count - 1).
    keep = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=keep, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=keep, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=keep, keepdim=True)
    variance = variance * torch.where(count > 1, count / (count - 1), torch.nan)
    std = variance.sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)


def _trl_grpo(rewards: torch.Tensor, G: int, scale: str) -> torch.Tensor:
    # GRPOTrainer._generate_and_score_completions, "sum_then_normalize" branch.
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    if scale in ("group", "none"):
        std = _trl_nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) if G > 1 else torch.zeros_like(rewards)
    else:
        std = _trl_nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _trl_rloo(rewards: torch.Tensor, G: int, normalize: bool) -> torch.Tensor:
    # RLOOTrainer._generate_and_score_completions.
    grouped = rewards.view(-1, G)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    if G > 1:
        advantages = rewards - ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    else:
        advantages = torch.zeros_like(rewards)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (_trl_nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _rewards(num_prompts: int, G: int, with_nan: bool = False) -> torch.Tensor:
    rewards = torch.randn(num_prompts * G) * 3
    rewards[:G] = 2.0  # a group of all-equal rewards
    if with_nan:
        rewards[G + 1] = torch.nan  # one completion no reward function could score
    return rewards


# ---------------------------------------------------------------------------------------------------------------
# whitening


def test_masked_moments_hand_values():
    """x = [1, 2, 3, 100], mask [1, 1, 1, 0]: mean 2, squared deviations [1, 0, 1] -> biased var 2/3, unbiased 1;
    whitened (x - 2) / sqrt(1 + 1e-8) = [-1, 0, 1, 98]; with shift_mean=False the mean 2 comes back: [1, 2, 3, 100]."""
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    assert_close(fusedrl.masked_mean(x, mask), 2.0)
    assert_close(fusedrl.masked_var(x, mask), 1.0)
    assert_close(fusedrl.masked_var(x, mask.float(), unbiased=False), 2.0 / 3.0)
    assert_close(fusedrl.masked_whiten(x, mask), torch.tensor([-1.0, 0.0, 1.0, 98.0]))
    assert_close(fusedrl.masked_whiten(x, mask, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 100.0]))


def test_masked_mean_over_dim_and_trl_whiten_formula():
    x, mask = torch.randn(4, 9), torch.rand(4, 9) > 0.3
    m = mask.float()
    assert_close(fusedrl.masked_mean(x, mask, 1), (x * m).sum(1) / m.sum(1))
    # TRL's (pre-1.0 trl.core) masked_whiten, restated: rsqrt(unbiased masked var + 1e-8).
    mean = (x * m).sum() / m.sum()
    var = ((x - mean) ** 2 * m).sum() / m.sum() * (m.sum() / (m.sum() - 1))
    assert_close(fusedrl.masked_whiten(x, mask), (x - mean) * torch.rsqrt(var + 1e-8))
    assert_close(fusedrl.masked_whiten(x, mask, shift_mean=False), (x - mean) * torch.rsqrt(var + 1e-8) + mean)


def test_whiten_errors():
    with pytest.raises(ValueError, match="no nonzero entry"):
        fusedrl.masked_var(torch.ones(3), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask shape"):
        fusedrl.masked_whiten(torch.ones(3), torch.ones(4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------
# estimators


def test_group_advantages_hand_values():
    """Docstring example: G = 2, rewards [1, 3, 5, 5]; group means [2, 5], group stds [sqrt 2, 0], batch std
    sqrt(11/3) (mean 3.5, squared deviations 6.25 + 0.25 + 2.25 + 2.25 = 11 over 3)."""
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0])
    group = 1.0 / (math.sqrt(2.0) + 1e-4)
    batch = 1.0 / (math.sqrt(11.0 / 3.0) + 1e-4)
    assert_close(fusedrl.group_advantages(rewards, 2), torch.tensor([-group, group, 0.0, 0.0]))
    assert_close(fusedrl.group_advantages(rewards, 2, scale="batch"), torch.tensor([-batch, batch, 0.0, 0.0]))
    assert_close(fusedrl.group_advantages(rewards, 2, scale="none"), torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(fusedrl.group_advantages(rewards, 2, scale=True), fusedrl.group_advantages(rewards, 2))
    assert torch.equal(fusedrl.group_advantages(rewards, 2, scale=False),
                       fusedrl.group_advantages(rewards, 2, scale="none"))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [1, 2, 8])
@pytest.mark.parametrize("with_nan", [False, True], ids=["scored", "unscorable"])
def test_group_advantages_match_trl(scale, G, with_nan):
    rewards = _rewards(6, G, with_nan=with_nan and G > 1)
    ours = fusedrl.group_advantages(rewards, G, scale=scale)
    assert torch.isfinite(ours).all()
    assert_close(ours, _trl_grpo(rewards, G, scale))


def test_rloo_hand_value():
    """Docstring example: G = 3, rewards [1, 2, 6]: leave-one-out baselines (2+6)/2 = 4, (1+6)/2 = 3.5,
    (1+2)/2 = 1.5 -> advantages [-3, -1.5, 4.5]."""
    assert_close(fusedrl.rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), torch.tensor([-3.0, -1.5, 4.5]))


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("with_nan", [False, True], ids=["scored", "unscorable"])
def test_rloo_matches_trl(G, normalize, with_nan):
    rewards = _rewards(5, G, with_nan=with_nan and G > 1)
    ours = fusedrl.rloo_advantages(rewards, G, normalize=normalize)
    assert torch.isfinite(ours).all()
    assert_close(ours, _trl_rloo(rewards, G, normalize))


def test_reinforce_pp_hand_values():
    """Docstring example: G = 2, rewards [1, 3, 5, 5].
    baseline: minus group means [2, 5] -> [-1, 1, 0, 0], mean 0, unbiased var 2/3 -> +-1 / sqrt(2/3) = +-1.22474.
    no baseline: mean 3.5, unbiased var 11/3 -> (r - 3.5) / 1.91485 = [-1.30558, -0.26112, 0.78335, 0.78335]."""
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0])
    assert_close(fusedrl.reinforce_pp_advantages(rewards, 2),
                 torch.tensor([-1.2247449, 1.2247449, 0.0, 0.0]), rtol=1e-5, atol=1e-5)
    assert_close(fusedrl.reinforce_pp_advantages(rewards, 2, baseline=False),
                 torch.tensor([-1.3055824, -0.2611165, 0.7833495, 0.7833495]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("baseline", [True, False])
def test_reinforce_pp_is_whitened_formula(baseline):
    rewards = _rewards(4, 4)
    centred = rewards - rewards.view(-1, 4).mean(1).repeat_interleave(4) if baseline else rewards
    expected = (centred - centred.mean()) / torch.sqrt(centred.var(unbiased=True) + 1e-8)
    assert_close(fusedrl.reinforce_pp_advantages(rewards, 4, baseline=baseline), expected)


@pytest.mark.parametrize("estimator", ["group", "batch", "none", "rloo", "rloo_norm", "rpp", "rpp_nobase"])
@pytest.mark.parametrize("rewards,G", [
    (torch.full((6,), 0.7), 3),  # all equal
    (torch.tensor([1.0, -2.0, 5.0]), 1),  # groups of one
    (torch.tensor([4.0]), 1),  # a batch of one
    (torch.tensor([1.0, float("nan"), 2.0, 2.0]), 2),  # a group with a single scorable completion
], ids=["all_equal", "groups_of_one", "single", "one_scorable"])
def test_degenerate_groups_are_finite(estimator, rewards, G):
    fn = {
        "group": lambda: fusedrl.group_advantages(rewards, G),
        "batch": lambda: fusedrl.group_advantages(rewards, G, scale="batch"),
        "none": lambda: fusedrl.group_advantages(rewards, G, scale="none"),
        "rloo": lambda: fusedrl.rloo_advantages(rewards, G),
        "rloo_norm": lambda: fusedrl.rloo_advantages(rewards, G, normalize=True),
        "rpp": lambda: fusedrl.reinforce_pp_advantages(rewards, G),
        "rpp_nobase": lambda: fusedrl.reinforce_pp_advantages(rewards, G, baseline=False),
    }[estimator]
    out = fn()
    assert out.shape == rewards.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    if (rewards == rewards[0]).all():  # no signal: 0 (RLOO up to the rounding of its group sum, ~6e-8 here)
        assert_close(out, torch.zeros_like(out))


@pytest.mark.parametrize("call,match", [
    (lambda: fusedrl.group_advantages(torch.ones(5), 2), "multiple of num_generations=2"),
    (lambda: fusedrl.group_advantages(torch.ones(4), 0), "num_generations must be an int >= 1"),
    (lambda: fusedrl.group_advantages(torch.ones(4), 2, scale="std"), "scale must be one of"),
    (lambda: fusedrl.rloo_advantages(torch.ones(2, 2), 2), r"rewards must be a 1-D float tensor"),
    (lambda: fusedrl.reinforce_pp_advantages(torch.ones(4, dtype=torch.int64), 2), "1-D float tensor"),
], ids=["not_multiple", "zero_generations", "bad_scale", "2d", "int"])
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
