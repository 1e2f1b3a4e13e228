"""Exact resume of the online trainers: what their checkpoints add to ``runtime/resumable.py``'s.

A sampling trainer consumes one generated round over several micro-steps (GRPO / RLOO: ``steps_per_generation x
num_iterations``; PPO: ``num_ppo_epochs x num_mini_batches x gradient_accumulation_steps``). A checkpoint inside a
round used to resume by sampling a new round from weights the optimizer had already moved, so the rest of the run
differed from the uninterrupted one (TRL 1.16 does the same). :class:`RoundCheckpointing` saves, per checkpoint:

- in ``fusedrl_state.json`` (JSON, under ``"online"``): the trainer's counters (the micro-step, PPO's rollout and
  episode counts, GRPO's completion table) and, when a round is pending, the plan it was cut for (the config fields
  that fix how many micro-batches it has and what they hold);
- in ``fusedrl_rollout.safetensors`` (``fusedrl_rollout_<process>.safetensors`` per process when distributed, as
  Trainer names its RNG files): the pending round's micro-batches, tensors as tensors and small Python values in
  the file's JSON metadata, written only when the next micro-step would read them; plus tensors a trainer carries
  from round to round (joint mode's per-adapter RNG states, ``adapters/joint_rollout.py``).

Why the round itself and not the RNG state at its generation: regenerating it needs the weights it was sampled
from, which later steps have replaced. A round is ``rows x positions`` ids, masks and fp32 log-probs, small beside
the optimizer state. The rest is Trainer's: the global RNG (``rng_state.pth``, restored before the first resumed
step), the data order (``RepeatSampler.set_epoch`` replays the sampler's permutations), the model, the value
model (PPO's ``value_model/``), a synced reference (``fusedrl_ref_model.safetensors``). Reward models are frozen and
evaluated without dropout: a resumed run rebuilds them as given, nothing of theirs changes during training.

Everything loads without unpickling code (JSON and safetensors).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import safetensors
import safetensors.torch
import torch

from fusedrl.trainers.adapters.joint import PerAdapter

logger = logging.getLogger("fusedrl")

STATE_KEY = "online"
ROLLOUT_FILE = "fusedrl_rollout.safetensors"
_LAYOUT_KEY = "layout"


def rollout_file_name(world_size: int, process_index: int) -> str:
    return ROLLOUT_FILE if world_size <= 1 else ROLLOUT_FILE.replace(".safetensors", f"_{process_index}.safetensors")


# --- serialisation: micro-batches of tensors and small Python values ----------------------------------------------

def _encode(value, name: str, tensors: dict[str, torch.Tensor]):
    """The JSON spec of one batch value; its tensors go to ``tensors`` under ``name``."""
    if isinstance(value, torch.Tensor):
        # A copy of its own: micro-batches are views of one round, and safetensors refuses shared storage.
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": name}
    if isinstance(value, PerAdapter):
        return {"per_adapter": [_encode(item, f"{name}/{k}", tensors) for k, item in enumerate(value)]}
    if _holds_tensors(value):  # a vision-language round's per-row image fields (lists of dicts of tensors)
        if isinstance(value, dict):
            return {"dict": {key: _encode(item, f"{name}/{key}", tensors) for key, item in value.items()}}
        return {"list": [_encode(item, f"{name}/{k}", tensors) for k, item in enumerate(value)]}
    try:
        json.dumps(value, allow_nan=True)
    except TypeError as error:
        raise TypeError(f"cannot checkpoint the pending round: {name} is a {type(value).__name__}") from error
    return {"json": value}


def _holds_tensors(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensors(item) for item in value.values())
    return isinstance(value, (list, tuple)) and any(_holds_tensors(item) for item in value)


def _decode(spec: dict, tensors: dict[str, torch.Tensor], device: torch.device):
    if "tensor" in spec:
        return tensors[spec["tensor"]].to(device)
    if "dict" in spec:
        return {key: _decode(item, tensors, device) for key, item in spec["dict"].items()}
    if "list" in spec:
        return [_decode(item, tensors, device) for item in spec["list"]]
    if "per_adapter" in spec:
        return PerAdapter(_decode(item, tensors, device) for item in spec["per_adapter"])
    return spec["json"]


def save_round(path: str, batches: list[dict], extra: dict[str, torch.Tensor]) -> None:
    """``batches`` (a round's micro-batches: tensors, ``PerAdapter`` lists and JSON values) and ``extra`` tensors as
    one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    layout = [{key: _encode(value, f"batch/{i}/{key}", tensors) for key, value in batch.items()}
              for i, batch in enumerate(batches)]
    for name, tensor in extra.items():
        tensors[f"extra/{name}"] = tensor.detach().to("cpu", copy=True).contiguous()
    safetensors.torch.save_file(tensors, path, metadata={_LAYOUT_KEY: json.dumps(layout, allow_nan=True)})


def load_round(path: str, device: torch.device) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """``(batches, extra)`` of a :func:`save_round` file, batch tensors on ``device``, ``extra`` on the CPU."""
    with safetensors.safe_open(path, framework="pt") as handle:
        layout = json.loads(handle.metadata()[_LAYOUT_KEY])
    tensors = safetensors.torch.load_file(path, device="cpu")
    batches = [{key: _decode(spec, tensors, device) for key, spec in batch.items()} for batch in layout]
    extra = {name.removeprefix("extra/"): tensor for name, tensor in tensors.items() if name.startswith("extra/")}
    return batches, extra


# --- the trainer mixin ----------------------------------------------------------------------------------------------

@dataclass
class RoundState:
    """What a sampling trainer hands to (and gets back from) its checkpoint.

    ``counters``: JSON values a resumed run continues from; ``plan``: the config values that fix how a round is cut
    and what its micro-batches hold (checked on resume when a round is pending); ``pending``: the buffered
    micro-batches when the next training micro-step reads one of them, else None; ``extra``: tensors carried from
    round to round."""

    counters: dict
    plan: dict
    pending: list[dict] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class RoundCheckpointing:
    """Mixed in before ``FusedTrainer`` by the sampling trainers, which define ``_round_state() -> RoundState`` and
    ``_restore_round(RoundState)`` (``pending`` None there: sample a fresh round at the next step)."""

    _saved_round: dict | None = None  # the checkpoint's "online" entry, between load_fusedrl_state and its use

    def fusedrl_state(self) -> dict:
        state = self._round_state()
        pending = state.pending is not None
        return {**super().fusedrl_state(),
                STATE_KEY: {"counters": state.counters, "pending": pending, "plan": state.plan if pending else None,
                            "rollout_file": pending or bool(state.extra)}}

    def load_fusedrl_state(self, state: dict) -> None:
        super().load_fusedrl_state(state)
        self._saved_round = state.get(STATE_KEY)

    def _save_extra_state(self, staged: str, run_dir: str) -> None:
        super()._save_extra_state(staged, run_dir)
        state = self._round_state()
        if state.pending is None and not state.extra:
            return
        os.makedirs(staged, exist_ok=True)  # every process writes its own file, as Trainer's RNG states
        name = rollout_file_name(self.args.world_size, self.args.process_index)
        save_round(os.path.join(staged, name), state.pending or [], state.extra)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved, self._saved_round = self._saved_round, None
        if saved is None:
            if os.path.isfile(os.path.join(resume_from_checkpoint, "trainer_state.json")):
                logger.warning("fusedrl: %s holds no online-trainer state (saved by an older fusedrl); the resumed "
                               "run samples a fresh round, so it will not repeat the interrupted one",
                               resume_from_checkpoint)
            return
        if saved["pending"]:
            self._check_round_plan(saved["plan"], resume_from_checkpoint)
        batches, extra = None, {}
        if saved["rollout_file"]:
            path = os.path.join(resume_from_checkpoint,
                                rollout_file_name(self.args.world_size, self.args.process_index))
            if os.path.isfile(path):
                batches, extra = load_round(path, self.accelerator.device)
            else:
                logger.warning("fusedrl: %s has no %s; the resumed run samples a fresh round instead of finishing "
                               "the interrupted one, so it will not repeat the uninterrupted run",
                               resume_from_checkpoint, os.path.basename(path))
        self._restore_round(RoundState(saved["counters"], saved["plan"] or {},
                                       batches if saved["pending"] and batches else None, extra))

    def _check_round_plan(self, saved: dict, checkpoint: str) -> None:
        current = self._round_state().plan
        for name, value in saved.items():
            if current.get(name) != value:
                raise ValueError(
                    f"{checkpoint} was saved inside a generation round cut for {name}={value}, but this run has "
                    f"{name}={current.get(name)}: resume with {name}={value}, or from a checkpoint at a round "
                    "boundary")
