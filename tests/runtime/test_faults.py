"""Faults: a kill during a checkpoint save, non-finite steps, and Triton kernels that fail to compile at run time.

- atomic checkpoints: a run SIGKILLed inside the save of ``checkpoint-4`` (after its optimizer file) leaves only a
  staging directory that resume ignores; resuming from ``checkpoint-2`` finishes, and ``save_total_limit`` rotation
  still keeps the newest two checkpoints.
- non-finite steps: a NaN in the loss (with or without NaN gradients) or in a gradient only, at optimizer step 2, is
  skipped: parameters and optimizer state are bitwise unchanged by it, the learning rate does not advance, a warning
  names the step, ``nonfinite_steps`` is logged; more than ``max_nonfinite_steps`` stop training with an error.
  Under DeepSpeed (whose engine steps inside the backward) the same holds, checked on the fp32 partitions and Adam
  moments: ZeRO-2 in one process with a NaN gradient only (DeepSpeed's own overflow check), ZeRO-3 in two processes
  with a NaN added to one rank's loss only (finite gradients: the guarded backward turns them NaN, and DeepSpeed's
  all-reduced verdict skips the step on both ranks).
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
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from triton.compiler.errors import CompilationError

from fusedrl.ops import dispatch as registry
from fusedrl.ops.logprobs import linear_token_logprobs
from fusedrl.ops.preference import preference_loss
from fusedrl.runtime import checkpoint, faults, launcher
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


def _poison(trainer, steps: set[int], mode: str, *, rank: int | None = None) -> None:
    """Make optimizer steps ``steps`` non-finite (on process ``rank`` only, if given): ``loss_and_grad`` multiplies
    the loss by NaN (NaN gradients too), ``loss_only`` adds a NaN constant (gradients stay finite), ``grad_only``
    turns one gradient NaN in a hook."""
    compute_loss = trainer.compute_loss
    if rank is not None and trainer.accelerator.process_index != rank:
        return

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


class _DeepSpeedSnapshots(_Snapshots):
    """Under DeepSpeed: this rank's fp32 master partitions and their Adam state, held by the ZeRO optimizer (ZeRO-3
    hands its torch optimizer one partition at a time, so they are read from the ZeRO side)."""

    @staticmethod
    def _take(model, optimizer):
        zero = optimizer.optimizer  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer
        partitions = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        params = {str(i): p.detach().clone() for i, p in enumerate(partitions)}
        state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in zero.optimizer.state[p].items()}
                 for p in partitions]
        return params, state


def _deepspeed_nonfinite(output_dir: str, mode: str, rank: str) -> None:
    """Body of each process that accelerate launch starts: the DPO run of test_nonfinite_step_is_skipped under the
    launch's DeepSpeed config, step 2 poisoned on process ``rank``; each process writes what it saw as JSON."""
    torch.set_num_threads(1)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("fusedrl").addHandler(handler)
    snapshots = _DeepSpeedSnapshots()
    # DeepSpeed comes from accelerate launch's config; use_cpu would turn it into plain CPU data parallelism
    # (fusedrl/runtime/launcher.py), so it stays False and gloo carries the collectives.
    trainer = build_trainer("plain", output_dir, max_steps=4, save_strategy="no", callbacks=[snapshots],
                            use_cpu=False, ddp_backend="gloo")
    _poison(trainer, {2}, mode, rank=int(rank))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    report = {"skipped_unchanged": _same(snapshots.begin[2], snapshots.end[2]),
              "next_updates": not _same(snapshots.begin[3], snapshots.end[3]),
              "engine_skipped_steps": trainer.model_wrapped.skipped_steps,
              "warnings": [m for m in messages if "non-finite" in m],
              "rates": [e["learning_rate"] for e in logs],
              "nonfinite_steps": [e.get("nonfinite_steps") for e in logs]}
    Path(output_dir, f"report-{trainer.accelerator.process_index}.json").write_text(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage,num_processes,mode,rank", [("zero2", 1, "grad_only", 0), ("zero3", 2, "loss_only", 1)],
                         ids=["zero2-grad", "zero3-2procs-loss-on-rank1"])
