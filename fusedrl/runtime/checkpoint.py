"""Crash-safe checkpoints: staged writes published with one rename, and fusedrl's own resume state.

Atomic publication. ``transformers.Trainer._save_checkpoint`` (5.23) writes straight into ``checkpoint-N``: model,
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and, last, ``trainer_state.json``. A kill in between leaves a
``checkpoint-N`` that ``get_last_checkpoint`` (it only matches ``^checkpoint-\\d+$`` names) picks up on resume and
that then fails to load or resumes from a half-written optimizer. :func:`write_atomically` has the Trainer write into
``<run_dir>/.fusedrl-staging/checkpoint-N`` instead, fsyncs every file and directory, then ``os.replace``s it to
``<run_dir>/checkpoint-N`` and fsyncs ``run_dir``. The staging directory never matches ``checkpoint-*``, so neither
``get_last_checkpoint`` nor rotation (``save_total_limit``) ever sees a partial checkpoint; a stale one from a killed
save is deleted by the next save. :func:`last_complete_checkpoint` also skips a ``checkpoint-N`` without
``trainer_state.json`` (one written by plain transformers and cut short).

What transformers restores on resume, and what fusedrl adds:

- transformers: model weights (``model.safetensors`` or the PEFT adapter files), optimizer, scheduler, GradScaler,
  Python/NumPy/torch RNG states, ``TrainerState`` (global step, log history, stateful callbacks) and the data order
  (it replays the sampler for the epoch and skips the batches already seen, then restores the RNG). Its loads use
  safetensors or ``torch.load(weights_only=True)``.
- fusedrl (:data:`STATE_FILE`, JSON): what the trainer keeps outside ``TrainerState``: tokens seen, metric values
  and Trainer's summed loss not yet logged (a save between two logs), non-finite steps. A reference model that training changes (TR-DPO
  ``sync_ref_model``) goes to :data:`REF_MODEL_FILE` (safetensors), gathered whole from its ZeRO-3 partitions or FSDP2
  shards (:func:`save_module`, collective) and loaded back into them. A frozen reference is not saved: it is rebuilt
  from the model given to the trainer, and precomputed reference log-prob columns are recomputed identically.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable

import safetensors.torch
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

STAGING_DIR = ".fusedrl-staging"
STATE_FILE = "fusedrl_state.json"
REF_MODEL_FILE = "fusedrl_ref_model.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """Flush every file and directory under ``root`` (directories after their entries) to stable storage."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(os.path.join(directory, name))
        _fsync_path(directory)


def write_atomically(run_dir: str, name: str, write: Callable[[str], None], *, is_main: bool,
                     barrier: Callable[[], None]) -> str:
    """``write(staging_run_dir)`` must create ``staging_run_dir/name``; it is then published as ``run_dir/name``.

    Every process calls this (``write`` may be collective); ``is_main`` (one process per file system) clears the
    staging directory and does the rename, with ``barrier`` between the steps. An existing ``run_dir/name`` (the same
    step saved again) is replaced; during that swap the previous checkpoints remain the last complete ones.
    Returns the published path.
    """
    staging_run_dir = os.path.join(run_dir, STAGING_DIR)
    if is_main:
        shutil.rmtree(staging_run_dir, ignore_errors=True)  # left over from a save that was killed
        os.makedirs(staging_run_dir)
    barrier()
    write(staging_run_dir)
    barrier()
    final = os.path.join(run_dir, name)
    if is_main:
        staged = os.path.join(staging_run_dir, name)
        fsync_tree(staged)
        if os.path.exists(final):
            old = os.path.join(staging_run_dir, f"replaced-{name}")
            os.replace(final, old)
        os.replace(staged, final)
        _fsync_path(run_dir)
        shutil.rmtree(staging_run_dir, ignore_errors=True)
    barrier()
    return final


def last_complete_checkpoint(folder: str) -> str | None:
    """The ``checkpoint-N`` under ``folder`` with the largest N that has ``trainer_state.json``, or None."""
    if not os.path.isdir(folder):
        return None
    steps = []
    for entry in os.listdir(folder):
        match = _CHECKPOINT_NAME.match(entry)
        if match and os.path.isfile(os.path.join(folder, entry, TRAINER_STATE_FILE)):
            steps.append((int(match.group(1)), entry))
    return os.path.join(folder, max(steps)[1]) if steps else None


def save_json(path: str, data: dict) -> None:
    # JSON keeps Python floats exactly (repr round-trips), so restored metric values are bitwise the saved ones.
    with open(path, "w") as handle:
        json.dump(data, handle, allow_nan=True)


def load_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def _zero3_params(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``state_dict`` name -> parameter for the parameters DeepSpeed ZeRO-3 partitions (they carry ``ds_id``); tied
    parameters appear under each of their names."""
    return {name: param for name, param in module.named_parameters(remove_duplicate=False) if hasattr(param, "ds_id")}


def _gathered(param: torch.nn.Parameter) -> torch.Tensor:
    """The full value of a ZeRO-3 partitioned parameter on the CPU (collective: every process calls it)."""
    import deepspeed  # a partitioned parameter exists, so deepspeed is installed

    # One parameter at a time: the peak stays one full parameter, as TR-DPO's sync does.
    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param.detach().to("cpu", copy=True).contiguous()


def save_module(module: torch.nn.Module, path: str, *, is_main: bool) -> None:
    """Every parameter and buffer of ``module`` as one safetensors file (collective when sharded, FSDP2 or ZeRO-3:
    every process calls it, ``is_main`` writes). Tensors sharing storage (tied embeddings) are stored once; the
    file's metadata maps each alias to the stored name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored_by_key: dict[tuple, str] = {}
    partitioned = _zero3_params(module)
    for name, tensor in module.state_dict().items():
        if name in partitioned:
            # Its state_dict entry is an empty placeholder, the same for every partitioned parameter, so aliases
            # go by identity: a tied parameter is one Parameter under two names.
            key = ("zero3", id(partitioned[name]))
        else:
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in stored_by_key:
            aliases[name] = stored_by_key[key]
            continue
        stored_by_key[key] = name
        tensors[name] = _gathered(partitioned[name]) if name in partitioned else tensor.detach().to("cpu").contiguous()
    if is_main:
        safetensors.torch.save_file(tensors, path, metadata={"aliases": json.dumps(aliases)})


@torch.no_grad()
def load_module(module: torch.nn.Module, path: str) -> None:
    """Load a file of :func:`save_module` into ``module`` (strict: every key must match; collective when sharded:
    every process calls it). FSDP2 (DTensor) entries take their local shard of the full tensor; ZeRO-3 partitioned
    parameters are gathered, overwritten and partitioned again."""
    with safetensors.safe_open(path, framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    full = safetensors.torch.load_file(path, device="cpu")
    full.update({alias: full[stored] for alias, stored in aliases.items()})
    targets = module.state_dict()
    if targets.keys() != full.keys():
        missing, unexpected = sorted(targets.keys() - full.keys())[:3], sorted(full.keys() - targets.keys())[:3]
        raise ValueError(f"{path} does not match the module: missing {missing}, unexpected {unexpected}")
    partitioned = _zero3_params(module)
    for name, target in targets.items():
        source = full[name]
        if name in partitioned:
            import deepspeed

            # Every process read the same file, so each may write its gathered copy; modifier_rank=0 makes
            # DeepSpeed partition rank 0's values on exit.
            param = partitioned[name]
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.copy_(source.to(param.device, param.dtype))
            continue
        if isinstance(target, DTensor):
            source = distribute_tensor(source.to(target.device), target.device_mesh, target.placements)
        target.copy_(source)
