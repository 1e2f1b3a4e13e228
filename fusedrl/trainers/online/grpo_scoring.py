"""GRPO's group scoring, mixed into ``GRPOTrainer`` (RLOO overrides :meth:`GroupScoring._advantages`): the weighted
reward of each completion, its advantage within its prompt's group (TRL's two multi-objective aggregations), and the
rollout metrics TRL logs (completion lengths, per-reward mean/std, reward, frac_reward_zero_std).

Legend: N completions (prompts x num_generations), F reward functions.
"""

from __future__ import annotations

import math

import torch
from accelerate.utils import gather_object

from fusedrl.ops.advantages import group_advantages
from fusedrl.trainers.online.sampling import nanstd, zero_std_groups


class GroupScoring:
    """Rewards -> advantages -> metrics of one sampling round (``self.reward_weights``, ``self.args``,
    ``self.accelerator`` and ``self.record`` come from the trainer)."""

    def _weighted_rewards(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """``[N]`` weighted sum of the rewards; NaN where every function returned None (unscorable)."""
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(1)
        return rewards.masked_fill(rewards_per_func.isnan().all(1), math.nan)

    def _advantages(self, rewards_per_func: torch.Tensor, batch: dict, num_generations: int, mode: str):
        """``[N]`` advantages of the gathered batch (TRL's two multi-objective aggregations)."""
        args = self.args
        if args.multi_objective_aggregation == "sum_then_normalize":
            rewards = self._weighted_rewards(rewards_per_func)
            advantages = group_advantages(rewards, num_generations, scale=args.scale_rewards)
            zero_std = (zero_std_groups(rewards, num_generations) if args.scale_rewards != "batch"
                        else torch.isclose(nanstd(rewards), rewards.new_zeros(())).expand_as(rewards))
        else:
            # Each reward normalised within its group first, so no single reward's scale dominates the sum.
            normalised = torch.stack([group_advantages(rewards_per_func[:, k], num_generations, scale="group")
                                      for k in range(rewards_per_func.shape[1])], dim=1)
            normalised = normalised.masked_fill(rewards_per_func.isnan(), math.nan)
            rewards = self._weighted_rewards(normalised)
            advantages = group_advantages(rewards, rewards.numel(), scale="group")  # whole batch as one group
            zero_std = torch.isclose(nanstd(rewards), rewards.new_zeros(())).expand_as(rewards)
        self.record(mode, "frac_reward_zero_std", zero_std.float().mean().item())
        return advantages

    def _record_rollout(self, mode: str, rollout, rewards_per_func, advantages, num_generations) -> None:
        lengths = torch.tensor([len(ids) for ids in rollout.completion_ids_list], device=self.accelerator.device)
        prompt_tokens = self.accelerator.gather(rollout.prompt_mask.sum()).sum()
        lengths = self.accelerator.gather(lengths).float()
        truncated = self.accelerator.gather(rollout.is_truncated.to(self.accelerator.device))
        if mode == "train":
            self.state.num_input_tokens_seen += int(prompt_tokens.item() + lengths.sum().item())
        self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        self.record(mode, "completions/mean_length", lengths.mean().item())
        self.record(mode, "completions/min_length", lengths.min().item())
        self.record(mode, "completions/max_length", lengths.max().item())
        self.record(mode, "completions/clipped_ratio", truncated.float().mean().item())
        terminated = lengths[~truncated] if (~truncated).any() else lengths.new_zeros(1)
        self.record(mode, "completions/mean_terminated_length", terminated.mean().item())
        self.record(mode, "completions/min_terminated_length", terminated.min().item())
        self.record(mode, "completions/max_terminated_length", terminated.max().item())
        for i, name in enumerate(self.reward_func_names):
            self.record(mode, f"rewards/{name}/mean", rewards_per_func[:, i].nanmean().item())
            self.record(mode, f"rewards/{name}/std", nanstd(rewards_per_func[:, i]).item())
        rewards = self._weighted_rewards(rewards_per_func)
        self.record(mode, "reward", rewards.nanmean().item())
        self.record(mode, "reward_std", nanstd(rewards).item())
        if self.args.log_completions:
            rows = zip(gather_object(rollout.prompts_text), gather_object(rollout.completions_text),
                       rewards.tolist(), advantages.tolist(), strict=True)
            self._completion_log.extend(rows)
