"""``ResumableTrainer``: the ``transformers.Trainer`` layer under ``FusedTrainer`` that makes runs survive faults.

- atomic checkpoints: ``_save_checkpoint`` lets Trainer write into a staging directory and publishes it with one
  rename (:mod:`fusedrl.runtime.checkpoint`); rotation (``save_total_limit``), the best-checkpoint bookkeeping and
  hub pushes run on the published directory.
- exact resume: each checkpoint also holds :meth:`ResumableTrainer.fusedrl_state` (JSON: counters, and the loss and
  metrics not yet logged, restored at ``on_train_begin`` after Trainer resets them) and, when training changes
  the reference model (``sync_ref_model``), the reference weights (safetensors); ``train(resume_from_checkpoint=True)``
  picks the last *complete* checkpoint and ``_load_from_checkpoint`` restores both after Trainer's own state (under
  DeepSpeed, where Trainer resumes through the engine's checkpoint instead, it is called after that, weights skipped).
- non-finite steps: ``train`` installs a :class:`~fusedrl.runtime.faults.NonFiniteGuard` configured by
  ``args.max_nonfinite_steps``; ``training_step`` hands it every micro-batch loss. Under DeepSpeed, whose engine
  steps inside the backward, the backward is routed through ``faults.guard_deepspeed_backward`` at train begin.

A subclass keeps extra resumable state by extending :meth:`fusedrl_state` / :meth:`load_fusedrl_state` and, for a
module it trains besides the policy, :meth:`mutable_reference`. Everything stored loads without unpickling code:
JSON, safetensors, and Trainer's own files with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from fusedrl.runtime import checkpoint
from fusedrl.runtime.faults import NonFiniteGuard, guard_deepspeed_backward
from fusedrl.runtime.renamed_weights import restore_renamed_weights

logger = logging.getLogger("fusedrl")

DEFAULT_MAX_NONFINITE_STEPS = 10


class _TrainBeginHook(TrainerCallback):
    """Calls ``fn()`` at ``on_train_begin``: the first point after Trainer's training loop has reset its state."""

    def __init__(self, fn):
        self.fn = fn

    def on_train_begin(self, args, state, control, **kwargs):
        self.fn()


