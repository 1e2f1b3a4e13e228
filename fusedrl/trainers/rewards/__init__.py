"""Rewards for the online trainers: built-in reward functions, a registry of names, and the scoring loop.

    from fusedrl.trainers.rewards import register_reward

    def brevity(completions, **kwargs):
        return [1.0 / (1 + len(c)) for c in completions]

    register_reward("brevity", brevity)
    GRPOConfig(..., reward_funcs=["accuracy", "brevity"])      # or GRPOTrainer(reward_funcs=[...]); CLI --reward_funcs

See docs/rewards.md for the calling convention, validation and reward models.
"""

from fusedrl.trainers.rewards.async_loop import BackgroundEventLoop, is_async_callable
from fusedrl.trainers.rewards.builtin import (
    accuracy_reward,
    digit_accuracy_reward,
    format_reward,
    length_penalty,
    overlong_penalty,
    regex_format_reward,
)
from fusedrl.trainers.rewards.registry import (
    BUILTIN_REWARDS,
    get_reward,
    register_reward,
    registered_rewards,
    unregister_reward,
)
from fusedrl.trainers.rewards.reward_logs import RewardLogBuffer
from fusedrl.trainers.rewards.scoring import (
    Reward,
    RewardScores,
    prepare_reward_models,
    resolve_rewards,
    reward_weights_tensor,
    score_completions,
)

__all__ = [
    "BUILTIN_REWARDS",
    "BackgroundEventLoop",
    "Reward",
    "RewardLogBuffer",
    "RewardScores",
    "accuracy_reward",
    "digit_accuracy_reward",
    "format_reward",
    "get_reward",
    "is_async_callable",
    "length_penalty",
    "overlong_penalty",
    "prepare_reward_models",
    "regex_format_reward",
    "register_reward",
    "registered_rewards",
    "resolve_rewards",
    "reward_weights_tensor",
    "score_completions",
    "unregister_reward",
]
