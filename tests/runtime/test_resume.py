"""Exact resume after SIGKILL: the resumed run's logged trajectory equals the uninterrupted run's, bitwise.

Each case trains the ``tiny`` preset with DPO on the reference backend (CPU, fp32, one thread) for 8 optimizer steps
with a checkpoint every 3 and ``logging_steps=1``, three ways, each in a fresh process:

- full: uninterrupted;
- killed: the same run, SIGKILLed by a callback at the end of step 5 (before it logs or saves), leaving
  ``checkpoint-3``;
- resumed: ``train(resume_from_checkpoint=True)`` in that directory, steps 4-8.

Every logged entry with a loss (loss, grad_norm, learning_rate, rewards, log-probs, num_tokens, epoch; not the
process's memory figures) must be equal as Python floats. 10 pairs at batch 2 make 5 steps an epoch, so the resume
skips 3 batches mid-epoch and then crosses into a reshuffled epoch 2. Cases: plain DPO; LoRA with gradient
accumulation 2 (3 steps an epoch: the resume starts in epoch 2) logging every 2 steps, so the step-4 log averages
step 3, trained before the kill, with step 4 (the loss and metrics not yet logged are part of the checkpoint); TR-DPO ``sync_ref_model`` syncing every 2 steps with alpha 0.5, whose reference is restored from the
checkpoint; resuming it without that file (a negative control) must change the trajectory.

The runs happen in subprocesses running this file (``python tests/runtime/test_resume.py SPEC``), the full runs of all cases
and the resumes of all cases each in one process, the killed runs one process each, in parallel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.resume import MAX_STEPS, SAVE_STEPS, KillAtStep, build_trainer

ROOT = Path(__file__).resolve().parents[2]  # the repository
CASES = ("plain", "lora_ga2", "sync_ref")
KILL_AT = 5
SYNC_REF_CONTROL = "sync_ref_without_ref_file"



def _worker(spec_path: str) -> None:
    """Run the trainings listed in the JSON spec: ``[{case, output_dir, kill_at?, resume?}]``."""
    torch.set_num_threads(1)
    for run in json.loads(Path(spec_path).read_text()):
        callbacks = [KillAtStep(run["kill_at"])] if run.get("kill_at") else None
        trainer = build_trainer(run["case"], run["output_dir"], callbacks=callbacks)
        trainer.train(resume_from_checkpoint=True if run.get("resume") else None)
        Path(run["output_dir"], "log_history.json").write_text(json.dumps(trainer.state.log_history))


def _start(tmp_path: Path, name: str, runs: list[dict]) -> subprocess.Popen:
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(runs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Output directories and return codes of every run (see the module docstring)."""
    tmp = tmp_path_factory.mktemp("resume")
    full = _start(tmp, "full", [{"case": c, "output_dir": str(tmp / f"full-{c}")} for c in CASES])
    killed = {c: _start(tmp, f"kill-{c}", [{"case": c, "output_dir": str(tmp / f"killed-{c}"), "kill_at": KILL_AT}])
              for c in CASES}
    kill_codes = {}
    for case, process in killed.items():
        kill_codes[case], output = _finish(process)
        assert kill_codes[case] == -signal.SIGKILL, f"{case}: the killed run exited with {kill_codes[case]}\n{output}"
    # Negative control: the sync_ref checkpoint without its reference weights.
    control = tmp / f"killed-{SYNC_REF_CONTROL}"
    shutil.copytree(tmp / "killed-sync_ref", control)
    (control / f"checkpoint-{SAVE_STEPS}" / "fusedrl_ref_model.safetensors").unlink()
    snapshots = {c: sorted(p.name for p in (tmp / f"killed-{c}").iterdir()) for c in CASES}
    resumed = _start(tmp, "resume", [
        *({"case": c, "output_dir": str(tmp / f"killed-{c}"), "resume": True} for c in CASES),
        {"case": "sync_ref", "output_dir": str(control), "resume": True},
    ])
    for process in (full, resumed):
        code, output = _finish(process)
        assert code == 0, output[-4000:]
    return {"tmp": tmp, "kill_codes": kill_codes, "after_kill": snapshots}


