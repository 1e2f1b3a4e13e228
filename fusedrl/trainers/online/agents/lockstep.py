"""Tool turns in step across processes when the model is sharded (FSDP2 or DeepSpeed ZeRO-3 on several processes).

Only the rows that called a tool sample a continuation, so each process has its own number of tool turns, and in a
turn a process may have no row left. A sharded model's forward is collective (every layer gathers its shards from
all processes), so a process that skips a ``generate`` leaves the others waiting in their all-gathers forever. In
lock-step mode the loop of ``rollouts.AgentRollouts._tool_turns`` therefore takes its decisions together:

- "another turn?" and "does any row fit its tool results?" are all-reduced (MAX of a 0/1 int64 flag, twice per
  turn), so every process runs the same number of turns (``max_turns`` counts the same turns everywhere);
- a process with no row to continue in a turn that others run samples one dummy row (its first row's
  conversation so far, with that row's image fields: the same modules run forward as for a real row) and drops the
  result. Its ``generate`` then joins the others' forwards, and ``synced_gpus`` (``rollout._sample``) keeps it
  stepping until every process's rows have ended.

The dummy's sampling would draw from the global torch RNG, which the continuations of later turns and rounds also
draw from (``rank_invariant_sampling`` seeds only the first turn). Its draws are undone (:func:`snapshot_rng` before,
:func:`restore_rng` after), so each process makes the same random draws as under DDP (and samples the same tokens, up
to the rounding of sharded forwards), with or without ``rank_invariant_sampling``. What the dummy costs is time:
every process steps until the last row on any process has ended, and the dummy's row may run longer than the real
ones (at most ``max_completion_length`` steps).

DDP, ZeRO-1/2 and one process hold a whole model per process: no collective is added and the loop is unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fusedrl.runtime.sharded_head import is_sharded


def needs_lockstep(trainer) -> bool:
    """Whether the trainer's generation is collective: a sharded model (the one ``rollout._sample`` generates with)
    on more than one process."""
    if trainer.accelerator.num_processes <= 1:
        return False
    return is_sharded(trainer.accelerator.unwrap_model(trainer.model_wrapped))


def any_process_active(trainer, flag: bool) -> bool:
    """``flag`` of this process OR'ed over every process in lock-step mode (every process must call it at the same
    point of the loop); ``flag`` itself otherwise, with no collective."""
    if not needs_lockstep(trainer):
        return flag
    flags = torch.tensor([int(flag)], device=trainer.accelerator.device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return bool(flags.item())


class RngSnapshot(NamedTuple):
    """The global torch RNG states ``generate`` samples from: the CPU generator's, and the accelerator device's
    (None on CPU)."""

    cpu: torch.Tensor
    device: torch.device
    device_state: torch.Tensor | None


def snapshot_rng(device: torch.device) -> RngSnapshot:
    """The RNG states before a dummy sample (module docstring)."""
    device = torch.device(device)
    device_state = None if device.type == "cpu" else torch.get_device_module(device).get_rng_state(device)
    return RngSnapshot(torch.get_rng_state(), device, device_state)


def restore_rng(snapshot: RngSnapshot) -> None:
    """Undo every draw since ``snapshot`` was taken."""
    torch.set_rng_state(snapshot.cpu)
    if snapshot.device_state is not None:
        torch.get_device_module(snapshot.device).set_rng_state(snapshot.device_state, snapshot.device)
