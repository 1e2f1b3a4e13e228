"""Several command-line trainer runs in one set of processes: the worker of tests/runtime/test_distributed_online.py.

A 2-process launch costs ~10 s of start-up on 2 cores (two interpreters importing torch, transformers and DeepSpeed,
then the process group), more than a 3-step run of the tiny model. So one launch per accelerate config runs every
trainer of the test in turn, each built exactly as ``fusedrl <trainer> ...`` builds it (``cli.launch.build_job``:
the same flags, config parsing, presets and CPU FSDP adoption), and writes each run's log history and the placement
of its reward models to ``<output_dir>/run.json``. The test starts it through the command line's own launcher
(:func:`launch_argv`: ``accelerate launch`` or ``torchrun`` with the bundled config and its CPU additions).

    python -m tests.helpers.distributed [flags for every run] runs.json

``runs.json`` lists ``{"trainer": "grpo", "argv": [...], "resume": null | checkpoint path}``. The leading flags are
the ones the launcher adds to the child command (``--use_cpu True`` for torchrun, ``--ddp_backend gloo``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from tests.helpers.online import char_reward

WORKER = "tests.helpers.distributed"
RESULT_FILE = "run.json"
REWARD_NAME = "char"  # tests.helpers.online.char_reward: dense, so every group of a random model has spread


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


def run(trainer_name: str, argv: list[str], resume: str | None = None) -> dict:
    """Build the trainer as the command line does, train (resuming from ``resume``), write and return
    ``{"logs": log_history, "reward_models": [placement, ...]}``."""
    from fusedrl.cli.launch import build_job
    from fusedrl.runtime import launcher

    job = build_job(trainer_name, argv)
    launcher.adopt_cpu_fsdp()
    trainer = job.trainer_cls(model=job.model, args=job.config, train_dataset=job.train_dataset,
                              processing_class=job.tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    result = {"logs": trainer.state.log_history,
              "reward_models": [placement(reward.func) for reward in getattr(trainer, "rewards", []) if reward.is_model]}
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


def main(argv: list[str]) -> int:
    *shared, runs_file = argv
    register_test_rewards()
    for spec in json.loads(Path(runs_file).read_text()):
        run(spec["trainer"], [*shared, *spec["argv"]], spec.get("resume"))
    # Tear the process group down before the interpreter exits (as cli/launch.py's run does): a gloo group left to
    # interpreter shutdown can abort a rank while its peer still holds a connection.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