def _logged_steps(output_dir: Path) -> list[dict]:
    """The per-step log entries, without measurements of the machine (``memory/*``: RSS differs per process)."""
    history = json.loads((output_dir / "log_history.json").read_text())
    return [{k: v for k, v in entry.items() if not k.startswith("memory/")} for entry in history if "loss" in entry]


@pytest.mark.parametrize("case", CASES)
def test_resume_after_sigkill_is_bitwise(runs, case):
    tmp = runs["tmp"]
    # Killed at the end of step 5: checkpoint-3 is the last one, nothing of step 5 was written.
    assert [n for n in runs["after_kill"][case] if n.startswith("checkpoint")] == [f"checkpoint-{SAVE_STEPS}"]
    full, resumed = _logged_steps(tmp / f"full-{case}"), _logged_steps(tmp / f"killed-{case}")
    every = 2 if case == "lora_ga2" else 1
    assert [e["step"] for e in full] == [e["step"] for e in resumed] == list(range(every, MAX_STEPS + 1, every))
    losses = [e["loss"] for e in full]
    assert len(set(losses)) == len(losses), "the trajectory must move for the comparison to mean anything"
    for expected, actual in zip(full, resumed):
        assert actual == expected, f"{case}: step {expected['step']} differs after resume"
    assert full[-1]["epoch"] > 1.0  # the resumed part crossed into a reshuffled epoch


def test_sync_ref_resume_needs_the_saved_reference(runs):
    """Without ``fusedrl_ref_model.safetensors`` the resumed reference is the initial policy, not the synced one,
    so the trajectory after the resume point differs: the saved reference is what makes the case above exact."""
    tmp = runs["tmp"]
    full, control = _logged_steps(tmp / "full-sync_ref"), _logged_steps(tmp / f"killed-{SYNC_REF_CONTROL}")
    assert full[:SAVE_STEPS] == control[:SAVE_STEPS]
    assert [e["loss"] for e in full[SAVE_STEPS:]] != [e["loss"] for e in control[SAVE_STEPS:]]


def test_checkpoint_files_load_without_pickled_code(runs):
    """Everything a resume reads loads without running pickled code: Trainer's torch files with ``weights_only=True``
    (``rng_state.pth`` holds NumPy's RNG state, so Trainer allows NumPy's array types, and only those, as here),
    fusedrl's own state as JSON, the synced reference as safetensors."""
    import safetensors.torch
    from transformers.trainer_pt_utils import safe_globals

    run_dir = runs["tmp"] / "killed-sync_ref"
    checkpoint = run_dir / f"checkpoint-{SAVE_STEPS}"
    torch.load(checkpoint / "optimizer.pt", weights_only=True)
    torch.load(checkpoint / "scheduler.pt", weights_only=True)
    with safe_globals():
        torch.load(checkpoint / "rng_state.pth", weights_only=True)
    state = json.loads((checkpoint / "fusedrl_state.json").read_text())
    assert state["total_train_tokens"] > 0 and state["nonfinite_steps"] == 0
    ref = safetensors.torch.load_file(checkpoint / "fusedrl_ref_model.safetensors")
    policy = safetensors.torch.load_file(checkpoint / "model.safetensors")
    assert ref.keys() == policy.keys()
    # Synced at step 2 with alpha 0.5, the reference is not the step-3 policy.
    assert any(not torch.equal(ref[k], policy[k]) for k in ref)
    assert not (run_dir / ".fusedrl-staging").exists()


def test_cli_resumes_from_last_checkpoint(tmp_path):
    """``fusedrl dpo --resume_from_checkpoint last`` continues the run in --output_dir from its last checkpoint."""
    from fusedrl.cli import main as cli_main

    out = tmp_path / "run"
    argv = ["dpo", "--model", "tiny", "--dataset", "arithmetic", "--num_rows", "8", "--per_device_train_batch_size",
            "4", "--output_dir", str(out), "--report_to", "none", "--bf16", "False", "--save_steps", "2",
            "--logging_steps", "1", "--kernels", "all=reference"]
    assert cli_main([*argv, "--max_steps", "2"]) == 0
    assert cli_main([*argv, "--max_steps", "3", "--resume_from_checkpoint", "last"]) == 0
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        cli_main([*argv, "--resume_from_checkpoint", str(tmp_path / "missing")])


if __name__ == "__main__":
    _worker(sys.argv[1])
