"""Non-finite losses and gradients: skip the optimizer step, count it, stop after too many.

A step is non-finite when any micro-batch loss of its accumulation window, or any gradient element after the backward,
is NaN or infinite. :class:`NonFiniteGuard` (a ``TrainerCallback``, installed by ``FusedTrainer.train``) checks at
``on_pre_optimizer_step``, after gradient clipping and before ``optimizer.step()``:

- skip: every gradient is set to None, and torch optimizers leave a parameter without a gradient untouched (no
  update, no weight decay, no moment or step-count change), so parameters and optimizer state are bitwise unchanged.
- schedule: the step is marked skipped on accelerate's optimizer (``step_was_skipped``, the flag an fp16 overflow
  sets), so neither Trainer nor accelerate advances the learning-rate scheduler: the schedule counts updates applied.
  ``global_step`` still advances (the batch is consumed; logging and saving keep their cadence), so a run with k
  skipped steps ends k updates short of the schedule.
- log: a warning naming the step, and the metric ``nonfinite_steps`` (total so far, in every log after the first).
- stop: more than ``max_nonfinite_steps`` skipped steps in the run (resumes included: the count is saved with each
  checkpoint) raise :class:`NonFiniteTrainingError`; 0 stops at the first.

With an fp16 GradScaler only the loss is checked: scaled gradients overflow as part of normal loss scaling, and the
scaler already skips those steps; a non-finite loss is skipped by filling the gradients with NaN, so the scaler skips
the step (and backs off its scale, as for an overflow). Every process takes the same decision (the flag is max-reduced), as sharded
gradients differ per process.

DeepSpeed: the engine steps inside ``accelerator.backward``, before this hook, so the skip is DeepSpeed's own. Its ZeRO
optimizers (stages 1-3) skip a step whose global gradient norm is not finite, as for an fp16 overflow: partitions and
optimizer state untouched, gradients dropped, the engine's learning-rate scheduler not stepped, and the decision
all-reduced over the data-parallel group. A non-finite loss can come with finite gradients (a NaN added to the loss
after the graph), so :func:`guard_deepspeed_backward` multiplies every loss by 1 before the backward (bitwise the
same gradients), or by NaN when the loss is not finite, which makes every gradient NaN and the step one DeepSpeed skips.
The guard then reads DeepSpeed's verdict (``step_was_skipped``) to count and log the step. A configuration whose
optimizer checks nothing (ZeRO stage 0 in fp32; ZeRO-1/2 with ``bf16.check_grad_overflow: false``, or in fp32 with
``zero_optimization.compute_grad_norm: false``) applies the step: it is still counted, logged as applied, and can
stop training. With DeepSpeed fp16 (dynamic loss scaling) only non-finite losses count, as with a GradScaler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

logger = logging.getLogger("fusedrl")


class NonFiniteTrainingError(RuntimeError):
    """Training stopped because too many optimizer steps had a non-finite loss or gradient."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def grads_are_finite(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """A bool scalar tensor (no host sync): every gradient element of ``parameters`` on this process is finite."""
    # A shard can be empty (FSDP2 splits dim 0 across processes: PPO's [1, H] value head leaves one process none),
    # and the inf-norm of an empty tensor raises.
    grads = [grad for grad in (_local(p.grad) for p in parameters if p.grad is not None) if grad.numel()]
    if not grads:
        return torch.tensor(True)
    # A norm is NaN or inf exactly when some element is: one fused reduction per gradient, one tiny stack at the end.
    norms = torch._foreach_norm(grads, float("inf"))
    return torch.stack([n.to(norms[0].device, torch.float32) for n in norms]).isfinite().all()


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss * 1`` (bitwise the same gradients) when every element of ``loss`` is finite, else ``loss * NaN``, whose
    backward makes every gradient NaN (``NaN * 0`` is NaN too). One device-side select, no host sync."""
    finite = torch.isfinite(loss.detach()).all()
    return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)


class _NonFiniteLossBackward:
    """Stands in for accelerate's ``DeepSpeedEngineWrapper``: every attribute is the wrapped one's, and ``backward``
    hands DeepSpeed :func:`poison_nonfinite` of the loss, so a non-finite loss reaches DeepSpeed's overflow check."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        self.wrapped.backward(poison_nonfinite(loss), **kwargs)


def guard_deepspeed_backward(accelerator) -> bool:
    """Route ``accelerator``'s DeepSpeed backward through :func:`poison_nonfinite` (module docstring). Call it once
    the engine exists (after ``accelerator.prepare``); calling it again is a no-op. Returns whether it is in place.
    ``unguard_deepspeed_backward`` undoes it."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        return False
    if not isinstance(wrapped, _NonFiniteLossBackward):
        accelerator.deepspeed_engine_wrapped = _NonFiniteLossBackward(wrapped)
    return True


