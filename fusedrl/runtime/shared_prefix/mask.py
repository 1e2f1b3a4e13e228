"""The attention mask of a shared-prefix layout, in the form the model's attention implementation takes.

Legend: S shared rows, L shared positions.

A query sees a key when the key is a real token (plain attention mask 1), comes no later in the plain row
(``column``), and lies in the prefix or in the query's own segment: a completion sees the prompt and itself, never a
sibling. transformers passes a 4D mask through untouched (``masking_utils._preprocess_mask_arguments``), so the
model's own mask construction is skipped:

- ``sdpa``: a bool ``[S, 1, L, L]`` mask (True = attend), the form ``sdpa_mask`` builds. A query row with no visible
  key (shared-row padding) gets zeros from torch's SDPA (checked on torch 2.13), never NaN.
- ``eager``: the same mask as an additive float mask (0 or the dtype's minimum), the form ``eager_mask`` builds.

A dense mask makes attention pay for the masked sibling pairs too (``layout.attention_cost`` accounts for it). On a
GPU, FlexAttention with a ``BlockMask`` built from the same rule would skip whole sibling blocks, and the
flash-attention kernels behind ``is_causal`` cannot take this mask at all. On this CPU the dense SDPA mask is the
one that trains: torch 2.13 has no FlexAttention backward on CPU; its forward is 1.5x faster than the dense mask's
(4.6 vs 7.0 ms, ``benchmarks`` case ``shared_prefix_attention.no_grad``).
"""

from __future__ import annotations

import torch

from fusedrl.runtime.shared_prefix.layout import SharedLayout

MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def visible_SLL(layout: SharedLayout) -> torch.Tensor:
    """``[S, L, L]`` bool: query ``q`` of shared row ``s`` may attend to key ``k``."""
    column_SL, segment_SL = layout.column_SL, layout.segment_SL
    causal = column_SL[:, None, :] <= column_SL[:, :, None]
    same_branch = (segment_SL[:, None, :] == 0) | (segment_SL[:, None, :] == segment_SL[:, :, None])
    return causal & same_branch & layout.key_SL[:, None, :]


def attention_mask_4d(layout: SharedLayout, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The ``[S, 1, L, L]`` mask for ``implementation`` (``MASK_IMPLEMENTATIONS``); ``dtype``: the model's."""
    visible = visible_SLL(layout)[:, None]
    if implementation == "sdpa":
        return visible
    if implementation == "eager":
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min)
    raise ValueError(f"attention implementation {implementation!r} cannot take a shared-prefix mask; use one of "
                     f"{MASK_IMPLEMENTATIONS} (attn_implementation=...) or set shared_prefix=False")
