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
gradients differ per process. Under DeepSpeed the engine steps inside the backward, before this hook: the step is
counted, logged and can stop training, but cannot be skipped here (DeepSpeed's own fp16/bf16 overflow check applies).
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
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    # A norm is NaN or inf exactly when some element is: one fused reduction per gradient, one tiny stack at the end.
    norms = torch._foreach_norm(grads, float("inf"))
    return torch.stack([n.to(norms[0].device, torch.float32) for n in norms]).isfinite().all()


class NonFiniteGuard(TrainerCallback):
    """See the module docstring. ``record(total)`` gets the running total at the end of every optimizer step once it
    is non-zero (so every log from the first skipped step on carries it)."""

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

    def _step_is_finite(self, model: torch.nn.Module) -> bool:
        finite = torch.tensor(True) if self._loss_finite is None else self._loss_finite.cpu()
        self._loss_finite = None
        if not self.grad_scaler and model is not None:
            finite = finite & grads_are_finite(model.parameters()).cpu()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = (~finite).to(torch.int32).reshape(1)
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            finite = flag.cpu()[0] == 0
        return bool(finite)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._step_is_finite(model):
            return
        self.num_nonfinite_steps += 1
        step = state.global_step + 1
        if self.grad_scaler:
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.fill_(float("nan"))
        elif not self.deepspeed:
            for param in model.parameters():
                param.grad = None
            if hasattr(optimizer, "_is_overflow"):  # accelerate's AcceleratedOptimizer.step_was_skipped
                optimizer._is_overflow = True
        action = "counted (DeepSpeed already applied it)" if self.deepspeed else "skipped"
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
