"""TRL-named metrics of a fusedrl trainer: values appended per mode (train / eval) and averaged at each ``log``
(``memory/*`` peaks: the largest), gathered over processes."""

from __future__ import annotations

import torch

from fusedrl.trainers.adapters.mixin import mean_over_adapters


class TrainerMetrics:
    """Mixin for a ``transformers.Trainer`` whose ``_finish_setup`` creates ``self._metrics`` and
    ``self._total_train_tokens``."""

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    # Joint mode (trainers/adapters/joint.py): the adapter whose loss is being computed prefixes every metric
    # ("a/rewards/accuracies"), and the train log adds the adapters' mean under the plain name.
    _metric_prefix = ""
    _metric_adapters: tuple[str, ...] = ()

    def record(self, mode: str, name: str, value: float) -> None:
        self._metrics[mode][self._metric_prefix + name].append(value)

    def masked_mean(self, values_NT: torch.Tensor, mask_NT: torch.Tensor) -> float:
        """Token-weighted mean over all processes (0.0 when no token is selected)."""
        mask_NT = mask_NT.bool()
        total = self.accelerator.gather_for_metrics(values_NT.detach().float()[mask_NT].sum()).sum()
        count = self.accelerator.gather_for_metrics(mask_NT.sum()).sum()
        return (total / count).item() if count > 0 else 0.0

    def gathered_mean(self, values: torch.Tensor) -> float:
        return self.accelerator.gather(values.detach().float()).mean().item()

    def weighted_mean(self, mean: torch.Tensor, count: torch.Tensor | int) -> float:
        """The mean over every process's items of a scalar ``mean`` over this process's ``count`` items (tokens):
        what one process holding all the items computes. The plain mean of the processes' means, TRL's, differs as
        soon as they hold different counts (completions of other lengths). One process: ``mean`` itself, exactly."""
        mean = mean.detach().float()
        if self.accelerator.num_processes == 1:
            return mean.item()
        count = torch.as_tensor(count, dtype=torch.float32, device=mean.device)
        total = torch.where(count > 0, mean * count, 0.0)  # a process without items adds nothing (its mean is NaN)
        return (self.accelerator.gather(total.reshape(1)).sum() / self.accelerator.gather(count.reshape(1)).sum()).item()

    def record_num_tokens(self, mode: str, attention_mask: torch.Tensor) -> None:
        if mode == "train":
            self._total_train_tokens += self.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = self._mode()
        # Peaks are reported as the largest since the last log; everything else is averaged (TRL's rule).
        metrics = {key: max(values) if key.startswith("memory/") else sum(values) / len(values)
                   for key, values in self._metrics[mode].items() if values}
        if mode == "train":
            metrics = mean_over_adapters(metrics, self._metric_adapters, logs)
        else:
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()