class ResumableTrainer(Trainer):
    """See the module docstring."""

    _staging_run_dir: str | None = None  # set while Trainer writes a checkpoint under the staging directory
    _pending_push: bool = False
    _nonfinite_guard: NonFiniteGuard | None = None
    _resumed_log_accumulators: tuple[float, int] | None = None

    # --- state hooks (subclasses extend) ----------------------------------------------------------------------------

    def fusedrl_state(self) -> dict:
        """JSON-serialisable state kept outside ``TrainerState`` that a resumed run needs; saved per checkpoint."""
        guard = self._nonfinite_guard
        # Trainer keeps the loss summed since the last log outside TrainerState: without it, the first log after a
        # resume between two logs would average fewer steps than the uninterrupted run's.
        tr_loss = getattr(self, "_tr_loss", None)
        return {"nonfinite_steps": guard.num_nonfinite_steps if guard is not None else 0,
                "unlogged_loss": None if tr_loss is None else float(tr_loss),
                "last_logged_step": getattr(self, "_globalstep_last_logged", None)}

    def load_fusedrl_state(self, state: dict) -> None:
        if self._nonfinite_guard is not None:
            self._nonfinite_guard.num_nonfinite_steps = state.get("nonfinite_steps", 0)
        if state.get("unlogged_loss") is not None:
            self._resumed_log_accumulators = (state["unlogged_loss"], state["last_logged_step"])

    def _restore_log_accumulators(self) -> None:
        """At train begin, after Trainer reset its logging accumulators: the values of the resumed checkpoint."""
        if self._resumed_log_accumulators is None:
            return
        unlogged_loss, last_logged_step = self._resumed_log_accumulators
        self._resumed_log_accumulators = None
        # float32 like Trainer's accumulator; the saved Python float holds that float32 exactly.
        self._tr_loss = torch.tensor(unlogged_loss, dtype=torch.float32, device=self.args.device)
        self._globalstep_last_logged = last_logged_step

    def mutable_reference(self) -> torch.nn.Module | None:
        """A module besides the policy whose weights change during training and must be checkpointed (None)."""
        return None

    # --- training -----------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the last complete ``checkpoint-N`` of
        ``output_dir`` (see :func:`fusedrl.runtime.checkpoint.last_complete_checkpoint`)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = checkpoint.last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but output_dir {self.args.output_dir!r} holds no "
                                 "complete checkpoint-N directory; pass a checkpoint path, or train from the start")
            logger.info("fusedrl: resuming from %s", resume_from_checkpoint)
        if self._nonfinite_guard is None:
            # DeepSpeed fp16 scales its loss like a GradScaler: overflowing gradients are its normal business.
            loss_scaling = self.accelerator.scaler is not None or (self.is_deepspeed_enabled and self.args.fp16)
            self._nonfinite_guard = NonFiniteGuard(
                getattr(self.args, "max_nonfinite_steps", DEFAULT_MAX_NONFINITE_STEPS),
                record=self.record_nonfinite_steps, grad_scaler=loss_scaling, deepspeed=self.is_deepspeed_enabled,
            )
            self.add_callback(self._nonfinite_guard)
            self.add_callback(_TrainBeginHook(self._restore_log_accumulators))
            if self.is_deepspeed_enabled:  # the engine exists from train begin on (Trainer prepares it first)
                self.add_callback(_TrainBeginHook(lambda: guard_deepspeed_backward(self.accelerator)))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def record_nonfinite_steps(self, total: int) -> None:
        """Called by the guard after each skipped step with the run's total (a trainer logs it as a metric)."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self._nonfinite_guard is not None:
            self._nonfinite_guard.observe_loss(loss)
        return loss

    # --- saving ---------------------------------------------------------------------------------------------------

    def _get_output_dir(self, trial) -> str:
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._pending_push = False

        def write(staging_run_dir: str) -> None:
            self._staging_run_dir = staging_run_dir
            try:
                super(ResumableTrainer, self)._save_checkpoint(model, trial)
            finally:
                self._staging_run_dir = None
            self._save_extra_state(os.path.join(staging_run_dir, name), run_dir)

        final = checkpoint.write_atomically(run_dir, name, write, is_main=self.args.should_save,
                                            barrier=self.accelerator.wait_for_everyone)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        if self._pending_push:
            super()._push_from_checkpoint(final)

    def _save_extra_state(self, staged: str, run_dir: str) -> None:
        if self.state.best_global_step:
            # Trainer looked for the best checkpoint under the staging directory; point it at the published one.
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step == self.state.global_step or os.path.isdir(best):
                self.state.best_model_checkpoint = best
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staged, checkpoint.TRAINER_STATE_FILE))
        reference = self.mutable_reference()
        if reference is not None:
            checkpoint.save_module(self.accelerator.unwrap_model(reference),
                                   os.path.join(staged, checkpoint.REF_MODEL_FILE), is_main=self.args.should_save)
        if self.args.should_save:
            checkpoint.save_json(os.path.join(staged, checkpoint.STATE_FILE), self.fusedrl_state())

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging_run_dir is not None:  # pushed from the published directory once it exists
            self._pending_push = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    # --- loading --------------------------------------------------------------------------------------------------

    _weights_restored_by_engine: bool = False  # set while fusedrl's state loads after DeepSpeed's own resume

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        prepared = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if resume_from_checkpoint is not None and self.is_deepspeed_enabled:
            # Under DeepSpeed, Trainer resumes through the engine's checkpoint (deepspeed_load_checkpoint, above) and
            # never calls _load_from_checkpoint, where fusedrl's state, the synced reference and a subclass's own
            # resume state load: call it now, with Trainer's weight loading skipped.
            self._weights_restored_by_engine = True
            try:
                self._load_from_checkpoint(resume_from_checkpoint)
            finally:
                self._weights_restored_by_engine = False
        return prepared

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._weights_restored_by_engine:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):  # those load through their own state
                restore_renamed_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)
        state_path = os.path.join(resume_from_checkpoint, checkpoint.STATE_FILE)
        if os.path.isfile(state_path):
            self.load_fusedrl_state(checkpoint.load_json(state_path))
        reference = self.mutable_reference()
        if reference is None:
            return
        ref_path = os.path.join(resume_from_checkpoint, checkpoint.REF_MODEL_FILE)
        if os.path.isfile(ref_path):
            checkpoint.load_module(self.accelerator.unwrap_model(reference), ref_path)
        else:
            logger.warning("fusedrl: %s has no %s; the synced reference model restarts from its initial weights",
                           resume_from_checkpoint, checkpoint.REF_MODEL_FILE)
