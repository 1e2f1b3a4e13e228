"""GRPO's ``environment_factory`` (TRL 1.16): stateful environments whose public methods are the model's tools.

``environment_factory`` is a zero-argument callable returning an environment, or a dict ``{name: factory}``; with a
dict each example's ``environment`` column picks its environment, and only that environment's tools are shown in
its prompt. An environment class must define ``reset(**example)``: called before each rollout with the example's
columns (``environment`` excepted), it may return an observation (a string, or content parts) that is appended to
the prompt's last message. Its other public methods are tools. ``get_reward()``, if defined, makes the environment
a reward source: one reward column per environment class, named after the class, weight 1, scored only for rollouts
of that exact class (None, so ignored, for the others).

Instances are created once and reused: one probe per environment at construction (it validates ``reset`` and lists
the tools), then a pool that grows only when a batch needs more concurrent instances of an environment.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

_RESERVED = ("reset", "get_reward")


def _public_methods(environment) -> list[Callable]:
    # Listed on the class: inspecting the instance would evaluate its properties.
    return [getattr(environment, name) for name, _ in inspect.getmembers(type(environment), inspect.isfunction)
            if name not in _RESERVED and not name.startswith("_")]


def _reward_function(env_type: type) -> Callable:
    """A reward function ``(environments, **kwargs) -> list[float | None]`` over the batch's environments."""
    if inspect.iscoroutinefunction(env_type.get_reward):
        async def reward(environments, **kwargs):
            return [await e.get_reward() if type(e) is env_type else None for e in environments]
    else:
        def reward(environments, **kwargs):
            return [e.get_reward() if type(e) is env_type else None for e in environments]
    reward.__name__ = env_type.__name__
    return reward


class Environments:
    """The environments of one trainer: their factories, per-environment tools, the instance pool and the reward
    functions of those that own their reward."""

    def __init__(self, environment_factory, standalone_tools: list[Callable]):
        self.multiple = isinstance(environment_factory, dict)
        self.factories = dict(environment_factory) if self.multiple else {None: environment_factory}
        if not self.factories:
            raise ValueError("environment_factory is an empty dict; map at least one environment name to a factory")
        self.tools: dict[str | None, list[Callable]] = {}
        self.pool: dict[str | None, list] = {}
        self.reward_functions: list[Callable] = []
        rewarded: list[type] = []
        for name, factory in self.factories.items():
            if not callable(factory):
                raise TypeError(f"environment_factory[{name!r}] is a {type(factory).__name__}; expected a callable "
                                "returning an environment (e.g. the environment class)")
            instance = factory()
            if not callable(getattr(type(instance), "reset", None)):  # TRL's ValueError
                raise ValueError(  # noqa: TRY004
                    "Each environment instance returned by `environment_factory` must define a callable "
                                 f"`reset`. fusedrl: {type(instance).__name__} has none")
            self.tools[name] = [*standalone_tools, *_public_methods(instance)]
            self.pool[name] = [instance]
            if callable(getattr(type(instance), "get_reward", None)) and type(instance) not in rewarded:
                rewarded.append(type(instance))
                self.reward_functions.append(_reward_function(type(instance)))

    def all_tools(self) -> list[Callable]:
        """Every tool of every environment (one probe's bound methods each), for checks that only need presence."""
        return [tool for tools in self.tools.values() for tool in tools]

    def names_of(self, examples: list[dict]) -> list[str | None]:
        """Each example's environment name; ValueError for a name that was not configured."""
        if not self.multiple:
            return [None] * len(examples)
        names = [example.get("environment") for example in examples]
        for name in dict.fromkeys(names):
            if name not in self.factories:
                raise ValueError(f"Example has `environment={name!r}`, which is not among the environments passed to "
                                 f"`environment_factory`. Expected one of: {list(self.factories)}.")
        return names

    def instances_for(self, names: list[str | None]) -> list:
        """One pooled instance per rollout; the pool grows when a batch needs more than it holds."""
        handed_out: dict[str | None, int] = {}
        instances = []
        for name in names:
            pool, index = self.pool[name], handed_out.get(name, 0)
            if index == len(pool):
                pool.append(self.factories[name]())
            handed_out[name] = index + 1
            instances.append(pool[index])
        return instances

    def reset(self, instances: list, examples: list[dict], prompts: list) -> list:
        """Reset each rollout's environment with its example; the prompts with the observations appended to their
        last message (new message dicts: the dataset rows stay untouched)."""
        prompts = list(prompts)
        for i, (environment, example) in enumerate(zip(instances, examples, strict=True)):
            kwargs = {k: v for k, v in example.items() if k != "environment"} if self.multiple else dict(example)
            observation = environment.reset(**kwargs)
            if observation is None:
                continue
            last = prompts[i][-1]
            content = last["content"]
            if isinstance(observation, list) and isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if isinstance(observation, str) and isinstance(content, list):
                observation = [{"type": "text", "text": observation}]
            prompts[i] = [*prompts[i][:-1], {**last, "content": content + observation}]
        return prompts

    @staticmethod
    def methods_of(environment) -> list[Callable]:
        """The tools of one live instance (its bound public methods)."""
        return _public_methods(environment)