def test_nonfinite_step_is_skipped_under_deepspeed(tmp_path, stage, num_processes, mode, rank):
    pytest.importorskip("deepspeed")
    # Launched as the CLI launches --accelerate_config zero2/zero3 on a CPU machine (fusedrl/runtime/launcher.py).
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launcher.config_path(stage)),
            "--num_processes", str(num_processes), "--main_process_port", str(_free_port()),
            str(Path(__file__).resolve()), "deepspeed-nonfinite", str(tmp_path), mode, str(rank)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    for index in range(num_processes):
        report = json.loads((tmp_path / f"report-{index}.json").read_text())
        assert report["skipped_unchanged"], f"rank {index}: the skipped step changed the weights or Adam moments"
        assert report["next_updates"], f"rank {index}: a finite step must update"
        assert report["engine_skipped_steps"] == 1
        assert len(report["warnings"]) == 1 and "optimizer step 2 " in report["warnings"][0]
        assert "the update is skipped" in report["warnings"][0]
        rates = report["rates"]  # DeepSpeed's scheduler does not step over the skipped update
        assert rates[0] > rates[1] == rates[2] > rates[3]
        assert report["nonfinite_steps"] == [None, 1, 1, 1]


def test_deepspeed_backward_guard_poisons_only_nonfinite_losses():
    """Bitwise the same gradient for a finite loss (times 1); NaN everywhere for a non-finite one, even where the
    loss does not depend on a weight (NaN * 0); installed once, removed again."""
    weight = torch.tensor([1.5, -2.0, 0.25], requires_grad=True)
    x = torch.tensor([0.3, 0.0, -1.2])
    (weight * x).sum().backward()
    expected, weight.grad = weight.grad.clone(), None
    faults.poison_nonfinite((weight * x).sum()).backward()
    assert torch.equal(weight.grad, expected)
    for bad in (float("nan"), float("inf")):
        weight.grad = None
        faults.poison_nonfinite((weight * x).sum() + bad).backward()
        assert weight.grad.isnan().all()

    calls = []
    engine_wrapper = types.SimpleNamespace(engine="engine", backward=lambda loss, **kw: calls.append((loss, kw)))
    accelerator = types.SimpleNamespace(deepspeed_engine_wrapped=engine_wrapper)
    assert faults.guard_deepspeed_backward(accelerator) and faults.guard_deepspeed_backward(accelerator)
    guarded = accelerator.deepspeed_engine_wrapped
    assert guarded.wrapped is engine_wrapper and guarded.engine == "engine"  # installed once; attributes pass
    guarded.backward(torch.tensor(2.0) + float("nan"), sync_gradients=True)
    assert calls[0][0].isnan() and calls[0][1] == {"sync_gradients": True}
    faults.unguard_deepspeed_backward(accelerator)
    assert accelerator.deepspeed_engine_wrapped is engine_wrapper
    assert not faults.guard_deepspeed_backward(types.SimpleNamespace(deepspeed_engine_wrapped=None))


@pytest.mark.parametrize("fp16,loss,skipped,outcome", [
    (False, 1.0, True, "skipped"),  # a NaN gradient, caught by DeepSpeed's ZeRO check
    (False, float("nan"), False, "applied"),  # an optimizer that checks nothing (ZeRO stage 0 in fp32)
    (False, 1.0, False, None),
    (True, 1.0, True, None),  # fp16 loss scaling: an overflow is DeepSpeed's business, not a fault
    (True, float("inf"), True, "skipped"),
], ids=["grad-skipped", "loss-applied", "finite", "fp16-overflow", "fp16-loss"])
def test_guard_reads_deepspeed_verdict(caplog, fp16, loss, skipped, outcome):
    """Under DeepSpeed the engine has stepped before the hook: the guard counts from the loss and DeepSpeed's
    ``step_was_skipped`` and says which of the two happened."""
    guard = faults.NonFiniteGuard(3, grad_scaler=fp16, deepspeed=True)
    guard.observe_loss(torch.tensor(loss))
    optimizer = types.SimpleNamespace(step_was_skipped=skipped)
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        guard.on_pre_optimizer_step(None, types.SimpleNamespace(global_step=4), None, optimizer=optimizer)
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert guard.num_nonfinite_steps == (outcome is not None) == len(warnings)
    if outcome is not None:
        assert f"optimizer step 5 has a non-finite loss or gradient; the update is {outcome}" in warnings[0]


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
    elif sys.argv[1] == "deepspeed-nonfinite":
        _deepspeed_nonfinite(*sys.argv[2:5])
