"""Shared-prefix forwards: each prompt goes through the trunk once per forward, not once per completion.

A DPO batch ``[chosen; rejected]`` carries every prompt twice, a GRPO batch G times. ``PrefixSharing.forward`` lays
rows that start alike out as one row (the common prefix once, then each row's remainder: ``layout.py``), masks
attention so a remainder sees the prefix and itself, never a sibling (``mask.py``), keeps each position's plain
position id, and gathers the final hidden states back into the plain ``[N, T, H]`` layout. They equal the plain
forward's up to fp32 summation order, so the fused head and every loss downstream run unchanged. Exact only for
models whose layers are full causal attention plus per-token layers (``support.py``); the others keep the plain
layout, with the reason logged once.
"""

from fusedrl.runtime.shared_prefix.layout import SharedLayout, attention_cost, shared_layout
from fusedrl.runtime.shared_prefix.mask import attention_mask_4d, visible_SLL
from fusedrl.runtime.shared_prefix.sharing import PrefixSharing
from fusedrl.runtime.shared_prefix.support import SUPPORTED_MODEL_TYPES, unsupported_reason

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "PrefixSharing",
    "SharedLayout",
    "attention_cost",
    "attention_mask_4d",
    "shared_layout",
    "unsupported_reason",
    "visible_SLL",
]
