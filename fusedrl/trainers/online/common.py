"""Pieces the online trainers share: raw-row batches, the scoring inputs of a rollout, scores from reward
functions/models, verdicts from a pairwise judge, TRL's reward attributes (the sampler and collator are
``sampling.py``'s).

Legend: B rollout rows, P prompt positions (left-padded), C completion positions, F reward functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedrl.trainers.online.judges import check_verdicts
from fusedrl.trainers.online.rollout import Rollout
from fusedrl.trainers.rewards import BackgroundEventLoop, Reward, is_async_callable, score_completions


class RewardAttributes:
    """TRL's public reward attributes, read from the trainer's resolved ``self.rewards`` (a list of
    ``rewards.Reward``), so they always show the rewards the trainer scores with (after ``prepare_reward_models``).

    ``reward_funcs``: the callables and models, in order; ``reward_processing_classes``: one entry per reward, the
    reward model's tokenizer (the one given, or loaded from the model's name) or None for a function.
    """

    @property
    def reward_funcs(self) -> list:
        return [reward.func for reward in self.rewards]

    @property
    def reward_processing_classes(self) -> list:
        return [reward.processing_class for reward in self.rewards]

    def _start_async_loop(self, tools: Sequence = ()) -> None:
        """TRL's ``self.async_loop``: when a reward function (or a GRPO tool) is async, an event loop running in a
        daemon thread that every batch's async rewards and tool calls run on (``rewards/async_loop.py``); None
        otherwise. The loop stops with the trainer (or at exit)."""
        if (any(not reward.is_model and is_async_callable(reward.func) for reward in self.rewards)
                or any(is_async_callable(tool) for tool in tools)):
            self._async_loop_owner = BackgroundEventLoop(f"{type(self).__name__}-AsyncLoop")
            self.async_loop = self._async_loop_owner.loop
        else:
            self._async_loop_owner = self.async_loop = None


def row_columns(rows: list[dict], repeat: int = 1) -> dict[str, list]:
    """Every column but ``prompt`` as lists, each value repeated ``repeat`` times (one per completion)."""
    return {key: [row[key] for row in rows for _ in range(repeat)] for key in rows[0] if key != "prompt"}


def sequence_inputs(rollout: Rollout, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask``/``position_ids`` ``[B, P + C]`` of prompt + completion.

    Position ids count real tokens (``cumsum(mask) - 1``), as ``generate`` numbers a left-padded prompt, so the
    scoring forward sees the positions the samples were drawn at. ``max_length`` drops the first prompt columns
    beyond it (TRL's online DPO); the prompt's last column always stays, it predicts the first completion token.
    """
    prompt_ids, prompt_mask = rollout.prompt_ids, rollout.prompt_mask
    if max_length is not None:
        cut = min(max(prompt_ids.shape[1] + rollout.completion_ids.shape[1] - max_length, 0), prompt_ids.shape[1] - 1)
        prompt_ids, prompt_mask = prompt_ids[:, cut:], prompt_mask[:, cut:]
    input_ids = torch.cat([prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, rollout.completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def rollout_scores(rewards: Sequence[Reward], weights_F: torch.Tensor, rollout: Rollout, rows: list[dict], *,
                   repeat: int, on_error: str, missing_eos_penalty: float | None, trainer_state=None,
                   async_loop=None) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """``(scores_B, rewards_BF, failures)``: the weighted sum of the rewards of each completion (NaN-skipping, as
    TRL: a function's ``None`` adds nothing), minus ``missing_eos_penalty`` where no EOS was sampled. Async reward
    functions run on ``async_loop`` (see ``score_completions``)."""
    device = rollout.completion_ids.device
    scored = score_completions(rewards, prompts=rollout.prompts, completions=rollout.completions,
                               completion_ids=rollout.completion_ids_list, columns=row_columns(rows, repeat),
                               extra_kwargs={"trainer_state": trainer_state}, on_error=on_error, device=device,
                               async_loop=async_loop)
    rewards_BF = scored.rewards_per_func
    scores_B = (rewards_BF * weights_F.to(device)[None, :]).nansum(1)
    if missing_eos_penalty is not None:
        scores_B = scores_B - missing_eos_penalty * rollout.is_truncated.float()
    return scores_B, rewards_BF, scored.failures


def judge_name(judge) -> str:
    return getattr(judge, "__name__", None) or type(judge).__name__


def judge_pairs(judge, prompts: list[str], completion_pairs: list[tuple[str, str]]) -> list[int]:
    """Verdicts of ``judge`` (0 or 1: the better completion of each pair; ``judges.TIE`` = -1), validated.

    ``judge`` is a callable ``judge(prompts, completion_pairs)`` (``fusedrl.trainers.online.judges``) or an object with
    TRL's ``judge(prompts, completions)`` method. A judge that raises or answers wrongly raises a ValueError naming it.
    """
    name = judge_name(judge)
    try:
        if callable(getattr(judge, "judge", None)):  # TRL's BasePairwiseJudge: completions as lists
            verdicts = judge.judge(prompts, [list(pair) for pair in completion_pairs])
        else:
            verdicts = judge(prompts, completion_pairs)
    except Exception as error:  # any failure inside user code is reported with the judge's name
        raise ValueError(f"judge '{name}' raised {type(error).__name__}: {error}") from error
    try:
        return check_verdicts(list(verdicts), len(prompts))
    except (TypeError, ValueError) as error:
        raise ValueError(f"judge '{name}': {error}") from error
