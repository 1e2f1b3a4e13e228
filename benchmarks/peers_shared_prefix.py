"""Shared-prefix attention benchmark inputs and paths, registered into ``peers.INPUTS`` / ``peers.PATHS`` under
"shared_prefix".

Legend: G prompts, K completions per prompt (N = G * K plain rows), P prompt tokens, C completion tokens, A attention
heads, D head width, S shared rows (= G), L shared positions (P + K * C, padded to 16).

One attention call of a GRPO-shaped batch in each layout, on the same random queries, keys and values per position:
- ``fusedrl``: the shared rows under fusedrl's dense bool mask (``runtime/shared_prefix/mask.py``) through SDPA, the
  mask a model gets with ``shared_prefix=True`` on this CPU;
- ``flex``: the same rows and rule as a FlexAttention ``BlockMask`` (compiled), what a GPU would run; torch 2.13 has
  no FlexAttention backward on CPU ("FlexAttention does not support backward on CPU"), so it runs only in the
  no-grad variant (a reference or old-policy pass);
- ``plain``: the N plain rows, causal (``is_causal=True``), what ``shared_prefix=False`` runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks import peers


@dataclass
class SharedPrefixInputs:
    shared_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # [S, A, L, D] each
    plain_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # [N, A, P + C, D] each
    mask_S1LL: torch.Tensor
    column_SL: torch.Tensor
    segment_SL: torch.Tensor
    key_SL: torch.Tensor
    requires_grad: bool

    def zero_grad(self) -> None:
        for tensor in (*self.shared_qkv, *self.plain_qkv):
            tensor.grad = None


def shared_prefix_inputs(shape: Mapping[str, int], dtype: torch.dtype, requires_grad: bool = True):
    from fusedrl.runtime.shared_prefix import shared_layout
    from fusedrl.runtime.shared_prefix.mask import attention_mask_4d

    G, K, P, C, A, D = (shape[key] for key in ("G", "K", "P", "C", "A", "D"))
    gen = torch.Generator().manual_seed(0)
    prompts_GP = torch.randint(3, 1000, (G, P), generator=gen)
    completions_NC = torch.randint(3, 1000, (G * K, C), generator=gen)
    input_ids_NT = torch.cat([prompts_GP.repeat_interleave(K, 0), completions_NC], dim=1)
    layout = shared_layout(input_ids_NT, torch.ones_like(input_ids_NT))
    assert layout.input_ids_SL.shape[0] == G, "each prompt's K rows must form one shared row"
    S, L = layout.input_ids_SL.shape

    def qkv(rows: int, length: int):
        return tuple(torch.randn(rows, A, length, D, generator=gen).to(dtype).requires_grad_(requires_grad)
                     for _ in range(3))

    return SharedPrefixInputs(
        shared_qkv=qkv(S, L), plain_qkv=qkv(G * K, P + C),
        mask_S1LL=attention_mask_4d(layout, "sdpa", dtype), column_SL=layout.column_SL,
        segment_SL=layout.segment_SL, key_SL=layout.key_SL, requires_grad=requires_grad)


def _finish(out: torch.Tensor, x: SharedPrefixInputs) -> None:
    if x.requires_grad:
        out.float().sum().backward()


def fusedrl_dense_mask(x: SharedPrefixInputs) -> None:
    """Shared rows, fusedrl's dense bool mask through SDPA."""
    with torch.set_grad_enabled(x.requires_grad):
        _finish(F.scaled_dot_product_attention(*x.shared_qkv, attn_mask=x.mask_S1LL), x)


def plain_causal(x: SharedPrefixInputs) -> None:
    """Every row whole, causal SDPA (the plain layout)."""
    with torch.set_grad_enabled(x.requires_grad):
        _finish(F.scaled_dot_product_attention(*x.plain_qkv, is_causal=True), x)


_FLEX_CACHE: dict[int, tuple] = {}


def flex_block_mask(x: SharedPrefixInputs) -> None:
    """Shared rows, the same rule as a FlexAttention BlockMask, compiled (no-grad only on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if id(x) not in _FLEX_CACHE:  # the block mask and the compiled kernel are built once, as a model would
        column_SL, segment_SL, key_SL = x.column_SL, x.segment_SL, x.key_SL

        def mask_mod(b, h, q, k):
            causal = column_SL[b, k] <= column_SL[b, q]
            same_branch = (segment_SL[b, k] == 0) | (segment_SL[b, k] == segment_SL[b, q])
            return causal & same_branch & key_SL[b, k]

        S, _, L, _ = x.shared_qkv[0].shape
        _FLEX_CACHE[id(x)] = (create_block_mask(mask_mod, S, None, L, L, device="cpu"), torch.compile(flex_attention))
    block_mask, flex = _FLEX_CACHE[id(x)]
    with torch.no_grad():
        flex(*x.shared_qkv, block_mask=block_mask)


peers.INPUTS["shared_prefix"] = shared_prefix_inputs
peers.INPUTS["shared_prefix_no_grad"] = lambda shape, dtype: shared_prefix_inputs(shape, dtype, requires_grad=False)
peers.PATHS["shared_prefix"] = {
    "fusedrl": peers.PathSpec(fusedrl_dense_mask, "shared rows, dense bool mask, SDPA (fusedrl on CPU)"),
    "plain": peers.PathSpec(plain_causal, "plain rows, causal SDPA (shared_prefix=False)"),
}
peers.PATHS["shared_prefix_no_grad"] = {
    **peers.PATHS["shared_prefix"],
    "flex": peers.PathSpec(flex_block_mask, "shared rows, FlexAttention BlockMask, compiled"),
}
