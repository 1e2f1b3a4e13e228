"""Chunk drivers shared by the compiled and Triton backends.

Legend: N tokens, H hidden, V vocabulary, C tokens of one chunk, K tokens whose label is not ignore_index.

The drivers take a backend's row functions (``compiled.rows_fwd``/``rows_bwd`` or ``triton.rows_fwd``/``rows_bwd``,
same arguments and results) as arguments, so both backends run the same chunking, label compaction and matmul code;
``fused.entry_points`` wraps the drivers into the entry points of the custom ops, once for each backend. The
``linear_logprobs_*`` drivers hand the soft cap (``softcap``, 0 for none) to the row functions, which cap each tile.

``linear_logprobs_*`` never hold ``[N, V]`` logits: each chunk of C tokens holds one ``[C, V]`` tile. Only the K
tokens with a label take part (prompt and padding positions are dropped before any matmul; in preference and RL
batches they are often half the tokens). The backward recomputes each tile: for per-token outputs the upstream
gradient is unknown in forward, so the weight gradient ``sum_i g_i dlogits_i^T h_i`` cannot be formed early; that
costs four ``C x V x H`` matmuls per chunk (forward, recompute, grad hidden, grad weight) against three for a bare
``hidden @ weight.T`` forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# The row functions' trailing float is the soft cap (0: none), positional so that a test's spy taking *args sees it.
RowsFwd = Callable[[torch.Tensor, torch.Tensor, float, int, bool, float],
                   tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
RowsBwd = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, float, int,
     float],
    torch.Tensor,
]


# Rows per chunk so that one fp32 [C, V] tile stays near 32 MiB: at V=32000 that is 256 tokens. Measured on the
# 2-core CPU (N=4096, H=1024, V=32000): chunks of 256..2048 tokens run the matmuls within 10% of each other, and
# the tile plus its gradient are the only vocabulary-sized buffers alive, which bounds peak memory.
_TILE_BYTES = 32 * 2**20


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk at vocabulary size V: a power of two, so that typical token counts split into equal chunks
    and the compiled kernels see one shape."""
    return max(16, 1 << (_TILE_BYTES // (4 * vocab_size)).bit_length() - 1)


def _chunks(total: int, size: int) -> range:
    return range(0, total, max(1, size))


def logprobs_fwd(
    logits_NV: torch.Tensor,
    labels_N: torch.Tensor,
    *,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    rows_fwd: RowsFwd,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(logprobs_N, entropy_N, lse_N)`` over given logits, :func:`chunk_tokens` rows at a time."""
    size = chunk_tokens(logits_NV.shape[-1])
    outs = [
        rows_fwd(logits_NV[s : s + size], labels_N[s : s + size], inv_temperature, ignore_index, with_entropy)
        for s in _chunks(logits_NV.shape[0], size)
    ]
    if len(outs) == 1:
        return outs[0]
    logprobs, entropy, lse = (torch.cat(parts) for parts in zip(*outs))
    return logprobs, entropy, lse


def logprobs_bwd(
    grad_logprobs_N: torch.Tensor | None,
    grad_entropy_N: torch.Tensor | None,
    logits_NV: torch.Tensor,
    labels_N: torch.Tensor,
    lse_N: torch.Tensor,
    entropy_N: torch.Tensor,
    *,
    inv_temperature: float,
    ignore_index: int,
    rows_bwd: RowsBwd,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits_NV`` in its dtype."""
    grad_NV = torch.empty_like(logits_NV)
    size = chunk_tokens(logits_NV.shape[-1])
    for s in _chunks(logits_NV.shape[0], size):
        e = s + size
        grad_NV[s:e] = rows_bwd(
            logits_NV[s:e], labels_N[s:e], lse_N[s:e], entropy_N[s:e],
            None if grad_logprobs_N is None else grad_logprobs_N[s:e],
            None if grad_entropy_N is None else grad_entropy_N[s:e],
            inv_temperature, ignore_index,
        )
    return grad_NV


def _labelled(labels_N: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices ``[K]`` of tokens with a label, or None when every token has one (no gather needed)."""
    valid_N = labels_N != ignore_index
    if bool(valid_N.all()):
        return None
    return valid_N.nonzero().squeeze(1)


def _logits_tile(hidden_CH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None) -> torch.Tensor:
    if bias_V is None:
        return hidden_CH @ weight_VH.T
    return torch.addmm(bias_V, hidden_CH, weight_VH.T)


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` kept in fp32 even when ``a``/``b`` are bf16/fp16."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


def linear_logprobs_fwd(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    labels_N: torch.Tensor,
    *,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    softcap: float,
    rows_fwd: RowsFwd,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(logprobs_N, entropy_N, lse_N)`` of ``hidden_NH @ weight_VH.T (+ bias_V)``, soft-capped by
    ``softcap`` > 0."""
    N = hidden_NH.shape[0]
    size = chunk_tokens(weight_VH.shape[0])
    logprobs_N = hidden_NH.new_zeros(N, dtype=torch.float32)
    entropy_N = torch.zeros_like(logprobs_N)
    lse_N = torch.zeros_like(logprobs_N)
    index_K = _labelled(labels_N, ignore_index)
    hidden_KH = hidden_NH if index_K is None else hidden_NH.index_select(0, index_K)
    labels_K = labels_N if index_K is None else labels_N.index_select(0, index_K)
    outs_K = [torch.empty(labels_K.shape[0], dtype=torch.float32, device=hidden_NH.device) for _ in range(3)]
    for s in _chunks(labels_K.shape[0], size):
        e = s + size
        logits_CV = _logits_tile(hidden_KH[s:e], weight_VH, bias_V)
        for out_K, part_C in zip(outs_K, rows_fwd(logits_CV, labels_K[s:e], inv_temperature, ignore_index,
                                                    with_entropy, softcap)):
            out_K[s:e] = part_C
        # Free this tile before the next one is allocated: otherwise two [C, V] tiles are alive at once.
        del logits_CV
    for out_N, out_K in zip((logprobs_N, entropy_N, lse_N), outs_K):
        if index_K is None:
            out_N.copy_(out_K)
        else:
            out_N.index_copy_(0, index_K, out_K)
    return logprobs_N, entropy_N, lse_N


def linear_logprobs_bwd(
    grad_logprobs_N: torch.Tensor | None,
    grad_entropy_N: torch.Tensor | None,
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    labels_N: torch.Tensor,
    lse_N: torch.Tensor,
    entropy_N: torch.Tensor,
    *,
    inv_temperature: float,
    ignore_index: int,
    softcap: float,
    needs_input_grad: Sequence[bool],
    rows_bwd: RowsBwd,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for hidden, weight and bias in their input dtypes; ``needs_input_grad`` says which of the three to
    compute, and one not needed (or the bias gradient without a bias) is an empty tensor, since a custom op cannot
    return None."""
    needs_hidden_grad, needs_weight_grad, needs_bias_grad = needs_input_grad
    needs_bias_grad = needs_bias_grad and bias_V is not None
    size = chunk_tokens(weight_VH.shape[0])
    index_K = _labelled(labels_N, ignore_index)

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or index_K is None else t.index_select(0, index_K)

    hidden_KH, labels_K, lse_K, entropy_K = pick(hidden_NH), pick(labels_N), pick(lse_N), pick(entropy_N)
    grad_logprobs_K, grad_entropy_K = pick(grad_logprobs_N), pick(grad_entropy_N)
    grad_hidden_KH = torch.empty_like(hidden_KH) if needs_hidden_grad else None
    # Accumulated over chunks: fp32 so that bf16 weights do not lose the small per-chunk contributions.
    grad_weight_VH = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if needs_weight_grad else None
    grad_bias_V = torch.zeros(weight_VH.shape[0], dtype=torch.float32, device=weight_VH.device) if needs_bias_grad else None
    for s in _chunks(labels_K.shape[0], size):
        e = s + size
        hidden_CH = hidden_KH[s:e]
        grad_CV = rows_bwd(
            _logits_tile(hidden_CH, weight_VH, bias_V), labels_K[s:e], lse_K[s:e], entropy_K[s:e],
            None if grad_logprobs_K is None else grad_logprobs_K[s:e],
            None if grad_entropy_K is None else grad_entropy_K[s:e],
            inv_temperature, ignore_index, softcap,
        )
        if grad_hidden_KH is not None:
            torch.mm(grad_CV, weight_VH.to(grad_CV.dtype), out=grad_hidden_KH[s:e])
        if grad_weight_VH is not None:
            _add_matmul(grad_weight_VH, grad_CV.T, hidden_CH)
        if grad_bias_V is not None:
            grad_bias_V.add_(grad_CV.sum(0, dtype=torch.float32))
        del grad_CV  # as in the forward: one [C, V] gradient tile alive at a time
    # A gradient that is not needed is an empty tensor, a fresh one each: custom-op outputs must not alias.
    if grad_hidden_KH is None:
        grad_hidden_NH = hidden_NH.new_empty(0)
    elif index_K is None:
        grad_hidden_NH = grad_hidden_KH
    else:
        grad_hidden_NH = torch.zeros_like(hidden_NH).index_copy_(0, index_K, grad_hidden_KH)
    return (
        grad_hidden_NH,
        hidden_NH.new_empty(0) if grad_weight_VH is None else grad_weight_VH.to(weight_VH.dtype),
        hidden_NH.new_empty(0) if grad_bias_V is None else grad_bias_V.to(bias_V.dtype),
    )
