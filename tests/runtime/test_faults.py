"""Faults: a kill during a checkpoint save, non-finite steps, and Triton kernels that fail to compile at run time.

- atomic checkpoints: a run SIGKILLed inside the save of ``checkpoint-4`` (after its optimizer file) leaves only a
  staging directory that resume ignores; resuming from ``checkpoint-2`` finishes, and ``save_total_limit`` rotation
  still keeps the newest two checkpoints.
- non-finite steps: a NaN in the loss (with or without NaN gradients) or in a gradient only, at optimizer step 2, is
  skipped: parameters and optimizer state are bitwise unchanged by it, the learning rate does not advance, a warning
  names the step, ``nonfinite_steps`` is logged; more than ``max_nonfinite_steps`` stop training with an error.
- Triton fallback: a kernel launch raising Triton's ``CompilationError`` under the default selection runs the compiled
  backend instead (bitwise its result and gradients), logged once, and later calls skip the kernel; an explicit
  ``triton`` request raises.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from triton.compiler.errors import CompilationError

from fusedrl.ops import dispatch as registry
from fusedrl.ops.logprobs import linear_token_logprobs
from fusedrl.ops.preference import preference_loss
from fusedrl.runtime import checkpoint
from fusedrl.runtime.faults import NonFiniteTrainingError
from tests.helpers.resume import build_trainer

ROOT = Path(__file__).resolve().parents[2]  # the repository
KILL_IN_SAVE_AT = 4


# --- atomic checkpoints ---------------------------------------------------------------------------------------------


def _kill_during_save(output_dir: str) -> None:
    """Subprocess body: train with a save every 2 steps, SIGKILLed right after the optimizer of checkpoint-4 is
    written (its model files are there too; RNG state and trainer_state.json are not)."""
    torch.set_num_threads(1)
    trainer = build_trainer("plain", output_dir, max_steps=6, save_steps=2, save_total_limit=2)
    write_optimizer = trainer._save_optimizer_and_scheduler

    def write_then_die(path):
        write_optimizer(path)
        if trainer.state.global_step == KILL_IN_SAVE_AT:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer._save_optimizer_and_scheduler = write_then_die
    trainer.train()


def test_kill_during_save_leaves_no_checkpoint_that_resume_picks(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, str(Path(__file__).resolve()), "kill-during-save", str(out)], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=600, check=False)
    assert process.returncode == -signal.SIGKILL, process.stdout[-2000:] + process.stderr[-2000:]

    staged = out / checkpoint.STAGING_DIR / f"checkpoint-{KILL_IN_SAVE_AT}"
    assert (staged / "optimizer.pt").exists() and not (staged / "trainer_state.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")  # transformers' own lookup agrees

    trainer = build_trainer("plain", str(out), max_steps=6, save_steps=2, save_total_limit=2)
    trainer.train(resume_from_checkpoint=True)
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # rotation, limit 2
    assert not (out / checkpoint.STAGING_DIR).exists()
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


def test_last_complete_checkpoint_skips_a_partial_one(tmp_path):
    """A ``checkpoint-N`` cut short by plain transformers (no trainer_state.json, written last) is not resumed."""
    for step, complete in ((2, True), (4, True), (6, False), (10, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / checkpoint.STAGING_DIR / "checkpoint-8").mkdir(parents=True)
    assert checkpoint.last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert checkpoint.last_complete_checkpoint(str(tmp_path / "absent")) is None


# --- non-finite steps -----------------------------------------------------------------------------------------------


class _Snapshots(TrainerCallback):
    """Trainable parameters and optimizer state at the start and end of every optimizer step."""

    def __init__(self):
        self.begin, self.end = {}, {}

    @staticmethod
    def _take(model, optimizer):
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for s in optimizer.state_dict()["state"].values()]
        return params, state

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.begin[state.global_step + 1] = self._take(model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.end[state.global_step] = self._take(model, optimizer)


def _poison(trainer, steps: set[int], mode: str) -> None:
    """Make optimizer steps ``steps`` non-finite: ``loss_and_grad`` multiplies the loss by NaN (NaN gradients too),
    ``loss_only`` adds a NaN constant (gradients stay finite), ``grad_only`` turns one gradient NaN in a hook."""
    compute_loss = trainer.compute_loss

    def poisoned(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        if trainer.state.global_step + 1 in steps:
            if mode == "loss_and_grad":
                loss = loss * float("nan")
            elif mode == "loss_only":
                loss = loss + torch.tensor(float("nan"))
        return loss

    trainer.compute_loss = poisoned
    if mode == "grad_only":
        param = next(p for p in trainer.model.parameters() if p.requires_grad)
        param.register_hook(lambda g: g * float("nan") if trainer.state.global_step + 1 in steps else g)


def _same(a, b) -> bool:
    params_a, state_a = a
    params_b, state_b = b
    return (all(torch.equal(params_a[n], params_b[n]) for n in params_a)
            and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]
                    for x, y in zip(state_a, state_b, strict=True) for k in x))


@pytest.mark.parametrize("mode", ["loss_and_grad", "loss_only", "grad_only"])
def test_nonfinite_step_is_skipped(tmp_path, caplog, mode):
    snapshots = _Snapshots()
    trainer = build_trainer("plain", str(tmp_path), max_steps=4, save_strategy="no", callbacks=[snapshots])
    _poison(trainer, {2}, mode)
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        trainer.train()
    assert _same(snapshots.begin[2], snapshots.end[2]), "the skipped step changed parameters or optimizer state"
    assert not _same(snapshots.begin[3], snapshots.end[3]), "a finite step must update"
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1 and "optimizer step 2 " in warnings[0]
    logs = [e for e in trainer.state.log_history if "loss" in e]
    # The logged rate is the one each step used: linear decay moves it every applied step, not over the skipped one.
    rates = [e["learning_rate"] for e in logs]
    assert rates[0] > rates[1] == rates[2] > rates[3]
    assert "nonfinite_steps" not in logs[0] and [e["nonfinite_steps"] for e in logs[1:]] == [1, 1, 1]


@pytest.mark.parametrize("limit,bad_steps,stop_step", [(0, {2}, 2), (1, {2, 3}, 3)])
def test_too_many_nonfinite_steps_stop_training(tmp_path, limit, bad_steps, stop_step):
    trainer = build_trainer("plain", str(tmp_path), max_steps=4, save_strategy="no", max_nonfinite_steps=limit)
    _poison(trainer, bad_steps, "loss_and_grad")
    message = rf"stopping at optimizer step {stop_step}: {limit + 1} optimizer steps .* max_nonfinite_steps={limit}"
    with pytest.raises(NonFiniteTrainingError, match=message):
        trainer.train()


def test_max_nonfinite_steps_is_validated(tmp_path):
    from fusedrl.trainers.preference.dpo_config import DPOConfig

    with pytest.raises(ValueError, match="max_nonfinite_steps must be an int >= 0"):
        DPOConfig(output_dir=str(tmp_path), max_nonfinite_steps=-1, use_cpu=True, bf16=False)


# --- Triton run-time fallback ---------------------------------------------------------------------------------------


class _FailingKernel:
    """Stands in for a Triton launch whose kernel does not compile (e.g. too many registers for the GPU)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise CompilationError(None, ast.Module(body=[], type_ignores=[]), "simulated: out of resources")


