"""Exact resume of the online trainers (fusedrl/trainers/online/resume.py): after a SIGKILL, and from any checkpoint
of a run, the resumed run logs the uninterrupted run's trajectory bitwise and ends with its weights.

Cases (tests/helpers/online_resume.py; 6 optimizer steps, a checkpoint every step, CPU fp32, one thread):
GRPO with old and reference log-probs and a TR-DPO-synced reference (rounds of 4 micro-steps); GRPO with LoRA and 2
accumulation steps (a round is 2 optimizer steps); GRPO training two LoRA adapters together (per-adapter RNG
streams); RLOO with row-seeded sampling (``rank_invariant_sampling``); PPO with a LoRA policy and a reward model
(rollouts of 2 PPO epochs x 2 minibatches); Online DPO with a reward model. Each crosses an epoch boundary (the
sampler's permutation of the resumed epoch must be the uninterrupted one's).

Three runs per case, in subprocesses running this file (``python tests/trainers/test_online_resume.py SPEC``):

- full: uninterrupted, checkpoint-1 ... checkpoint-6;
- killed: the same run SIGKILLed at the end of step 4, before it saves, leaving checkpoint-1..3: checkpoint-3 is
  inside a round / rollout for every sampling trainer; then resumed with ``resume_from_checkpoint=True`` to step 6;
- sweep: from each other checkpoint of the full run (1, 2, 4, 5: inside rounds and at their edges) to step 6.

Every logged entry with a loss must equal the full run's (the machine's ``memory/*`` and the wall-clock
``step_time`` aside), as must every tensor of the last checkpoint. A negative control resumes GRPO from checkpoint-3
without its saved round: it samples a new round, and the trajectory differs.

The killed runs share one process that forks a child per case (the imports are paid once); the full and killed
runs go in parallel, then the resumes and the sweep.
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
import safetensors.torch
import torch

from fusedrl.trainers.adapters.joint_rollout import JointRollouts
from fusedrl.trainers.online.resume import ROLLOUT_FILE, load_round, save_round
from fusedrl.trainers.online.sampling import RepeatSampler
from tests.helpers.online_resume import CASES, KILL_AT, MAX_STEPS, build_trainer
from tests.helpers.resume import KillAtStep

ROOT = Path(__file__).resolve().parents[2]
SWEEP_FROM = (1, 2, 4, 5)
CONTROL = "grpo_sync_ref"
IGNORED = ("memory/", "step_time")
# Checkpoint-3 is inside a round (GRPO / RLOO) or a rollout (PPO). Online DPO samples every step: it has no round.
ROUND_CASES = tuple(case for case in CASES if case != "online_dpo_reward_model")
# A checkpoint at the end of a round: rounds (rollouts) of 4 optimizer steps, else 2.
EDGE = {case: 4 if case in ("grpo_sync_ref", "ppo_lora_reward_model") else 2 for case in ROUND_CASES}



def _train(run: dict) -> None:
    callbacks = [KillAtStep(run["kill_at"])] if run.get("kill_at") else None
    trainer = build_trainer(run["case"], run["output_dir"], callbacks=callbacks, **run.get("overrides", {}))
    trainer.train(resume_from_checkpoint=run.get("resume"))
    Path(run["output_dir"], "log_history.json").write_text(json.dumps(trainer.state.log_history))


def _worker(spec_path: str) -> None:
    """Run the trainings of the JSON spec ``[{case, output_dir, kill_at?, resume?, overrides?}]``; a run with
    ``kill_at`` runs in a forked child, whose exit status goes to ``<output_dir>/exit.json``."""
    torch.set_num_threads(1)
    for run in json.loads(Path(spec_path).read_text()):
        if not run.get("kill_at"):
            _train(run)
            continue
        pid = os.fork()
        if pid == 0:
            try:
                _train(run)
            finally:
                os._exit(0)  # reached only when the kill did not happen
        _, status = os.waitpid(pid, 0)
        signalled = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        Path(run["output_dir"], "exit.json").write_text(json.dumps({"signal": signalled}))


def _start(tmp: Path, name: str, runs: list[dict]) -> subprocess.Popen:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps(runs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("online_resume")
    full = _start(tmp, "full", [{"case": c, "output_dir": str(tmp / f"full-{c}")} for c in CASES])
    killed = _start(tmp, "killed", [{"case": c, "output_dir": str(tmp / f"killed-{c}"), "kill_at": KILL_AT}
                                    for c in CASES])
    _finish(killed)
    resumed = _start(tmp, "resumed", [{"case": c, "output_dir": str(tmp / f"killed-{c}"), "resume": True}
                                      for c in CASES])
    _finish(full)
    control = tmp / "control-checkpoint-3"
    shutil.copytree(tmp / f"full-{CONTROL}" / "checkpoint-3", control)
    (control / ROLLOUT_FILE).unlink()
    sweep_runs = [{"case": c, "output_dir": str(tmp / f"sweep-{c}-{k}"), "overrides": {"save_strategy": "no"},
                   "resume": str(tmp / f"full-{c}" / f"checkpoint-{k}")} for c in CASES for k in SWEEP_FROM]
    sweep_runs.append({"case": CONTROL, "output_dir": str(tmp / "control"), "overrides": {"save_strategy": "no"},
                       "resume": str(control)})
    sweep = _start(tmp, "sweep", sweep_runs)
    _finish(resumed)
    _finish(sweep)
    return tmp


def _logged_steps(output_dir: Path) -> list[dict]:
    history = json.loads((output_dir / "log_history.json").read_text())
    return [{k: v for k, v in entry.items() if not k.startswith(IGNORED)} for entry in history if "loss" in entry]


def _checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under ``checkpoint`` (model or adapters, PPO's value model, the synced
    reference), keyed by file and name."""
    return {f"{path.relative_to(checkpoint)}:{name}": tensor for path in sorted(checkpoint.rglob("*.safetensors"))
            for name, tensor in safetensors.torch.load_file(path).items()}


