"""Batch plumbing of the sampling trainers (GRPO, RLOO): TRL's prompt-repeating sampler, the split of one
generation round into micro-batches, and NaN-aware statistics for reward metrics.

Legend: N completions, G completions per prompt, P prompts (N = P * G).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
from datasets import IterableDataset
from torch.utils.data import Sampler


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


def print_completions(rows: list[tuple[str, str, float, float]], step: int) -> None:
    """A rich table of ``(prompt, completion, reward, advantage)`` rows (``log_completions=True``)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"completions at step {step}", show_lines=True)
    for column in ("prompt", "completion", "reward", "advantage"):
        table.add_column(column)
    for prompt, completion, reward, advantage in rows:
        table.add_row(prompt, completion, f"{reward:.3f}", f"{advantage:.3f}")
    Console().print(table)
