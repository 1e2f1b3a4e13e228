"""Batch plumbing of the sampling trainers (GRPO, RLOO): TRL's prompt-repeating sampler and its streamed
counterpart (train and eval sets given as an ``IterableDataset``), the split of one generation round into
micro-batches, and NaN-aware statistics for reward metrics.

Legend: N completions, G completions per prompt, P prompts (N = P * G).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sized

import torch
from datasets import IterableDataset
from torch.utils.data import DataLoader, Sampler

logger = logging.getLogger("fusedrl")

# TRL 1.16's words (its tests pin them), then why and how to fix it.
DISPATCHED_STREAM_ERROR = (
    "Iterable datasets require `dispatch_batches=False`, but it is set to `True` in `accelerator_config`. Please set "
    "it to `False`: a streamed set's rows are raw prompts, which accelerate cannot dispatch from the main process, "
    "and each process reads its own slice of the stream (set accelerator_config={'dispatch_batches': False} in "
    "the config, or leave it unset)"
)


class RepeatSampler(Sampler[int]):
    """TRL's ``RepeatSampler``: indices in chunks of ``batch_size`` prompts (a seeded permutation when ``shuffle``;
    an incomplete last chunk is dropped), each chunk yielded ``repeat_count`` times, each index ``mini_repeat_count``
    times in a row. With ``mini_repeat_count=G`` every prompt's G completions land in one generation batch, next to
    each other; ``repeat_count = num_iterations * steps_per_generation`` lets the buffered round be reused.

    Example: 5 prompts, mini_repeat_count=2, batch_size=2, repeat_count=1, no shuffle -> 0 0 1 1 2 2 3 3.
    """

    def __init__(self, data_source: Sized, mini_repeat_count: int, batch_size: int = 1, repeat_count: int = 1,
                 shuffle: bool = True, seed: int | None = None):
        self.num_samples = len(data_source)
        self.mini_repeat_count, self.batch_size, self.repeat_count = mini_repeat_count, batch_size, repeat_count
        self.shuffle = shuffle
        if shuffle:
            # One generator for the sampler's life: each epoch draws the next permutation, as TRL's does.
            self.generator = torch.Generator()
            if seed is not None:
                self.generator.manual_seed(seed)
            self._initial_state = self.generator.get_state()

    def set_epoch(self, epoch: int) -> None:
        """Put the generator where it stands before epoch ``epoch``'s permutation (Trainer calls this before each
        epoch's iteration). A run iterating once per epoch draws exactly as before; a run resumed in epoch ``e``
        starts from a fresh sampler but draws the permutation of the uninterrupted run's epoch ``e``, not its first."""
        if not self.shuffle:
            return
        self.generator.set_state(self._initial_state)
        for _ in range(epoch):
            torch.randperm(self.num_samples, generator=self.generator)

    def __iter__(self) -> Iterator[int]:
        order = (torch.randperm(self.num_samples, generator=self.generator).tolist() if self.shuffle
                 else list(range(self.num_samples)))
        for start in range(0, self.num_samples - self.batch_size + 1, self.batch_size):
            chunk = order[start:start + self.batch_size]
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.mini_repeat_count

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size) * self.batch_size * self.mini_repeat_count * self.repeat_count


def identity_collator(rows: list[dict]) -> list[dict]:
    """Rows stay rows: prompts are tokenized at generation time."""
    return rows


def repeated_stream(dataset: IterableDataset, mini_repeat_count: int, batch_size: int, repeat_count: int,
                    *, shuffle: bool, seed: int) -> IterableDataset:
    """:class:`RepeatSampler`'s order on a stream (an ``IterableDataset`` cannot be indexed): rows in chunks of
    ``batch_size`` prompts (an incomplete last chunk dropped), each chunk ``repeat_count`` times, each row
    ``mini_repeat_count`` times in a row; ``shuffle`` is the stream's buffered shuffle with ``seed``, as TRL's."""
    source = dataset.shuffle(seed=seed) if shuffle else dataset

    def rows():
        chunk = []
        for row in source:
            chunk.append(row)
            if len(chunk) == batch_size:
                for _ in range(repeat_count):
                    for kept in chunk:
                        yield from [kept] * mini_repeat_count
                chunk = []

    return IterableDataset.from_generator(rows)


def is_streamed(dataset) -> bool:
    """``dataset`` is an ``IterableDataset``, or a dict of eval sets (an ``IterableDatasetDict``) holding one."""
    if isinstance(dataset, dict):
        return any(isinstance(value, IterableDataset) for value in dataset.values())
    return isinstance(dataset, IterableDataset)


def configure_streams(args, train_dataset, eval_dataset) -> None:
    """TRL 1.16's set-up for streamed sets, at construction: any streamed set (train or eval) needs
    ``dispatch_batches=False`` (refused when set True, forced otherwise); a streamed train set is read by one worker,
    since several would interleave the repeated stream and split the prompt groups. A streamed eval set leaves the
    workers of a map-style train set alone: its own loader takes one worker (:func:`streamed_eval_dataloader`)."""
    if not (is_streamed(train_dataset) or is_streamed(eval_dataset)):
        return
    if args.accelerator_config.dispatch_batches:
        raise ValueError(DISPATCHED_STREAM_ERROR)
    args.accelerator_config.dispatch_batches = False
    if isinstance(train_dataset, IterableDataset) and args.dataloader_num_workers:
        logger.warning("an IterableDataset needs dataloader_num_workers=0 to keep prompt groups whole; using 0 (was "
                       "%d)", args.dataloader_num_workers)
        args.dataloader_num_workers = 0


