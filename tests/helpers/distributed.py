"""Several command-line trainer runs in one set of processes: the worker of tests/runtime/test_distributed_online.py.

A 2-process launch costs ~10 s of start-up on 2 cores (two interpreters importing torch, transformers and DeepSpeed,
then the process group), more than a 3-step run of the tiny model. So one launch per accelerate config runs every
trainer of the test in turn, each built exactly as ``fusedrl <trainer> ...`` builds it (``cli.launch.build_job``:
the same flags, config parsing, presets and CPU FSDP adoption), and writes each run's log history and the placement
of its reward models to ``<output_dir>/run.json``. The test starts it through the command line's own launcher
(:func:`launch_argv`: ``accelerate launch`` or ``torchrun`` with the bundled config and its CPU additions), on a
rendezvous port no other socket is handed meanwhile (:func:`launch`, :func:`free_port`;
tests/runtime/test_distributed.py starts its launches the same way).

    python -m tests.helpers.distributed [flags for every run] runs.json

``runs.json`` lists ``{"trainer": "grpo", "argv": [...], "resume": null | checkpoint path, "tools": false}``; with
``"tools": true`` a GRPO run gets a tool and scripted tool calls (tests/helpers/tool_turns.py) and its result the
number of ``generate`` calls of each process. The leading flags are the ones the launcher adds to the child command
(``--use_cpu True`` for torchrun, ``--ddp_backend gloo``).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from tests.helpers import tool_turns
from tests.helpers.online import char_reward

WORKER = "tests.helpers.distributed"
RESULT_FILE = "run.json"
REWARD_NAME = "char"  # tests.helpers.online.char_reward: dense, so every group of a random model has spread
REPO_ROOT = Path(__file__).resolve().parents[2]
# Rendezvous ports are drawn below Linux's ephemeral range (32768-60999 by default), which the kernel hands to every
# bind(0) and outgoing connection (gloo opens dozens per launch; other test sessions run beside this one). A port
# taken from that range by bind(0) and released is free again for seconds before the launcher binds it; below it,
# only another explicit chooser can collide, and the launch is retried once when that happens.
PORT_RANGE = (20000, 32768)
TORCHRUN_DEFAULT_PORT = 29500  # what every launch without a port uses
# OS entropy: the trainers seed Python's global `random` (set_seed), so it would draw the same ports in every session.
_PORTS = random.SystemRandom()
_PORT_TAKEN = ("EADDRINUSE", "Address already in use")  # TCPStore's and gloo's words for a port in use
# Lines of a failed launch worth showing: Python errors, and a C++ abort (gloo's "terminate called after throwing an
# instance of 'gloo::IoException'" + "what(): ... Connection closed by peer", then SIGABRT).
_FAILURE_MARKERS = ("Error", "error:", "Fatal", "terminate called", "what():", "Exception", "Signal", "exitcode")


def register_test_rewards() -> None:
    from fusedrl.trainers.rewards import register_reward

    register_reward(REWARD_NAME, char_reward, replace=True)


def placement(model: torch.nn.Module) -> str:
    """How a (reward) model is held: ``"zero3"`` (partitioned by DeepSpeed), ``"fsdp2"`` (DTensor shards) or
    ``"whole"`` (a full copy per process), and its class name (``DeepSpeedEngine`` for an engine)."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        kind = "zero3"
    elif any(isinstance(p, DTensor) for p in params):
        kind = "fsdp2"
    else:
        kind = "whole"
    return f"{kind}:{type(model).__name__}"


def run(trainer_name: str, argv: list[str], resume: str | None = None, *, tools: bool = False) -> dict:
    """Build the trainer as the command line does (``tools``: with tool_turns' tool and scripted calls), train
    (resuming from ``resume``), write and return ``{"logs": log_history, "reward_models": [placement, ...]}`` (and
    ``"generate_calls"``, one count per process, with ``tools``)."""
    from fusedrl.cli.launch import build_job
    from fusedrl.runtime import launcher

    job = build_job(trainer_name, argv)
    launcher.adopt_cpu_fsdp()
    extra = tool_turns.trainer_kwargs(job) if tools else {}
    trainer = job.trainer_cls(model=job.model, args=job.config, train_dataset=job.train_dataset,
                              processing_class=job.tokenizer, **extra)
    calls = tool_turns.script_tool_calls(trainer) if tools else None
    trainer.train(resume_from_checkpoint=resume)
    result = {"logs": trainer.state.log_history,
              "reward_models": [placement(reward.func) for reward in getattr(trainer, "rewards", []) if reward.is_model]}
    if tools:
        result["generate_calls"] = tool_turns.generate_calls_per_process(trainer, calls)
    if trainer.accelerator.is_main_process:
        Path(job.config.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(job.config.output_dir) / RESULT_FILE).write_text(json.dumps(result))
    trainer.accelerator.wait_for_everyone()
    return result


def launch_argv(config: str, runs_file: Path, *, num_processes: int, port: int) -> list[str]:
    """The command that runs :func:`main` on ``runs_file`` in ``num_processes`` processes under ``config``: the
    launcher's command for ``fusedrl <trainer>``, with this module in place of ``fusedrl <trainer>``."""
    from fusedrl.runtime import launcher

    argv = launcher.launch_argv("worker", [str(runs_file)], accelerate_config=config, num_processes=num_processes,
                                main_process_port=port)
    start = next(i for i in range(len(argv) - 2) if argv[i:i + 3] == ["-m", "fusedrl", "worker"])
    return [*argv[:start], "-m", WORKER, *argv[start + 3:]]


def free_port() -> int:
    """A port of :data:`PORT_RANGE` nothing is bound to now."""
    while True:
        port = _PORTS.randrange(*PORT_RANGE)
        if port == TORCHRUN_DEFAULT_PORT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def launch(argv_for_port: Callable[[int], list[str]], *, timeout: float) -> subprocess.CompletedProcess:
    """Run ``argv_for_port(port)`` (a multi-process launch, one thread per process) from the repository root, once
    more with another port if the first one was taken before the launcher bound it."""
    for _ in range(2):
        result = subprocess.run(argv_for_port(free_port()), check=False, capture_output=True, text=True,
                                timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO_ROOT)
        if result.returncode == 0 or not any(marker in result.stderr for marker in _PORT_TAKEN):
            break
    return result


def failure_report(result: subprocess.CompletedProcess, name: str) -> str:
    """A failed launch's exit code, the processes' error lines (they sit above the launcher's summary) and the end
    of its stderr."""
    errors = [line for line in result.stderr.splitlines() if any(marker in line for marker in _FAILURE_MARKERS)]
    return f"{name}: exit {result.returncode}:\n" + "\n".join(errors[-30:]) + "\n" + result.stderr[-3000:]


def main(argv: list[str]) -> int:
    *shared, runs_file = argv
    register_test_rewards()
    for spec in json.loads(Path(runs_file).read_text()):
        run(spec["trainer"], [*shared, *spec["argv"]], spec.get("resume"), tools=spec.get("tools", False))
    # Tear the process group down before the interpreter exits (as cli/launch.py's run does): a gloo group left to
    # interpreter shutdown can abort a rank while its peer still holds a connection.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