def _assert_same_trajectory(full: list[dict], resumed: list[dict], label: str) -> None:
    assert [e["step"] for e in resumed] == [e["step"] for e in full] == list(range(1, MAX_STEPS + 1)), label
    for expected, actual in zip(full, resumed):
        assert actual == expected, f"{label}: step {expected['step']} differs"


@pytest.mark.parametrize("case", CASES)
def test_resume_after_sigkill_is_bitwise(runs, case):
    killed = runs / f"killed-{case}"
    assert json.loads((killed / "exit.json").read_text()) == {"signal": signal.SIGKILL}
    full = _logged_steps(runs / f"full-{case}")
    losses = [e["loss"] for e in full]
    assert len(set(losses)) == len(losses), "the trajectory must move for the comparison to mean anything"
    assert full[-1]["epoch"] > 1.0  # the run crossed into a second epoch
    _assert_same_trajectory(full, _logged_steps(killed), case)
    expected = _checkpoint_tensors(runs / f"full-{case}" / f"checkpoint-{MAX_STEPS}")
    actual = _checkpoint_tensors(killed / f"checkpoint-{MAX_STEPS}")
    assert expected.keys() == actual.keys() and expected
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), f"{case}: {name} differs at the end"


@pytest.mark.parametrize("case", CASES)
def test_resume_from_every_checkpoint_is_bitwise(runs, case):
    full = _logged_steps(runs / f"full-{case}")
    for k in SWEEP_FROM:
        _assert_same_trajectory(full, _logged_steps(runs / f"sweep-{case}-{k}"), f"{case} from checkpoint-{k}")


@pytest.mark.parametrize("case", ROUND_CASES)
def test_checkpoint_holds_the_pending_round(runs, case):
    """A checkpoint inside a round saves the round (and its plan); one at a round's edge saves none."""
    checkpoint = runs / f"full-{case}" / "checkpoint-3"
    state = json.loads((checkpoint / "fusedrl_state.json").read_text())["online"]
    assert state["pending"] and state["plan"]["world_size"] == 1
    batches, _ = load_round(str(checkpoint / ROLLOUT_FILE), torch.device("cpu"))
    assert len(batches) > 1 and all("completion_ids" in batch for batch in batches)
    edge = runs / f"full-{case}" / f"checkpoint-{EDGE[case]}"
    assert not json.loads((edge / "fusedrl_state.json").read_text())["online"]["pending"]
    if case == "joint_grpo":  # the adapters' RNG streams are saved at every checkpoint, in rounds or not
        _, extra = load_round(str(edge / ROLLOUT_FILE), torch.device("cpu"))
        assert sorted(extra) == ["rng/p0", "rng/p1"]
        assert all(state.dtype == torch.uint8 and state.numel() == torch.get_rng_state().numel()
                   for state in extra.values())
    else:
        assert not (edge / ROLLOUT_FILE).exists()


