"""Packing and truncation of tokenized datasets (TRL's ``pack_dataset`` / ``truncate_dataset`` semantics).

Every column to pack is a list column (``input_ids``, ``attention_mask``, ``labels``...) whose rows have equal
lengths across columns. The work happens on Arrow tables inside a batched ``Dataset.map`` (1000 rows per batch
unless ``map_kwargs`` says otherwise), so sequences are only ever packed with others of the same batch and the
column types (int32 ids stay int32) are kept. Output equals TRL 1.16's row for row (tests/trainers/test_data.py).
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, IterableDatasetDict

STRATEGIES = ("bfd", "bfd_split", "wrapped")


def _is_list(column: pa.Array) -> bool:
    return pa.types.is_list(column.type) or pa.types.is_large_list(column.type)


def _list_columns(table: pa.Table) -> list[pa.Array]:
    """The table's columns as single arrays, checked to be list columns with the same row lengths."""
    columns = [column.chunks[0] for column in table.combine_chunks().columns]
    lengths = None
    for column in columns:
        if not _is_list(column):
            raise TypeError("Packing requires all columns to be lists of lists.")
        column_lengths = pc.list_value_length(column)
        if lengths is None:
            lengths = column_lengths
        elif not lengths.equals(column_lengths):
            raise ValueError("All columns must have values of the same length.")
    return columns


def _with_offsets(column: pa.Array, values: pa.Array, offsets: np.ndarray) -> pa.Array:
    """A list array of ``column``'s type over ``values`` split at ``offsets``."""
    return type(column).from_arrays(pa.array(offsets, type=column.offsets.type), values)


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of row indices: rows taken longest first (ties in row order), each into the open bin whose free space
    is the smallest that still fits it (ties: the bin that reached that free space first), else into a new bin.

    Bins come out in creation order, rows in each bin in insertion order. ``lengths`` must lie in [1, capacity].
    The free spaces seen so far are kept sorted (at most ``capacity`` distinct values), so each row costs one
    bisect plus a list insert/delete of at most ``capacity`` entries.
    """
    bins: list[list[int]] = []
    open_bins: dict[int, deque[int]] = {}  # free space -> bin ids in the order they reached it
    spaces: list[int] = []  # sorted keys of open_bins
    order = np.argsort(-lengths, kind="stable")
    for row in order.tolist():
        length = int(lengths[row])
        slot = bisect.bisect_left(spaces, length)
        if slot < len(spaces):
            space = spaces[slot]
            bin_id = open_bins[space].popleft()
            if not open_bins[space]:
                del open_bins[space]
                del spaces[slot]
        else:
            space, bin_id = capacity, len(bins)
            bins.append([])
        bins[bin_id].append(row)
        left = space - length
        if left > 0:
            if left not in open_bins:
                open_bins[left] = deque()
                bisect.insort(spaces, left)
            open_bins[left].append(bin_id)
    return bins


def _split_offsets(lengths: np.ndarray, seq_length: int, dtype: np.dtype) -> np.ndarray:
    """Offsets that cut each sequence into pieces of ``seq_length`` tokens, the last piece of each shorter."""
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    cuts = [start + np.arange(0, length, seq_length) for start, length in zip(starts, lengths)]
    return np.concatenate((*cuts, [lengths.sum()])).astype(dtype)


def _pack_bfd(table: pa.Table, seq_length: int, split: bool) -> pa.Table:
    """Best-fit-decreasing packing of one batch; adds ``seq_lengths`` (the lengths of the sequences in each row)."""
    columns = _list_columns(table)
    lengths = pc.list_value_length(columns[0])
    keep = pc.greater(lengths, 0)  # empty sequences are dropped
    columns = [pc.filter(column, keep) for column in columns]
    if split:
        lengths = pc.filter(lengths, keep).to_numpy()
        columns = [
            _with_offsets(c, c.flatten(), _split_offsets(lengths, seq_length, c.offsets.type.to_pandas_dtype()))
            for c in columns
        ]
    else:  # overflow tokens are dropped
        columns = [pc.list_slice(column, 0, seq_length) for column in columns]
    lengths = pc.list_value_length(columns[0])
    bins = _best_fit_decreasing(lengths.to_numpy(), seq_length)
    rows = pa.array([row for members in bins for row in members], type=pa.int64())
    row_lengths = pc.take(lengths, rows)
    bin_offsets = np.cumsum([0, *(len(members) for members in bins)])
    # A packed row ends where the token count of its last member ends.
    token_offsets = np.concatenate(([0], np.cumsum(row_lengths.to_numpy())))[bin_offsets]
    packed = [
        _with_offsets(c, pc.take(c, rows).flatten(), token_offsets.astype(c.offsets.type.to_pandas_dtype()))
        for c in columns
    ]
    seq_lengths = pa.ListArray.from_arrays(pa.array(bin_offsets, type=pa.int32()), row_lengths)
    return pa.Table.from_arrays([*packed, seq_lengths], names=[*table.column_names, "seq_lengths"])


def _pack_wrapped(table: pa.Table, seq_length: int) -> pa.Table:
    """Concatenate the batch's sequences and cut every ``seq_length`` tokens (the last row may be shorter)."""
    columns = _list_columns(table)
    packed = []
    for column in columns:
        values = column.flatten()  # not .values: that ignores the slice offset of every batch after the first
        offsets = np.append(np.arange(0, len(values), seq_length), len(values))
        packed.append(_with_offsets(column, values, offsets.astype(column.offsets.type.to_pandas_dtype())))
    return pa.Table.from_arrays(packed, names=table.column_names)


