"""Input checks shared by the public ops: every error names the argument and says what would be accepted."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, tensor: torch.Tensor, *, min_dim: int = 1) -> None:
    if not isinstance(tensor, torch.Tensor):
        # The API promises ValueError for every bad input, type errors included.
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")  # noqa: TRY004
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if tensor.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)}); pass at least one token")


def check_labels(labels: torch.Tensor, expected_shape: torch.Size, device: torch.device, *, against: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an int64 (or int32) tensor, got {got}")
    if labels.shape != expected_shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal {against} without its last dim {tuple(expected_shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but {against.split('.')[0]} is on {device}; move them together")


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Data-dependent (one host sync); skipped while torch.compile traces, where it would break the graph."""
    if torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {first} "
            f"(set ignore_index to the padding label, or fix the tokenizer/vocabulary size)"
        )


def check_temperature(temperature: float) -> None:
    # A chained comparison rejects NaN, inf and <= 0 alike, and Dynamo folds it (math.isfinite breaks the graph).
    if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_softcap(softcap: float | None) -> None:
    """``softcap``: None or 0 (no cap), else a finite number > 0 (Gemma 2's ``final_logit_softcapping`` is 30)."""
    # Chained comparisons, as check_temperature: they reject NaN, inf and < 0 alike and Dynamo folds them.
    if softcap is not None and (not isinstance(softcap, (int, float)) or not 0 <= softcap < math.inf):
        raise ValueError(f"softcap must be None, 0 (no cap) or a finite number > 0, got {softcap!r}")