def unguard_deepspeed_backward(accelerator) -> None:
    """Give ``accelerator`` back accelerate's own DeepSpeed engine wrapper."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if isinstance(wrapped, _NonFiniteLossBackward):
        accelerator.deepspeed_engine_wrapped = wrapped.wrapped


class NonFiniteGuard(TrainerCallback):
    """See the module docstring. ``record(total)`` gets the running total at the end of every optimizer step once it
    is non-zero (so every log from the first skipped step on carries it). ``grad_scaler``: gradients overflow as part
    of loss scaling (an fp16 GradScaler, or DeepSpeed fp16), so only losses are checked. ``deepspeed``: the engine
    has stepped before the hook; its verdict is read instead of the gradients (install
    :func:`guard_deepspeed_backward` so that non-finite losses are skipped too)."""

    def __init__(self, max_nonfinite_steps: int, *, record: Callable[[int], None] | None = None,
                 grad_scaler: bool = False, deepspeed: bool = False):
        if not (isinstance(max_nonfinite_steps, int) and max_nonfinite_steps >= 0):
            raise ValueError(f"max_nonfinite_steps must be an int >= 0 (0 stops at the first non-finite step), "
                             f"got {max_nonfinite_steps!r}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.record = record
        self.grad_scaler = grad_scaler
        self.deepspeed = deepspeed
        self.num_nonfinite_steps = 0
        self._loss_finite: torch.Tensor | None = None

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Called with every micro-batch loss; stays on the device until the step's check."""
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def _step_is_finite(self, model: torch.nn.Module, optimizer) -> bool:
        finite = torch.tensor(True) if self._loss_finite is None else self._loss_finite.cpu()
        self._loss_finite = None
        if self.deepspeed:
            # The engine has stepped and dropped its gradients; its overflow flag is already all-reduced.
            if not self.grad_scaler and getattr(optimizer, "step_was_skipped", False):
                finite = torch.tensor(False)
        elif not self.grad_scaler and model is not None:
            finite = finite & grads_are_finite(model.parameters()).cpu()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = (~finite).to(torch.int32).reshape(1)
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            finite = flag.cpu()[0] == 0
        return bool(finite)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._step_is_finite(model, optimizer):
            return
        self.num_nonfinite_steps += 1
        step = state.global_step + 1
        if self.deepspeed:
            pass  # the engine has stepped (or skipped) inside the backward already
        elif self.grad_scaler:
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.fill_(float("nan"))
        else:
            for param in model.parameters():
                param.grad = None
            if hasattr(optimizer, "_is_overflow"):  # accelerate's AcceleratedOptimizer.step_was_skipped
                optimizer._is_overflow = True
        action = "skipped"
        if self.deepspeed and not getattr(optimizer, "step_was_skipped", False):
            action = ("applied: DeepSpeed's optimizer did not skip it (ZeRO stages 1-3 skip non-finite gradients "
                      "unless bf16.check_grad_overflow or zero_optimization.compute_grad_norm is false; stage 0 "
                      "in fp32 never does)")
        logger.warning("fusedrl: optimizer step %d has a non-finite loss or gradient; the update is %s "
                       "(%d non-finite steps so far, max_nonfinite_steps=%d)", step, action,
                       self.num_nonfinite_steps, self.max_nonfinite_steps)
        if self.num_nonfinite_steps > self.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"stopping at optimizer step {step}: {self.num_nonfinite_steps} optimizer steps had a non-finite "
                f"loss or gradient, more than max_nonfinite_steps={self.max_nonfinite_steps}. Lower the learning "
                "rate, check the data of those steps (see the warnings), or raise max_nonfinite_steps; the last "
                "checkpoint is intact for --resume_from_checkpoint"
            )

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.num_nonfinite_steps and self.record is not None:  # before this step's log
            self.record(self.num_nonfinite_steps)
        # The scheduler has read the flag by now; the next step starts clean.
        if not (self.grad_scaler or self.deepspeed) and getattr(optimizer, "_is_overflow", False):
            optimizer._is_overflow = False