def test_resume_without_the_saved_round_differs(runs):
    """Negative control: checkpoint-3 of GRPO without ``fusedrl_rollout.safetensors`` resumes by sampling a new
    round from the step-3 weights, so steps 4-6 differ from the full run: the saved round is what makes it exact."""
    full, control = _logged_steps(runs / f"full-{CONTROL}"), _logged_steps(runs / "control")
    assert full[:3] == control[:3]
    assert [e["loss"] for e in full[3:]] != [e["loss"] for e in control[3:]]


def test_resume_refuses_a_round_cut_for_another_plan(runs, tmp_path):
    """A round saved for ``steps_per_generation=2`` cannot be served in 4 micro-batches: the error names the field."""
    trainer = build_trainer(CONTROL, str(tmp_path), steps_per_generation=4)
    with pytest.raises(ValueError, match="steps_per_generation=2.*resume with steps_per_generation=2"):
        trainer._load_from_checkpoint(str(runs / f"full-{CONTROL}" / "checkpoint-3"))


# --- pieces ----------------------------------------------------------------------------------------------------------

def test_round_file_round_trips_every_kind_of_value(tmp_path):
    from fusedrl.trainers.adapters.joint import PerAdapter

    base = torch.arange(12.0).view(6, 2)
    batches = [{"ids": base[:3], "mask": torch.tensor([True, False, True]), "count": torch.tensor(7),
                "per_adapter": PerAdapter([torch.tensor(1.5), torch.tensor(2.5)]), "prompt_length": 5, "none": None},
               {"ids": base[3:], "mask": torch.tensor([False, False, True]), "count": torch.tensor(7),
                "per_adapter": PerAdapter([torch.tensor(3.5), torch.tensor(4.5)]), "prompt_length": 5, "none": None}]
    path = str(tmp_path / "round.safetensors")
    save_round(path, batches, {"rng": torch.get_rng_state()})  # views of one tensor: saved as copies
    loaded, extra = load_round(path, torch.device("cpu"))
    assert torch.equal(extra["rng"], torch.get_rng_state())
    for original, restored in zip(batches, loaded, strict=True):
        assert original.keys() == restored.keys()
        for key, value in original.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(restored[key], value) and restored[key].dtype == value.dtype
            elif isinstance(value, PerAdapter):
                assert isinstance(restored[key], PerAdapter)
                assert all(torch.equal(a, b) for a, b in zip(restored[key], value, strict=True))
            else:
                assert restored[key] == value
    with pytest.raises(TypeError, match="batch/0/bad is a object"):
        save_round(path, [{"bad": object()}], {})


def test_repeat_sampler_set_epoch_replays_the_permutations():
    """Iterated once per epoch, the sampler draws TRL's successive permutations with or without ``set_epoch``; a
    fresh sampler put at epoch 2 draws the third of them (a run resumed in epoch 2)."""
    def sampler():
        return RepeatSampler(range(7), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=5)

    plain = sampler()
    successive = [list(plain) for _ in range(3)]
    assert len({tuple(order) for order in successive}) == 3
    with_epochs = sampler()
    for epoch, expected in enumerate(successive):
        with_epochs.set_epoch(epoch)
        assert list(with_epochs) == expected
    resumed = sampler()
    resumed.set_epoch(2)
    assert list(resumed) == successive[2]


def test_joint_rng_streams_must_match_the_adapters():
    rollouts = JointRollouts(None, ["a", "b"])
    assert rollouts.state_tensors() == {}  # before the first round
    rollouts.load_state_tensors({"rng/a": torch.get_rng_state(), "rng/b": torch.get_rng_state()})
    assert list(rollouts.state_tensors()) == ["rng/a", "rng/b"]
    with pytest.raises(ValueError, match=r"adapters \['a', 'c'\].*resume with the same adapters"):
        rollouts.load_state_tensors({"rng/a": torch.get_rng_state(), "rng/c": torch.get_rng_state()})


if __name__ == "__main__":
    _worker(sys.argv[1])