@pytest.fixture
def default_triton(monkeypatch):
    """A fresh registry whose default backend is ``triton`` (as on CUDA) with no explicit selection."""
    monkeypatch.setattr(registry, "_default_backend", lambda op, device: "triton")
    monkeypatch.setattr(registry, "_failed_triton", {})
    monkeypatch.setattr(registry, "_logged_fallbacks", set())
    monkeypatch.setattr(registry, "_configured_selection", {})
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


def _fallback_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "failed at run time" in r.getMessage()]


def test_run_with_fallback_catches_compile_errors_only(default_triton, caplog):
    kernel = _FailingKernel()
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        assert registry.run_with_fallback("logprobs", kernel, lambda x: x + 1, 1) == 2
        assert registry.run_with_fallback("logprobs", kernel, lambda x: x + 2, 1) == 3
    assert kernel.calls == 1  # the second call skips the failing kernel
    assert len(_fallback_warnings(caplog)) == 1 and "CompilationError" in _fallback_warnings(caplog)[0]
    assert registry.resolve("logprobs", "cpu") == "compiled"

    def wrong_input(x):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):  # not a compile failure: no fallback hides it
        registry.run_with_fallback("preference", wrong_input, lambda x: x, 1)


def test_linear_logprobs_falls_back_to_compiled(default_triton, caplog, monkeypatch):
    from fusedrl.ops.logprobs import triton as logprobs_triton

    # The row launches fail, inside the Triton entry points that dispatch.define_op runs with its fallback.
    failing_fwd, failing_bwd = _FailingKernel(), _FailingKernel()
    monkeypatch.setattr(logprobs_triton, "rows_fwd", failing_fwd)
    monkeypatch.setattr(logprobs_triton, "rows_bwd", failing_bwd)
    hidden = torch.randn(3, 7, 16)
    weight = torch.randn(37, 16)
    labels = torch.randint(0, 37, (3, 7))
    labels[0, :2] = -100

    def run():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = linear_token_logprobs(h, w, labels)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), h.grad, w.grad

    assert registry.resolve("linear_logprobs", "cpu") == "triton"
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        fell_back = run()
        again = run()
    with registry.use_kernels(linear_logprobs="compiled"):
        compiled = run()
    for got, want in ((fell_back, compiled), (again, compiled)):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert failing_fwd.calls == 1 and failing_bwd.calls == 0
    assert len(_fallback_warnings(caplog)) == 1

    with registry.use_kernels(linear_logprobs="triton"), pytest.raises(CompilationError):
        run()
    assert failing_fwd.calls == 2