def _format_of(dataset: Any) -> dict[str, Any]:
    """``dataset``'s output format as ``with_format`` keyword arguments, to restore after the Arrow-format map."""
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        dataset = dataset[next(iter(dataset))]  # the first split's format stands for all
    if isinstance(dataset, Dataset):
        format_ = dict(dataset.format)
    else:  # IterableDataset
        format_ = {"type": dataset._formatting.format_type if dataset._formatting is not None else None}
    format_.update(format_.pop("format_kwargs", {}))
    return format_


def pack_dataset(dataset: Any, seq_length: int, strategy: str = "bfd", map_kwargs: dict[str, Any] | None = None) -> Any:
    """Pack a tokenized dataset's sequences into rows of at most ``seq_length`` tokens.

    Strategies (TRL's):

    - ``"bfd"``: best fit decreasing; sequences stay whole (longer ones are truncated to ``seq_length``) and each
      row gets ``seq_lengths``, the lengths of the sequences it holds, from which the collator builds position ids
      that restart at 0 per sequence (``position_ids_from_seq_lengths``);
    - ``"bfd_split"``: as ``"bfd"``, but a sequence longer than ``seq_length`` is cut into pieces that are packed
      separately (no tokens lost);
    - ``"wrapped"``: concatenate and cut every ``seq_length`` tokens, ignoring sequence boundaries.

    Empty sequences are dropped by the BFD strategies. ``map_kwargs`` go to ``Dataset.map`` (``batch_size``,
    ``num_proc``...). The dataset's output format is restored, with ``seq_lengths`` added to its columns.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Invalid packing strategy '{strategy}', must be one of {STRATEGIES}.")
    format_ = _format_of(dataset)
    if strategy == "wrapped":
        fn, fn_kwargs = _pack_wrapped, {"seq_length": seq_length}
    else:
        fn, fn_kwargs = _pack_bfd, {"seq_length": seq_length, "split": strategy == "bfd_split"}
        if "columns" in format_ and format_["columns"] is not None:
            format_["columns"] = [*format_["columns"], "seq_lengths"]
    dataset = dataset.with_format("arrow").map(fn, batched=True, fn_kwargs=fn_kwargs, **(map_kwargs or {}))
    return dataset.with_format(**format_)


def truncate_dataset(dataset: Any, max_length: int, map_kwargs: dict[str, Any] | None = None) -> Any:
    """Keep the first ``max_length`` items of every list column (other columns untouched); TRL's
    ``trl.experimental.utils.truncate_dataset``."""

    def truncate(table: pa.Table) -> pa.Table:
        columns = [pc.list_slice(c, 0, max_length) if _is_list(c) else c for c in table.columns]
        return pa.Table.from_arrays(columns, names=table.column_names)

    format_ = _format_of(dataset)
    dataset = dataset.with_format("arrow").map(truncate, batched=True, **(map_kwargs or {}))
    return dataset.with_format(**format_)


def position_ids_from_seq_lengths(seq_lengths: list[int]) -> list[int]:
    """Position ids of one packed row: 0, 1, ... restarting at every sequence (``[3, 2]`` -> ``[0, 1, 2, 0, 1]``),
    as TRL's SFT collator builds them from a row's ``seq_lengths``."""
    return [position for length in seq_lengths for position in range(length)]
