"""Rich progress display for any ``transformers.Trainer``.

On an interactive terminal (or Jupyter): a live panel with a training bar, an evaluation bar while evaluating, and
the last logged metrics as a compact table grouped by key prefix (``rewards/chosen`` goes to group ``rewards``).
Elsewhere (stdout redirected to a file, CI): no bars and no cursor control codes, just one plain line per log event
(``step 3/10 | loss 0.6931 | ...``), which stays readable in a log file. Only the world-process-zero prints.
"""

from __future__ import annotations

import numbers

from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from transformers import PrinterCallback, ProgressCallback, TrainerCallback


def format_value(value) -> str:
    """4 significant digits for floats (a learning rate of 5e-7 stays visible, unlike with a fixed ``.3f``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(value)
    return f"{value:.4g}"


def metrics_table(logs: dict, title: str | None = None) -> RenderableType:
    """One two-column table per key prefix (``a`` of ``a/b``), in order of first appearance, flowing across the width
    and wrapping onto more rows when they do not fit."""
    groups: dict[str, dict] = {}
    for key, value in logs.items():
        group, _, name = key.rpartition("/")
        groups.setdefault(group, {})[name] = value
    tables = []
    for group, metrics in groups.items():
        table = Table(title=group or None, box=None, show_header=False, padding=(0, 1), title_style="bold blue")
        table.add_column("metric", no_wrap=True, style="magenta")
        table.add_column("value", justify="right")
        for name, value in metrics.items():
            table.add_row(Text(name), Text(format_value(value)))  # Text: a "[...]" key is not markup
        tables.append(table)
    columns = Columns(tables, padding=(0, 3))
    return columns if title is None else Group(Text(title, style="bold green"), columns)


def log_line(logs: dict, step: int, max_steps: int | None) -> str:
    """The plain-text form of one log event: ``step 3/10 | loss 0.6931 | rewards/chosen 0.01``."""
    head = f"step {step}/{max_steps}" if max_steps else f"step {step}"
    return " | ".join([head, *(f"{key} {format_value(value)}" for key, value in logs.items())])


class RichProgressCallback(TrainerCallback):
    """Progress bars and a metrics table on a terminal; plain log lines otherwise (see the module docstring).

    Add it with :func:`use_rich_progress` to also drop the trainer's tqdm bar or printer, which would print the same
    information a second time.

    Args:
        console: where to print; a ``rich.console.Console()`` on stdout if None.
        live: force the live display on or off; by default on when the console is interactive or Jupyter.
    """

    def __init__(self, console: Console | None = None, live: bool | None = None):
        self.console = console or Console()
        self.live = live
        self._display: Live | None = None
        self._display_for_training = False
        self._train_bar: Progress | None = None
        self._eval_bar: Progress | None = None
        self._train_task = None
        self._eval_task = None
        self._metrics: RenderableType = ""  # the last logged metrics table
        self._max_steps: int | None = None

    @property
    def is_live(self) -> bool:
        return self.live if self.live is not None else (self.console.is_interactive or self.console.is_jupyter)

    # Live display -------------------------------------------------------------------------------------------------

    def _bar(self) -> Progress:
        return Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )

    def _render(self) -> RenderableType:
        return Panel(Group(self._train_bar, self._eval_bar, self._metrics), border_style="green")

    def _start_display(self, for_training: bool) -> None:
        self._stop_display()  # a run that raised never reached on_train_end
        self._train_bar, self._eval_bar = self._bar(), self._bar()
        self._metrics = ""
        self._display = Live(self._render(), console=self.console, refresh_per_second=4, transient=not for_training)
        self._display_for_training = for_training
        self._display.start()

    def _stop_display(self) -> None:
        if self._display is not None:
            self._display.stop()
        self._display = self._train_bar = self._eval_bar = None
        self._train_task = self._eval_task = None

    # Hooks --------------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._max_steps = state.max_steps
        if self.is_live:
            self._start_display(for_training=True)
            self._train_task = self._train_bar.add_task("Training", total=state.max_steps)
            self._train_bar.update(self._train_task, completed=state.global_step)  # resumed runs start mid-way
        else:
            self.console.print(f"Training for {state.max_steps} steps", highlight=False, markup=False)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self._train_task is not None:
            self._train_bar.update(self._train_task, completed=state.global_step)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not (state.is_world_process_zero and self.is_live):
            return
        if self._display is None:  # trainer.evaluate() / predict() outside training
            self._start_display(for_training=False)
        if self._eval_task is None:
            total = len(eval_dataloader) if hasattr(eval_dataloader, "__len__") else None
            self._eval_task = self._eval_bar.add_task("Evaluation", total=total)
        self._eval_bar.advance(self._eval_task)

    def _end_evaluation(self, state) -> None:
        if not state.is_world_process_zero:
            return
        if self._eval_task is not None:
            self._eval_bar.remove_task(self._eval_task)
            self._eval_task = None
        if self._display is not None and not self._display_for_training:
            self._stop_display()

    def on_evaluate(self, args, state, control, **kwargs):
        self._end_evaluation(state)

    def on_predict(self, args, state, control, **kwargs):
        self._end_evaluation(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and logs):
            return
        if not self.is_live:
            self.console.print(
                log_line(logs, state.global_step, self._max_steps), highlight=False, markup=False, soft_wrap=True
            )
            return
        table = metrics_table(logs, title=f"step {state.global_step}")
        if self._display is not None and self._display_for_training:
            self._metrics = table
            self._display.update(self._render())
        else:
            self.console.print(table)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.is_live:
            self._stop_display()  # not transient: the final bars and metrics stay on screen
        else:
            self.console.print(f"Training done at step {state.global_step}", highlight=False, markup=False)
        self._max_steps = None


def use_rich_progress(trainer, **kwargs) -> RichProgressCallback:
    """Replace ``trainer``'s tqdm bar / log printer by a :class:`RichProgressCallback` (built with ``kwargs``)."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    callback = RichProgressCallback(**kwargs)
    trainer.add_callback(callback)
    return callback
