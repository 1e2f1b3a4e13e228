"""Named reward functions: ``register_reward(name, fn)`` makes ``reward_funcs=["name"]`` (config, CLI
``--reward_funcs name``) resolve to ``fn``. The built-ins (``builtin.py``) are registered at import and cannot be
replaced; a custom name can be re-registered with ``replace=True`` (re-running a script in one process)."""

from __future__ import annotations

from collections.abc import Callable

from fusedrl.trainers.registry import NamedRegistry
from fusedrl.trainers.rewards import builtin

BUILTIN_REWARDS: dict[str, Callable] = {
    "accuracy": builtin.accuracy_reward,
    "digit_accuracy": builtin.digit_accuracy_reward,
    "format": builtin.format_reward,
    "length_penalty": builtin.length_penalty,
}
_REGISTRY = NamedRegistry("reward", BUILTIN_REWARDS, "add one with fusedrl.trainers.rewards.register_reward, or pass "
                          "a reward model path")


def register_reward(name: str, fn: Callable, *, replace: bool = False) -> Callable:
    """Register ``fn`` (``(prompts, completions, completion_ids, **columns) -> list[float | None]``) as ``name``.

    Returns ``fn``, so it also works as ``register_reward("name", fn)`` after a def. Raises ValueError for a
    built-in name, a name already registered (unless ``replace``), an empty name or a non-callable ``fn``.
    """
    return _REGISTRY.register(name, fn, replace=replace)


def unregister_reward(name: str) -> None:
    """Remove a custom reward (KeyError if it is not registered; built-ins cannot be removed)."""
    _REGISTRY.unregister(name)


def registered_rewards() -> dict[str, Callable]:
    """Every name a config can use: built-ins first, then custom registrations."""
    return _REGISTRY.registered()


def get_reward(name: str) -> Callable:
    """The reward function registered as ``name`` (ValueError listing the known names otherwise)."""
    return _REGISTRY.get(name)