def streamed_eval_dataloader(trainer, dataset: IterableDataset, num_generations: int) -> DataLoader:
    """TRL 1.16's loader of a streamed eval set: the stream shuffled with ``args.seed`` (buffered, as TRL's; the
    map-style eval sampler shuffles too) and each prompt repeated ``num_generations`` times in a row, no sampler.
    One worker for this loader only (``args`` keeps its value; persistent workers off with it, as a DataLoader
    refuses them without workers); batches are not dispatched, even for a set first seen by ``evaluate()``."""
    args = trainer.args
    if args.accelerator_config.dispatch_batches:
        raise ValueError(DISPATCHED_STREAM_ERROR)
    trainer.accelerator.dataloader_config.dispatch_batches = False
    stream = repeated_stream(dataset, num_generations, 1, 1, shuffle=True, seed=args.seed)
    workers, persistent = args.dataloader_num_workers, args.dataloader_persistent_workers
    args.dataloader_num_workers, args.dataloader_persistent_workers = 0, False
    try:
        return trainer._get_dataloader(dataset=stream, description="Evaluation", batch_size=args.eval_batch_size)
    finally:
        args.dataloader_num_workers, args.dataloader_persistent_workers = workers, persistent


def shuffle_rows(batch: dict) -> dict:
    """Permute every ``[N, ...]`` tensor and length-N list of ``batch`` in unison (global torch RNG, as TRL's
    ``shuffle_sequence_dict``, so runs seeded alike draw alike); scalars and None pass through."""
    size = next(len(v) for v in batch.values() if isinstance(v, list) or (isinstance(v, torch.Tensor) and v.ndim))
    order = torch.randperm(size)

    def permute(value):
        if isinstance(value, torch.Tensor) and value.ndim:
            return value[order.to(value.device)]
        if isinstance(value, list):
            return [value[i] for i in order.tolist()]
        return value

    return {key: permute(value) for key, value in batch.items()}


def split_rows(batch: dict, num_chunks: int) -> list[dict]:
    """``batch`` cut into ``num_chunks`` equal micro-batches along rows (scalars are shared by all)."""
    size = next(len(v) for v in batch.values() if isinstance(v, list) or (isinstance(v, torch.Tensor) and v.ndim))
    step = size // num_chunks
    return [{key: value[i * step:(i + 1) * step] if isinstance(value, list) or (isinstance(value, torch.Tensor)
                                                                               and value.ndim) else value
             for key, value in batch.items()} for i in range(num_chunks)]


def nanstd(x: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std of the non-NaN entries (NaN when fewer than two), TRL's ``nanstd``."""
    values = x[~x.isnan()]
    return values.std() if values.numel() > 1 else x.new_tensor(math.nan)


def zero_std_groups(rewards_N: torch.Tensor, num_generations: int) -> torch.Tensor:
    """``[N]`` bool: the completion's group has every scorable reward equal (no learning signal; TRL's
    ``frac_reward_zero_std`` counts these rows). A group with fewer than two scorable rewards has an undefined std
    and does not count, as in TRL."""
    grouped_PG = rewards_N.view(-1, num_generations)
    missing = grouped_PG.isnan()
    high = torch.where(missing, -math.inf, grouped_PG).amax(1)
    low = torch.where(missing, math.inf, grouped_PG).amin(1)
    scorable = (~missing).sum(1)
    zero_P = (scorable >= 2) & torch.isclose(high, low)
    return zero_P.repeat_interleave(num_generations)


def _cell(value) -> str:
    """A table cell: a chat message list as ``ROLE`` lines followed by the content, a float to 3 decimals."""
    if isinstance(value, list) and all(isinstance(message, dict) for message in value):
        return "\n\n".join(f"{str(m.get('role', '')).upper()}\n{m.get('content', '')}" for m in value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def completion_table(logs: dict, num_samples: int | None = None, unique_prompts: bool = False
                     ) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of the completions table from TRL's ``_logs`` (``grpo_scoring.completion_logs``): prompt,
    completion, one column per reward function, advantage, then the ``log_extra`` columns (TRL's order); the first
    ``num_samples`` rows (all when None); ``unique_prompts`` (TRL's ``log_unique_prompts``): only the first row of
    each prompt (compared by its text, as prompts may be chat message lists)."""
    columns = {"prompt": logs["prompt"], "completion": logs["completion"], **logs["rewards"],
               "advantage": logs["advantages"], **logs["extra"]}
    indices = range(len(logs["prompt"]))
    if unique_prompts:
        first = {}
        for i in indices:
            first.setdefault(str(logs["prompt"][i]), i)
        indices = sorted(first.values())
    indices = list(indices)[:num_samples]
    rows = [[_cell(values[i]) if i < len(values) else "" for values in columns.values()] for i in indices]
    return list(columns), rows


def print_completions(logs: dict, step: int, num_samples: int | None = None, unique_prompts: bool = False) -> None:
    """A rich table of :func:`completion_table` (``log_completions=True``)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    header, rows = completion_table(logs, num_samples, unique_prompts)
    table = Table(title=f"completions at step {step}", show_lines=True)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: brackets in a completion are not rich markup
    Console().print(table)