def test_preference_falls_back_to_compiled(default_triton, caplog, monkeypatch):
    from fusedrl.ops.preference import triton as triton_loss

    failing = _FailingKernel()
    monkeypatch.setattr(triton_loss, "pair_preference_losses", failing)
    chosen, rejected, ref_chosen, ref_rejected = torch.randn(4, 5).unbind(0)
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        fell_back = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3)
    with registry.use_kernels(preference="compiled"):
        compiled = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3)
    assert all(torch.equal(a, b) for a, b in zip(fell_back, compiled))
    assert failing.calls == 1 and len(_fallback_warnings(caplog)) == 1
    with registry.use_kernels(preference="triton"), pytest.raises(CompilationError):
        preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3)



def test_policy_loss_falls_back_to_compiled(default_triton, caplog, monkeypatch):
    from fusedrl.ops.policy import policy_loss
    from fusedrl.ops.policy import triton as policy_triton

    failing = _FailingKernel()
    monkeypatch.setattr(policy_triton, "policy_rows", failing)
    logps, old, ref = (torch.randn(3, 11) - 1.0 for _ in range(3))
    advantages, mask = torch.randn(3), torch.rand(3, 11) > 0.3

    def run():
        leaf = logps.clone().requires_grad_()
        out = policy_loss(leaf, old, advantages, mask, ref_logps_BT=ref, beta=0.1, loss_type="grpo")
        out.loss.backward()
        return out.loss.detach(), out.kl, out.clip_ratio_region, leaf.grad

    assert registry.resolve("policy_loss", "cpu") == "triton"
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        fell_back = run()
        again = run()
    with registry.use_kernels(policy_loss="compiled"):
        compiled = run()
    for got in (fell_back, again):
        assert all(torch.equal(a, b) for a, b in zip(got, compiled))
    assert failing.calls == 1 and len(_fallback_warnings(caplog)) == 1
    with registry.use_kernels(policy_loss="triton"), pytest.raises(CompilationError):
        run()
    assert failing.calls == 2

if __name__ == "__main__":
    if sys.argv[1] == "kill-during-save":
        _kill_during_save(sys.argv[2])
