"""Named reward functions: ``register_reward(name, fn)`` makes ``reward_funcs=["name"]`` (config, CLI
``--reward_funcs name``) resolve to ``fn``. The built-ins (``builtin.py``) are registered at import and cannot be
replaced; a custom name can be re-registered with ``replace=True`` (re-running a script in one process)."""

from __future__ import annotations

from collections.abc import Callable

from fusedrl.trainers.rewards import builtin

BUILTIN_REWARDS: dict[str, Callable] = {
    "accuracy": builtin.accuracy_reward,
    "digit_accuracy": builtin.digit_accuracy_reward,
    "format": builtin.format_reward,
    "length_penalty": builtin.length_penalty,
}
_CUSTOM: dict[str, Callable] = {}


def register_reward(name: str, fn: Callable, *, replace: bool = False) -> Callable:
    """Register ``fn`` (``(prompts, completions, completion_ids, **columns) -> list[float | None]``) as ``name``.

    Returns ``fn``, so it also works as ``register_reward("name", fn)`` after a def. Raises ValueError for a
    built-in name, a name already registered (unless ``replace``), an empty name or a non-callable ``fn``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"reward {name!r}: fn must be callable, got {type(fn).__name__}")  # noqa: TRY004
    if name in BUILTIN_REWARDS:
        raise ValueError(f"{name!r} is a built-in reward and cannot be replaced; register under another name")
    if name in _CUSTOM and not replace:
        raise ValueError(f"reward {name!r} is already registered; pass replace=True to re-register it")
    _CUSTOM[name] = fn
    return fn


def unregister_reward(name: str) -> None:
    """Remove a custom reward (KeyError if it is not registered; built-ins cannot be removed)."""
    del _CUSTOM[name]


def registered_rewards() -> dict[str, Callable]:
    """Every name a config can use: built-ins first, then custom registrations."""
    return {**BUILTIN_REWARDS, **_CUSTOM}


def get_reward(name: str) -> Callable:
    """The reward function registered as ``name`` (ValueError listing the known names otherwise)."""
    rewards = registered_rewards()
    if name not in rewards:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(rewards)} (add one with "
                         "fusedrl.trainers.rewards.register_reward, or pass a reward model path)")
    return rewards[name]
