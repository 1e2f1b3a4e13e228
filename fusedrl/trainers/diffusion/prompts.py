"""Prompt functions for the diffusion trainers, registered by name like the rewards.

Calling convention (TRL's DDPO and AlignProp trainers): ``prompt_fn() -> (prompt, prompt_metadata)``, one prompt
and its metadata dict per call. The registry holds factories, ``get_prompt_function("animals", seed=0)``: with a
seed the prompts come from the function's own ``random.Random`` (the same sequence whatever else draws), without
one from the ``random`` module, which the trainers seed from ``config.seed`` as TRL's did through ``set_seed``.

Built-ins: ``animals`` (an animal name, the prompt set of the DDPO and AlignProp papers' main experiments) and
``animal_activities`` (``"a cat riding a bike"``, the DDPO paper's prompt-alignment set; the metadata names the
animal and the activity).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from fusedrl.trainers.registry import NamedRegistry

PromptFn = Callable[[], tuple[str, dict]]

ANIMALS = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "owl", "penguin",
)
ACTIVITIES = (
    "riding a bike", "playing chess", "washing the dishes", "reading a book", "playing the guitar",
    "flying a kite", "baking a cake", "skiing down a hill",
)


def _chooser(seed: int | None) -> Callable[[Sequence[str]], str]:
    return random.Random(seed).choice if seed is not None else random.choice


def animals(seed: int | None = None, choices: Sequence[str] = ANIMALS) -> PromptFn:
    """One animal name per call, uniformly from ``choices``; metadata ``{}``."""
    choices = tuple(choices)
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("animals: choices must be a non-empty list of non-empty strings")
    choose = _chooser(seed)

    def animals() -> tuple[str, dict]:
        return choose(choices), {}
    return animals


def animal_activities(seed: int | None = None, choices: Sequence[str] = ANIMALS,
                      activities: Sequence[str] = ACTIVITIES) -> PromptFn:
    """``"a <animal> <activity>"`` per call; metadata ``{"animal": ..., "activity": ...}``."""
    choices, activities = tuple(choices), tuple(activities)
    if not choices or not activities:
        raise ValueError("animal_activities: choices and activities must both be non-empty")
    choose = _chooser(seed)

    def animal_activities() -> tuple[str, dict]:
        animal, activity = choose(choices), choose(activities)
        article = "an" if animal[0] in "aeiou" else "a"
        return f"{article} {animal} {activity}", {"animal": animal, "activity": activity}
    return animal_activities


BUILTIN_PROMPT_FUNCTIONS: dict[str, Callable[..., PromptFn]] = {
    "animals": animals,
    "animal_activities": animal_activities,
}
_REGISTRY = NamedRegistry("prompt function", BUILTIN_PROMPT_FUNCTIONS,
                          "add one with fusedrl.trainers.diffusion.prompts.register_prompt_function")


def register_prompt_function(name: str, factory: Callable[..., PromptFn], *, replace: bool = False):
    """Register ``factory`` (``(**kwargs) -> prompt_fn``) as ``name``; returns ``factory``. ValueError for a
    built-in name, a name already registered (unless ``replace``), an empty name or a non-callable factory."""
    return _REGISTRY.register(name, factory, replace=replace)


def unregister_prompt_function(name: str) -> None:
    """Remove a custom prompt function (KeyError if it is not registered; built-ins cannot be removed)."""
    _REGISTRY.unregister(name)


def registered_prompt_functions() -> dict[str, Callable[..., PromptFn]]:
    """Every registered name: built-ins first, then custom registrations."""
    return _REGISTRY.registered()


def get_prompt_function(name: str, **kwargs) -> PromptFn:
    """The prompt function ``name`` builds with ``kwargs`` (ValueError listing the known names otherwise)."""
    return _REGISTRY.get(name)(**kwargs)


def draw_prompts(prompt_fn: PromptFn, num_prompts: int) -> tuple[list[str], list[dict]]:
    """``num_prompts`` calls of ``prompt_fn``, checked: ValueError naming the function and the call when one raises
    or does not return ``(str, dict)``."""
    name = getattr(prompt_fn, "__name__", type(prompt_fn).__name__)
    prompts, metadata = [], []
    for call in range(num_prompts):
        try:
            output = prompt_fn()
        except Exception as error:  # user code: report it with the function's name
            raise ValueError(f"prompt function '{name}' raised {type(error).__name__} on call {call}: "
                             f"{error}") from error
        if (not isinstance(output, tuple) or len(output) != 2 or not isinstance(output[0], str)
                or not isinstance(output[1], dict)):
            raise ValueError(f"prompt function '{name}' returned {output!r} on call {call}; it must return a pair "
                             "(prompt: str, prompt_metadata: dict), as TRL's prompt functions do")
        prompts.append(output[0])
        metadata.append(output[1])
    return prompts, metadata
