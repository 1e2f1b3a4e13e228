"""A registry of named callables with built-ins that cannot be replaced: the text rewards
(``trainers/rewards/registry.py``), the image rewards and the prompt functions of the diffusion trainers
(``trainers/diffusion/rewards.py``, ``prompts.py``) each keep one and expose its methods under their own names."""

from __future__ import annotations

from collections.abc import Callable


class NamedRegistry:
    """``kind`` names what is registered in messages ("reward", "prompt function"); ``builtins`` are fixed at
    construction; ``how_to_add`` ends the unknown-name error (where a user registers one)."""

    def __init__(self, kind: str, builtins: dict[str, Callable], how_to_add: str):
        self.kind, self.builtins, self.how_to_add = kind, dict(builtins), how_to_add
        self._custom: dict[str, Callable] = {}

    def register(self, name: str, fn: Callable, *, replace: bool = False) -> Callable:
        """Register ``fn`` as ``name`` and return it. ValueError for an empty name, a non-callable ``fn``, a
        built-in name, or a name already registered unless ``replace`` (re-running a script in one process)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if not callable(fn):
            raise ValueError(f"{self.kind} {name!r}: fn must be callable, got {type(fn).__name__}")  # noqa: TRY004
        if name in self.builtins:
            raise ValueError(f"{name!r} is a built-in {self.kind} and cannot be replaced; register under another name")
        if name in self._custom and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to re-register it")
        self._custom[name] = fn
        return fn

    def unregister(self, name: str) -> None:
        """Remove a custom registration (KeyError if there is none; built-ins cannot be removed)."""
        del self._custom[name]

    def registered(self) -> dict[str, Callable]:
        """Every name: built-ins first, then custom registrations."""
        return {**self.builtins, **self._custom}

    def get(self, name: str) -> Callable:
        """What ``name`` is registered as (ValueError listing the known names otherwise)."""
        entries = self.registered()
        if name not in entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {sorted(entries)} ({self.how_to_add})")
        return entries[name]
