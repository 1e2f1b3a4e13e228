"""Several processes from one command: ``fusedrl <trainer> --accelerate_config fsdp2 ...`` re-runs itself under
``accelerate launch`` (or ``torchrun``), so every trainer, present or future, gets distributed training from the CLI.

    fusedrl dpo --accelerate_config zero3 --num_processes 4 --model tiny --dataset arithmetic ...
      -> accelerate launch --config_file <bundled zero3.yaml> --num_processes 4 -m fusedrl dpo --model tiny ...

``--accelerate_config`` takes a bundled name (:func:`bundled_configs`: ddp, fsdp2, zero2, zero3, files in
``accelerate_configs/`` beside this module) or a path to a user's accelerate YAML. The bundled files are written for
GPU machines. On a machine without CUDA the launcher adds what a CPU run needs, without editing the file:

- 2 processes unless ``--num_processes`` says otherwise (a GPU machine defaults to its GPU count);
- ``ddp`` runs through ``python -m torch.distributed.run`` with ``--use_cpu True`` (torch DDP over gloo): accelerate
  turns a CPU data-parallel config into ``MULTI_CPU``, which it starts as one process without MPI;
- ``fsdp2``/``zero2``/``zero3`` run under ``accelerate launch`` with ``--ddp_backend gloo`` and ``use_cpu`` left
  false. accelerate 1.15 turns FSDP and DeepSpeed into plain ``MULTI_CPU`` DDP as soon as ``use_cpu`` is set (its
  ``AcceleratorState`` only selects them on a GPU-type state), so a ``use_cpu: true`` config would train unsharded
  without a word. DeepSpeed then runs as configured (its CPU accelerator talks gloo); FSDP needs one more step in the
  trainer process, :func:`adopt_cpu_fsdp`.

The child command carries every other flag unchanged, without ``--accelerate_config``/``--num_processes``/
``--main_process_port``, so it trains instead of launching again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "accelerate_configs"
CPU_NUM_PROCESSES = 2
# Set by accelerate launch / torchrun in the processes they start.
_LAUNCHED_ENV = ("LOCAL_RANK", "ACCELERATE_DYNAMO_BACKEND")


def bundled_configs() -> list[str]:
    """Names accepted by ``--accelerate_config`` besides a file path."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def config_path(name_or_path: str) -> Path:
    """The bundled config called ``name_or_path``, or the YAML file at that path."""
    if name_or_path in bundled_configs():
        return CONFIG_DIR / f"{name_or_path}.yaml"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    raise ValueError(f"--accelerate_config {name_or_path!r}: not a bundled config ({', '.join(bundled_configs())}) "
                     "nor an existing .yaml/.yml file")


def split_launch_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``(launch flags, the rest of argv)``; ``launch.accelerate_config`` is None when no launch is asked for."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--accelerate_config", help=f"bundled ({', '.join(bundled_configs())}) or a YAML path")
    parser.add_argument("--num_processes", type=int, help="processes to start (default: GPUs, or 2 without CUDA)")
    parser.add_argument("--main_process_port", type=int, help="rendezvous port of process 0")
    return parser.parse_known_args(argv)


def launch_argv(command: str, rest: list[str], *, accelerate_config: str, num_processes: int | None = None,
                main_process_port: int | None = None, cuda: bool | None = None,
                num_gpus: int | None = None) -> list[str]:
    """The command that runs ``fusedrl <command> <rest>`` in several processes (see the module docstring).
    ``cuda`` and ``num_gpus`` default to this machine's."""
    import torch

    path = config_path(accelerate_config)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    num_gpus = (torch.cuda.device_count() if cuda else 0) if num_gpus is None else num_gpus
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    with open(path) as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict) or "distributed_type" not in config:
        raise ValueError(f"--accelerate_config {path}: not an accelerate config (no distributed_type)")
    kind = config["distributed_type"]
    if num_processes is None and (path.parent == CONFIG_DIR or not cuda):  # a user's file keeps its count on GPUs
        num_processes = num_gpus if cuda else CPU_NUM_PROCESSES
    child = ["-m", "fusedrl", command]
    if not cuda and kind in ("MULTI_GPU", "MULTI_CPU"):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes)]
        if main_process_port is not None:
            torchrun += ["--master_port", str(main_process_port)]
        # use_cpu before the user's flags, so theirs still win: without it the children find no GPU, stay
        # undistributed and each trains alone on all the data.
        return [*torchrun, *child, "--use_cpu", "True", *rest]
    if not cuda and kind in ("FSDP", "DEEPSPEED"):
        if config.get("use_cpu"):
            raise ValueError(f"--accelerate_config {path}: use_cpu: true makes accelerate run {kind} as plain DDP; "
                             "remove it (fusedrl runs it on CPU over gloo by itself)")
        child += ["--ddp_backend", "gloo"]
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    if num_processes is not None:
        argv += ["--num_processes", str(num_processes)]
    if main_process_port is not None:
        argv += ["--main_process_port", str(main_process_port)]
    return [*argv, *child, *rest]


def relaunch(command: str, argv: list[str]) -> int | None:
    """Run ``fusedrl <command> <argv>`` in several processes if ``argv`` has ``--accelerate_config``; returns the
    launcher's exit code, or None when there is nothing to launch (the caller trains in this process)."""
    launch, rest = split_launch_flags(argv)
    if launch.accelerate_config is None:
        if launch.num_processes is not None or launch.main_process_port is not None:
            raise ValueError("--num_processes and --main_process_port need --accelerate_config "
                             f"({', '.join(bundled_configs())} or a YAML path)")
        return None
    if any(name in os.environ for name in _LAUNCHED_ENV):
        raise ValueError("--accelerate_config inside a process that accelerate/torchrun already started; drop the "
                         "flag, or run `fusedrl` itself instead of `accelerate launch -m fusedrl`")
    argv = launch_argv(command, rest, accelerate_config=launch.accelerate_config,
                       num_processes=launch.num_processes, main_process_port=launch.main_process_port)
    print("fusedrl: launching", " ".join(argv), file=sys.stderr, flush=True)
    return subprocess.run(argv, check=False).returncode


def adopt_cpu_fsdp() -> bool:
    """In a process ``accelerate launch`` started with an FSDP config on a machine without CUDA (and
    ``ddp_backend='gloo'``): make accelerate's state select FSDP, as it does on GPUs. Returns whether it did.

    Call it after the training arguments exist (they build accelerate's process state: gloo, world size, ranks) and
    before the trainer (its ``Accelerator`` chooses FSDP only when that state is of a GPU type, and on CPU it is
    ``NO``). It changes that one field; the device stays the CPU and FSDP2's ``fully_shard`` runs over gloo.
    """
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    state = PartialState()
    if state.distributed_type != DistributedType.NO or state.num_processes < 2 or state.backend != "gloo":
        return False
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    return True
