"""Agentic GRPO rollouts (TRL 1.16's ``tools``, ``environment_factory``, ``rollout_func``): ``rollouts.py`` runs a
round, ``parsing.py`` reads tool calls, ``tools.py`` runs them, ``environments.py`` holds stateful environments,
``lockstep.py`` keeps the tool turns of a sharded model (FSDP2, ZeRO-3) in step across processes."""

from __future__ import annotations

import torch
from datasets import Dataset

from fusedrl.trainers.online.agents.environments import Environments
from fusedrl.trainers.online.agents.rollouts import AgentRollouts, AgentRound

__all__ = ["EMPTY_PROMPT", "AgentAttributes", "AgentRollouts", "AgentRound", "Environments", "environment_prompts",
           "row_extra_columns"]

# The prompt of a row that has none (an environment's reset supplies it), as TRL defaults it.
EMPTY_PROMPT = [{"role": "user", "content": ""}]


def row_extra_columns(extra: dict, num_rows: int) -> dict[str, list]:
    """``rollout_func``'s extra fields as reward-function columns, TRL's way: a list gives one value per row, any
    other value is the same for every row."""
    columns = {}
    for key, values in extra.items():
        if isinstance(values, list):
            if len(values) != num_rows:
                raise ValueError(f"rollout_func's extra field {key!r} has {len(values)} values for {num_rows} rows; "
                                 "return one value per row, or a non-list value shared by every row")
            columns[key] = values
        else:
            columns[key] = [values] * num_rows
    return columns


def environment_prompts(environment_factory, args) -> Dataset:
    """The placeholder prompts of a run whose environment owns the data (``reset`` returns the prompt): one
    generation round of empty user turns, cycled for ``max_steps`` steps. TRL's refusals otherwise."""
    if environment_factory is None:
        raise ValueError("`train_dataset` is required unless an `environment_factory` is provided. fusedrl: pass a "
                         "Dataset with a 'prompt' column")
    if isinstance(environment_factory, dict):  # TRL's ValueError: the data, not the factory, is missing
        raise ValueError(  # noqa: TRY004
            "A `dict` `environment_factory` (multiple environments) requires a `train_dataset` with an "
            "`environment` column to route each example to its environment. Provide a dataset, or pass "
            "a single environment factory.")
    if args.max_steps <= 0:
        raise ValueError("When training without a `train_dataset` (the environment owns the data and returns the "
                         "prompt from `reset()`), `max_steps` must be set to a positive value to define the training "
                         "length. Set it via `GRPOConfig(max_steps=...)`.")
    rows = args.generation_batch_size // args.num_generations
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": ""}]] * rows})


class AgentAttributes:
    """GRPO's agentic attributes as TRL names them (``self.agents`` is the trainer's :class:`AgentRollouts` or
    None), and the tool-call metrics of a round."""

    @property
    def tools(self) -> list:
        """TRL's ``trainer.tools``: the standalone tools and every environment's tool methods."""
        return [] if self.agents is None else list(self.agents.tools)

    # TRL's private names for the environments' tools and instance pool ({environment name: ...}; None when the
    # factory is a single callable), which TRL's own tests read.
    @property
    def _env_tools(self) -> dict:
        return {} if self.agents is None or self.agents.environments is None else self.agents.environments.tools

    @property
    def _environment_pool(self) -> dict:
        return {} if self.agents is None or self.agents.environments is None else self.agents.environments.pool

    def _record_tool_calls(self, mode: str, agent_round: AgentRound, num_rows: int) -> None:
        """TRL's ``tools/call_frequency`` (calls per rollout) and ``tools/failure_frequency`` (failed calls per
        call), over every process's rows."""
        counts = self.accelerator.gather(torch.tensor([agent_round.num_tool_calls, agent_round.num_tool_failures,
                                                       num_rows], device=self.accelerator.device)).view(-1, 3).sum(0)
        calls, failures, rows = (int(v) for v in counts.tolist())
        self.record(mode, "tools/call_frequency", calls / rows)
        self.record(mode, "tools/failure_frequency", failures / calls if calls else 0.0)
