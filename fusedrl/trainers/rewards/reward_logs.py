"""What reward functions log through the ``log_extra`` and ``log_metric`` keyword arguments (TRL 1.16), buffered
for one batch and flushed once it is scored:

- ``log_extra(column, values)``: one value per completion of the batch, shown as an extra column of the completions
  table (``trainer._logs["extra"][column]``); flushed gathered over processes, columns in sorted order (every
  process must gather the same columns in the same order; a process that did not log a column gives None values);
- ``log_metric(name, value)``: a scalar; flushed as ``sum / count`` over all processes' values of the batch, one
  entry per batch, averaged with the other metrics at each log.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from accelerate.utils import gather_object


class RewardLogBuffer:
    """The pending ``log_extra`` columns and ``log_metric`` values of the batch being scored."""

    def __init__(self):
        self.extra: dict[str, list] = {}
        self.metrics: dict[str, list[float]] = defaultdict(list)
        self.num_rows: int | None = None

    def start_batch(self, num_rows: int) -> None:
        """Expect ``num_rows`` values per ``log_extra`` column until the next flush."""
        self.num_rows = num_rows

    def log_extra(self, column: str, values) -> None:
        if not isinstance(column, str):
            raise TypeError(f"log_extra's column must be a str (the table column's name), got {type(column).__name__}")
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"log_extra({column!r}, values): values must be a list with one value per completion, got "
                            f"a {type(values).__name__}")
        if self.num_rows is not None and len(values) != self.num_rows:
            raise ValueError(f"log_extra({column!r}, values) got {len(values)} values for {self.num_rows} "
                             "completions; pass one value per completion")
        if column in self.extra:
            raise ValueError(f"log_extra column {column!r} was already logged for this batch; each reward function "
                             "should log its own column names, once per batch")
        self.extra[column] = list(values)

    def log_metric(self, name: str, value: float) -> None:
        if not isinstance(name, str):
            raise TypeError(f"log_metric's name must be a str, got {type(name).__name__}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"log_metric({name!r}, value): value must be a number, got {value!r}") from None
        self.metrics[name].append(value)

    def flush_extra(self) -> dict[str, list]:
        """Every process's columns of this batch, gathered (rows in process order), sorted by name; clears them.
        A collective: every process calls it once per batch."""
        num_rows = self.num_rows or 0
        columns = sorted(set(gather_object(list(self.extra))))
        flushed = {column: gather_object(self.extra.get(column, [None] * num_rows)) for column in columns}
        self.extra.clear()
        self.num_rows = None
        return flushed

    def flush_metrics(self, accelerator) -> dict[str, float]:
        """Each metric's mean over every value logged in this batch on every process (sum / count, TRL's); clears
        them. A collective: every process calls it once per batch."""
        flushed = {}
        for name in sorted(set(gather_object(list(self.metrics)))):
            values = self.metrics.get(name, [])
            local = torch.tensor([math.fsum(values), len(values)], dtype=torch.float32, device=accelerator.device)
            total, count = accelerator.gather(local).view(-1, 2).sum(0).tolist()
            flushed[name] = total / count
        self.metrics.clear()
        return flushed
