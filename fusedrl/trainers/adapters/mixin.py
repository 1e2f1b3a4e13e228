"""The ``transformers.Trainer`` overrides behind joint mode (``adapters/joint.py``), mixed into ``FusedTrainer``;
each is a pass-through when ``self._joint`` is None (one trained adapter, or none)."""

from __future__ import annotations

import contextlib

from accelerate.utils import is_peft_model

from fusedrl.trainers.adapters.joint import (
    JointAdapters,
    JointLoader,
    check_joint_config,
    check_joint_datasets,
    joint_adapter_names,
)

_UNSUPPORTED = ("PPOTrainer", "OnlineDPOTrainer")


class JointAdapterMixin:
    """Joint-mode hooks of a fusedrl trainer: datasets, dataloader, forward cache, clipping, evaluation, metrics."""

    _joint: JointAdapters | None = None

    def _joint_datasets(self, args, train_dataset, eval_dataset):
        """Validate joint-mode datasets; returns the dataset whose columns stand for all (the first adapter's)."""
        names = joint_adapter_names(args)
        if not names:
            return train_dataset
        if any(cls.__name__ in _UNSUPPORTED for cls in type(self).__mro__):
            raise ValueError(f"{type(self).__name__} trains one adapter at a time: model_adapter_name must be a single "
                             f"name, got {list(names)}. Several adapters train together with DPO, ORPO, CPO, KTO, GRPO and RLOO")
        check_joint_config(args)
        check_joint_datasets(train_dataset, names, "train_dataset", required=True)
        check_joint_datasets(eval_dataset, names, "eval_dataset", required=False)
        return train_dataset[names[0]]

    def _setup_joint(self) -> None:
        names = joint_adapter_names(self.args)
        if not names:
            return
        if not is_peft_model(self.accelerator.unwrap_model(self.model)):
            raise ValueError(f"model_adapter_name={list(names)} needs a PEFT model holding those adapters")
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError("a mixture-of-experts router loss is one batch-level term: it would couple adapters "
                             "trained together; set router_aux_loss_coef=0 or train them one at a time")
        self._joint = JointAdapters(self, names)
        self._metric_adapters = names
        # The instance attribute shadows the trainer's compute_loss; JointAdapters calls the method per adapter.
        self.compute_loss = self._joint.compute_loss

    def _joint_hooked(self):
        return self._joint.hooked() if self._joint is not None else contextlib.nullcontext()

    # --- Trainer overrides ----------------------------------------------------------------------------------------

    def get_train_dataloader(self):
        if self._joint is None:
            return super().get_train_dataloader()
        return self._joint.train_dataloader()

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        if isinstance(dataloader, JointLoader):
            return dataloader.skipping(num_batches)
        return super().get_resumed_dataloader(dataloader, num_batches)

    def _clip_grad_norm(self, model):
        if self._joint is None:
            return super()._clip_grad_norm(model)
        return self._joint.clip_grad_norm(model, self.args.max_grad_norm)

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)
        finally:
            if self._joint is not None:  # the backward is done: its recompute no longer needs the training rows
                self._joint.router.clear_train_rows()

    def _evaluate_joint(self, ignore_keys, metric_key_prefix: str) -> dict:
        """Each adapter on its own eval dataset (``<prefix>_<adapter>_loss``, ``<prefix>_<adapter>/<metric>``), plus
        the adapters' mean ``<prefix>_loss``, logged."""
        metrics = {}
        for name in self._joint.names:
            with self._joint.router.use(name), self._joint.metrics_of(name):
                metrics.update(self.evaluate(self.eval_dataset[name], ignore_keys, f"{metric_key_prefix}_{name}"))
        losses = [metrics[f"{metric_key_prefix}_{name}_loss"] for name in self._joint.names]
        mean = {f"{metric_key_prefix}_loss": sum(losses) / len(losses)}
        self.log(mean)
        return {**metrics, **mean}

    def _model_forward(self, model, model_inputs: dict, *, keep_padding: bool = False, **extra):
        """``(outputs, final hidden states [N, T, H])`` of ``model(**model_inputs)``, in the shared-prefix layout where
        it applies (``prefix_sharing``: hidden states at padded positions are then zero unless ``keep_padding``); in
        joint mode, cut from the union forward when the inputs are rows of the union batch."""
        if self._joint is not None and not extra:
            cached = self._joint.cached_forward(model, model_inputs, keep_padding=keep_padding)
            if cached is not None:
                return cached
        return self.prefix_sharing.forward(model, model_inputs, keep_padding=keep_padding, **extra)


def mean_over_adapters(metrics: dict[str, float], adapters, logs: dict) -> dict[str, float]:
    """``metrics`` plus, for each name recorded as ``<adapter>/<name>``, the adapters' mean under ``<name>`` (unless
    ``logs`` already has it: the Trainer's own ``grad_norm`` is the norm of all adapters together)."""
    if not adapters:
        return metrics
    grouped: dict[str, list[float]] = {}
    for key, value in metrics.items():
        for adapter in adapters:
            prefix = f"{adapter}/"
            if key.startswith(prefix):
                grouped.setdefault(key[len(prefix):], []).append(value)
    means = {name: sum(values) / len(values) for name, values in grouped.items() if name not in logs}
    return {**metrics, **means}
