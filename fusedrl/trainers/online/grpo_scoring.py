"""GRPO's group scoring, mixed into ``GRPOTrainer`` (RLOO overrides :meth:`GroupScoring._advantages`): the weighted
reward of each completion, its advantage within its prompt's group (TRL's two multi-objective aggregations), the
rollout metrics TRL logs (completion lengths, per-reward mean/std, reward, frac_reward_zero_std), what reward
functions log through ``log_extra`` / ``log_metric``, and TRL's ``_logs``: the latest round's prompts, completions,
per-reward rewards, advantages and extra columns, each bounded to ``generation_batch_size`` rows (the
``log_completions`` table).

Legend: N completions (prompts x num_generations), F reward functions.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict, deque

import torch
from accelerate.utils import gather_object

from fusedrl.ops.advantages import group_advantages
from fusedrl.trainers.online.sampling import nanstd, zero_std_groups

_LOGGED_ROWS = ("images", "prompt", "completion", "advantages")  # one deque each; "rewards"/"extra": one per name


def completion_logs(max_rows: int) -> dict:
    """TRL's ``_logs``: ``images``, ``prompt``, ``completion``, ``advantages`` deques and ``rewards`` / ``extra``
    (name -> deque), every deque keeping the last ``max_rows`` rows (the latest generation batch)."""
    logs = {key: deque(maxlen=max_rows) for key in _LOGGED_ROWS}
    logs["rewards"] = defaultdict(lambda: deque(maxlen=max_rows))
    logs["extra"] = defaultdict(lambda: deque(maxlen=max_rows))
    return logs


def _json_safe(value):
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return str(value)  # a log_extra object: the table shows its str() anyway
    return value


def completion_logs_state(logs: dict) -> dict:
    """``logs`` as JSON values (a checkpoint's counters); values JSON cannot hold become their ``str``."""
    state = {key: [_json_safe(v) for v in logs[key]] for key in _LOGGED_ROWS if key != "images"}
    for key in ("rewards", "extra"):
        state[key] = {name: [_json_safe(v) for v in values] for name, values in logs[key].items()}
    return state


def restore_completion_logs(logs: dict, state: dict) -> None:
    """Refill ``logs`` (a :func:`completion_logs`) from a :func:`completion_logs_state`."""
    for key in _LOGGED_ROWS:
        logs[key].clear()
        logs[key].extend(state.get(key, []))
    for key in ("rewards", "extra"):
        logs[key].clear()
        for name, values in state.get(key, {}).items():
            logs[key][name].extend(values)


class GroupScoring:
    """Rewards -> advantages -> metrics of one sampling round (``self.reward_weights``, ``self.args``,
    ``self.accelerator`` and ``self.record`` come from the trainer; ``self._reward_logs`` is a
    ``rewards.RewardLogBuffer``, ``self._logs`` a :func:`completion_logs`)."""

    def _log_completion_extra(self, column: str, values: list) -> None:
        """``log_extra``: a column of the completions table, one value per completion of the batch."""
        self._reward_logs.log_extra(column, values)

    def _log_metric(self, name: str, value: float) -> None:
        """``log_metric``: a scalar, averaged over the batch's values on every process, then over the log window."""
        self._reward_logs.log_metric(name, value)

    def _reward_kwargs(self, num_rows: int) -> dict:
        """The keyword arguments every reward function gets besides the dataset columns (TRL's)."""
        self._reward_logs.start_batch(num_rows)
        return {"trainer_state": self.state, "log_extra": self._log_completion_extra, "log_metric": self._log_metric}

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

    def _record_rollout(self, mode: str, rollout, rewards_per_func, advantages, num_generations,
                        model_tokens=None) -> None:
        """``model_tokens`` ``[B]``: the sampled tokens of each completion when tool results sit among them (the
        lengths TRL logs then); else every completion token counts."""
        lengths = (torch.tensor([len(ids) for ids in rollout.completion_ids_list], device=self.accelerator.device)
                   if model_tokens is None else model_tokens.to(self.accelerator.device))
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
        for name, value in self._reward_logs.flush_metrics(self.accelerator).items():
            self.record(mode, name, value)
        # The gathered round, as TRL keeps it (the log_completions table): every process's rows, in process order.
        self._logs["prompt"].extend(gather_object(list(rollout.prompts)))
        self._logs["completion"].extend(gather_object(list(rollout.completions)))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        self._logs["advantages"].extend(advantages.tolist())
        for column, values in self._reward_logs.flush_extra().items():
            self._logs["extra"][column].extend(values)
