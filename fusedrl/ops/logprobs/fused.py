"""The fused LM head + loss driver: every logits tile computed once, for losses whose gradient w.r.t. a token's
log-prob is known as soon as the tokens of its group (a pair, a sequence) are done.

Legend: K labelled tokens (ordered by group), G groups, C tokens of one tile, V vocabulary, H hidden.

The per-token op (``chunked.py``) pays four ``C x V x H`` matmuls per tile because its upstream gradient arrives only
in the backward: forward, then recompute, grad_hidden and grad_weight. A loss that is a sum of per-group terms (the
DPO family per pair, ORPO/CPO/KTO per sequence, GRPO/RLOO/PPO per row with a known normaliser) knows
``d loss / d logp`` of a group's tokens once that group's row statistics exist. So, per chunk of whole groups:

1. for each tile of ``chunk_tokens(V)`` tokens: ``logits = h W^T (+ b)`` (pass 1), the row statistics (``rows_fwd``:
   logp, entropy, lse) and, if asked, the metrics (``rows_stats``: top-1 flag, ``log sum_v p_v^2``); the tile is kept;
2. the caller's ``loss_fn`` turns the chunk's statistics into its loss terms and ``d loss / d logp`` per token;
3. for each kept tile: ``rows_bwd`` -> gradient tile; ``grad_hidden = grad W`` (pass 2); ``grad_weight += grad^T h``
   (pass 3, fp32 accumulation), then the tile is freed.
The caller returns the ``[K, H]`` / ``[V, H]`` / ``[V]`` gradients from its forward and its backward only scales them
by the incoming gradient: 3 passes, the floor of a bare ``hidden @ weight.T`` forward and backward.

Memory/compute trade-off: a chunk's tiles are all alive between steps 1 and 3, so chunks are cut at group boundaries
to hold at most :func:`keep_bytes` of logits (the size of the fp32 ``[V, H]`` weight gradient, between 64 and
256 MiB: 1024 tokens at V = 32000, H = 1024 in fp32, 2048 in bf16), against one 32 MiB tile for the per-token op; the
``[V, H]`` fp32 weight gradient lives from the forward to the backward (the per-token op allocates it in the
backward). A single group larger than the budget (say a pair of 2 x 2048-token completions at V = 152k) keeps its first tiles up to the budget and recomputes the others in step 3: one more pass
over those tokens only, which is the per-token op's cost for them; logged once per process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch._subclasses.functional_tensor import FunctionalTensor

from fusedrl.ops.logprobs import chunked
from fusedrl.ops.logprobs.chunked import RowsBwd, RowsFwd, _add_matmul, _logits_tile, chunk_tokens

logger = logging.getLogger("fusedrl")

# Logits bytes a chunk may keep alive between its forward and its backward-in-forward (module docstring): at most
# KEEP_BYTES, and no more than the fp32 [V, H] weight gradient (with MIN_KEEP_BYTES as the floor), so the kept tiles
# never outweigh the gradient every path holds. Measured on the DPO op case (8 pairs x 512 tokens, H 1024, V 32000):
# a flat 256 MiB made the fused path's peak 471 MB against 219 MB for the per-token op and 536 MB for Liger's.
# Read at every call, so a test can lower KEEP_BYTES to exercise the recompute path.
KEEP_BYTES = 256 * 2**20
MIN_KEEP_BYTES = 64 * 2**20


def keep_bytes(weight_VH: torch.Tensor) -> int:
    """The tile budget for this head: ``min(KEEP_BYTES, max(MIN_KEEP_BYTES, 4 V H))`` bytes."""
    return min(KEEP_BYTES, max(MIN_KEEP_BYTES, 4 * weight_VH.numel()))

RowsStats = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor]]
_logged_recompute: set[str] = set()


class RowFunctions(NamedTuple):
    """One backend's row functions (``compiled.py`` or ``triton.py``): ``rows_fwd``, ``rows_bwd``, ``rows_stats``."""

    fwd: RowsFwd
    bwd: RowsBwd
    stats: RowsStats


class Chunk(NamedTuple):
    """What ``loss_fn`` sees of one chunk: tokens ``[start, end)`` of the K ordered tokens, the whole groups
    ``[first_group, end_group)``, and their fp32 ``[C]`` statistics (``log_sum_sq_probs`` None unless asked)."""

    start: int
    end: int
    first_group: int
    end_group: int
    logprobs: torch.Tensor
    entropy: torch.Tensor
    log_sum_sq_probs: torch.Tensor | None


# loss_fn(chunk) -> (d loss / d logp, d loss / d entropy or None), fp32 [end - start] each.
LossFn = Callable[[Chunk], tuple[torch.Tensor, torch.Tensor | None]]


class FusedHead(NamedTuple):
    """fp32 ``[K]`` statistics in the tokens' order (``lse``: the backward's; ``is_top1`` bool and
    ``log_sum_sq_probs`` None unless asked);
    gradients None where not asked: ``grad_hidden_KH`` in the hidden dtype, ``grad_weight_VH`` / ``grad_bias_V``
    accumulated in fp32."""

    logprobs_K: torch.Tensor
    entropy_K: torch.Tensor
    lse_K: torch.Tensor
    is_top1_K: torch.Tensor | None
    log_sum_sq_probs_K: torch.Tensor | None
    grad_hidden_KH: torch.Tensor | None
    grad_weight_VH: torch.Tensor | None
    grad_bias_V: torch.Tensor | None


def chunk_groups(group_ends: Sequence[int], max_tokens: int) -> list[tuple[int, int, int, int]]:
    """``(first_group, end_group, start, end)`` of consecutive whole groups holding at most ``max_tokens`` tokens
    each (a group larger than that alone; groups without tokens ride along, so every group is in a chunk).
    ``group_ends``: cumulative token counts, one per group."""
    chunks, first, start = [], 0, 0
    for group, end in enumerate(group_ends):
        if end - start > max_tokens and group > first:
            chunks.append((first, group, start, group_ends[group - 1]))
            first, start = group, group_ends[group - 1]
    if first < len(group_ends):  # the last groups, even without a token: their losses are still terms of the loss
        chunks.append((first, len(group_ends), start, group_ends[-1]))
    return chunks


def _log_recompute(reason: str) -> None:
    if reason not in _logged_recompute:
        _logged_recompute.add(reason)
        logger.warning("fusedrl: %s; its tiles beyond the budget are recomputed in the fused head's backward (one "
                       "more head pass over those tokens)", reason)


def fused_head(
    hidden_KH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    labels_K: torch.Tensor,
    group_ends: Sequence[int],
    loss_fn: LossFn,
    *,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    with_stats: bool,
    needs_input_grad: Sequence[bool],
    rows: RowFunctions,
    softcap: float,
) -> FusedHead:
    """Steps 1-3 of the module docstring over the labelled tokens ``hidden_KH`` / ``labels_K`` (already compacted and
    ordered so that each group's tokens are contiguous; ``group_ends[g]`` is the end of group g). ``loss_fn`` runs
    once per chunk, in token order, whatever ``needs_input_grad`` (hidden, weight, bias) says; with no gradient asked
    no tile is kept and step 3 is skipped. ``softcap`` > 0: the row functions cap each tile (kept uncapped: the
    backward recomputes the cap and its slope from it)."""
    num_tokens, num_vocab = labels_K.shape[0], weight_VH.shape[0]
    needs_hidden, needs_weight, needs_bias = needs_input_grad
    needs_bias = needs_bias and bias_V is not None
    any_grad = needs_hidden or needs_weight or needs_bias
    device = hidden_KH.device
    logprobs_K = torch.zeros(num_tokens, dtype=torch.float32, device=device)
    entropy_K, lse_K = torch.zeros_like(logprobs_K), torch.zeros_like(logprobs_K)
    is_top1_K = torch.zeros(num_tokens, dtype=torch.bool, device=device) if with_stats else None
    log_sum_sq_K = torch.zeros_like(logprobs_K) if with_stats else None
    grad_hidden_KH = torch.empty_like(hidden_KH) if needs_hidden else None
    grad_weight_VH = torch.zeros(weight_VH.shape, dtype=torch.float32, device=device) if needs_weight else None
    grad_bias_V = torch.zeros(num_vocab, dtype=torch.float32, device=device) if needs_bias else None

    tile = chunk_tokens(num_vocab)
    tile_bytes_per_token = num_vocab * hidden_KH.element_size()  # logits come out in the hidden dtype
    budget = keep_bytes(weight_VH)
    max_tokens = max(1, budget // tile_bytes_per_token)
    for first_group, end_group, start, end in chunk_groups(group_ends, max_tokens):
        kept: list[torch.Tensor | None] = []
        for s in range(start, end, tile):
            e = min(s + tile, end)
            logits_CV = _logits_tile(hidden_KH[s:e], weight_VH, bias_V)
            logprobs_K[s:e], entropy_K[s:e], lse_K[s:e] = rows.fwd(logits_CV, labels_K[s:e], inv_temperature,
                                                                   ignore_index, with_entropy, softcap)
            if with_stats:
                is_top1_K[s:e], log_sum_sq_K[s:e] = rows.stats(logits_CV, labels_K[s:e], lse_K[s:e],
                                                               inv_temperature, softcap)
            keep = any_grad and (e - start) <= max_tokens
            kept.append(logits_CV if keep else None)
            del logits_CV
        chunk = Chunk(start, end, first_group, end_group, logprobs_K[start:end], entropy_K[start:end],
                      None if log_sum_sq_K is None else log_sum_sq_K[start:end])
        grad_logprobs_C, grad_entropy_C = loss_fn(chunk)
        if not any_grad:
            continue
        if None in kept:
            _log_recompute(f"a group (pair or sequence) of more than {max_tokens} tokens at V={num_vocab} exceeds the "
                           f"fused head's {budget / 2**20:g} MiB tile budget")
        for index, s in enumerate(range(start, end, tile)):
            e = min(s + tile, end)
            logits_CV = kept[index] if kept[index] is not None else _logits_tile(hidden_KH[s:e], weight_VH, bias_V)
            kept[index] = None  # freed as soon as its gradient is formed
            grad_CV = rows.bwd(
                logits_CV, labels_K[s:e], lse_K[s:e], entropy_K[s:e], grad_logprobs_C[s - start:e - start],
                None if grad_entropy_C is None else grad_entropy_C[s - start:e - start], inv_temperature,
                ignore_index, softcap,
            )
            del logits_CV
            if grad_hidden_KH is not None:
                torch.mm(grad_CV, weight_VH.to(grad_CV.dtype), out=grad_hidden_KH[s:e])
            if grad_weight_VH is not None:
                _add_matmul(grad_weight_VH, grad_CV.T, hidden_KH[s:e])
            if grad_bias_V is not None:
                grad_bias_V.add_(grad_CV.sum(0, dtype=torch.float32))
            del grad_CV
    return FusedHead(logprobs_K, entropy_K, lse_K, is_top1_K, log_sum_sq_K, grad_hidden_KH, grad_weight_VH,
                     grad_bias_V)


def save_head_gradients(ctx, inputs, output) -> None:
    """``setup_context`` of a fused head+loss custom op whose outputs are ``(loss, ...non-differentiable...,
    grad_hidden, grad_weight, grad_bias)``: the three gradients, formed in forward, are all the backward needs."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[-3:])


def scaled_head_gradients(ctx, grad_loss: torch.Tensor, num_inputs: int) -> tuple:
    """The backward of such an op: the saved gradients times the incoming ``grad_loss`` (gradient accumulation, loss
    scaling), ``None`` for the other ``num_inputs - 3`` inputs.

    Scaled in place: an out-of-place product would hold a second ``[V, H]`` gradient while the saved one is alive,
    +131 MB at V = 32000, H = 1024 in fp32 (measured: the DPO op's peak 471 MB vs 219 MB for the recompute path). The
    saved tensors are this op's own outputs, used by nothing else; a second backward through the same graph
    (``retain_graph=True``) raises autograd's in-place version error instead of scaling twice.
    """
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # Traced (torch.compile / AOTAutograd functionalizes the backward: FunctionalTensor), a mutation of a forward
    # output inside the backward graph is rejected by the joint-graph partitioner; the compiled graph plans its own
    # buffers there.
    traced = torch.compiler.is_compiling() or isinstance(grad_weight, FunctionalTensor)
    scale = torch.mul if traced else torch.Tensor.mul_
    return (scale(grad_hidden, grad_loss.to(grad_hidden.dtype)) if needs[0] else None,
            scale(grad_weight, grad_loss.to(grad_weight.dtype)) if needs[1] else None,
            scale(grad_bias, grad_loss.to(grad_bias.dtype)) if needs[2] and grad_bias.numel() else None,
            *([None] * (num_inputs - 3)))


def needs_gradients(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> list[bool]:
    """Which of hidden, weight and bias a fused op must form a gradient for in its forward (none under
    ``no_grad``; a frozen head, as with LoRA, skips the ``[V, H]`` weight gradient and its pass)."""
    grad_on = torch.is_grad_enabled()
    return [grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad]


class GroupLayout(NamedTuple):
    """The labelled tokens of ``[N, T]`` rows ordered group by group: ``index_K`` (flat positions in ``N * T``),
    ``row_K``, and ``group_ends`` (cumulative token counts, a Python list: the chunking is host-side)."""

    index_K: torch.Tensor
    row_K: torch.Tensor
    group_ends: list[int]


def group_layout(mask_NT: torch.Tensor, row_order_N: torch.Tensor, rows_per_group: int) -> GroupLayout:
    """Rows taken in ``row_order_N``, every ``rows_per_group`` consecutive ones a group (e.g. a pair's chosen and
    rejected rows); within a row, positions in order. One host sync (the group sizes)."""
    num_cols = mask_NT.shape[1]
    cols_T = torch.arange(num_cols, device=mask_NT.device)
    flat_NT = row_order_N.unsqueeze(1) * num_cols + cols_T
    index_K = flat_NT[mask_NT.index_select(0, row_order_N)]
    counts_G = mask_NT.sum(-1).index_select(0, row_order_N).view(-1, rows_per_group).sum(-1)
    return GroupLayout(index_K, torch.div(index_K, num_cols, rounding_mode="floor"),
                       counts_G.cumsum(0).tolist())


def scatter_rows(values_K: torch.Tensor | None, index_K: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """``values_K`` put back at their flat positions of a zero ``shape`` tensor (its dtype)."""
    if values_K is None:
        return None
    out = values_K.new_zeros(shape.numel())
    return out.index_copy_(0, index_K, values_K).view(shape)


def linear_logprobs_stats_fwd(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    labels_N: torch.Tensor,
    *,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    softcap: float,
    rows: RowFunctions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``chunked.linear_logprobs_fwd`` plus the metrics of the same tiles: fp32 ``(logprobs_N, entropy_N, lse_N,
    log_sum_sq_probs_N)`` and bool ``is_top1_N`` (in that order: ``(logprobs, entropy, lse, is_top1,
    log_sum_sq_probs)``), 0 / False where the label is ignored. One head pass, no gradient: the forward of the
    per-token op when a caller needs the metrics too (its backward is the per-token op's)."""
    index_K = (labels_N != ignore_index).nonzero().squeeze(1)
    out = fused_head(hidden_NH.index_select(0, index_K), weight_VH, bias_V, labels_N.index_select(0, index_K),
                     [index_K.shape[0]], lambda chunk: (chunk.logprobs, None), inv_temperature=inv_temperature,
                     ignore_index=ignore_index, with_entropy=with_entropy, with_stats=True,
                     needs_input_grad=(False, False, False), rows=rows, softcap=softcap)
    shape = labels_N.shape
    return (scatter_rows(out.logprobs_K, index_K, shape), scatter_rows(out.entropy_K, index_K, shape),
            scatter_rows(out.lse_K, index_K, shape), scatter_rows(out.is_top1_K, index_K, shape),
            scatter_rows(out.log_sum_sq_probs_K, index_K, shape))


class EntryPoints(NamedTuple):
    """The custom ops' entry points of one backend (see ``dispatch.define_op``: their annotated signatures are the
    schemas), all running the shared chunk drivers on that backend's row functions."""

    token_logprobs_fwd: Callable
    token_logprobs_bwd: Callable
    linear_token_logprobs_fwd: Callable
    linear_token_logprobs_bwd: Callable
    linear_token_logprobs_stats_fwd: Callable


def entry_points(rows: Callable[[], RowFunctions]) -> EntryPoints:
    """The five entry points over ``rows()``, called at every launch, so that a backend module's row functions are
    looked up when used (the fallback tests replace them with a failing launch)."""

    def token_logprobs_fwd(
        logits: torch.Tensor, labels: torch.Tensor, inv_temperature: float, ignore_index: int, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 ``(logprobs_N, entropy_N, lse_N)`` of logits ``[N, V]`` and int64 labels ``[N]``."""
        return chunked.logprobs_fwd(logits, labels, inv_temperature=inv_temperature, ignore_index=ignore_index,
                                    with_entropy=with_entropy, rows_fwd=rows().fwd)

    def token_logprobs_bwd(
        grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, logits: torch.Tensor,
        labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, inv_temperature: float, ignore_index: int,
    ) -> torch.Tensor:
        """Gradient ``[N, V]`` w.r.t. logits, in their dtype; ``lse``/``entropy`` are the forward's fp32 ``[N]``."""
        return chunked.logprobs_bwd(grad_logprobs, grad_entropy, logits, labels, lse, entropy,
                                    inv_temperature=inv_temperature, ignore_index=ignore_index, rows_bwd=rows().bwd)

    def linear_token_logprobs_fwd(
        hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
        inv_temperature: float, ignore_index: int, with_entropy: bool, softcap: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 ``(logprobs_N, entropy_N, lse_N)`` of ``hidden [N, H] @ weight [V, H].T (+ bias [V])``, soft-capped
        by ``softcap`` > 0 (0: no cap)."""
        return chunked.linear_logprobs_fwd(hidden, weight, bias, labels, inv_temperature=inv_temperature,
                                           ignore_index=ignore_index, with_entropy=with_entropy, softcap=softcap,
                                           rows_fwd=rows().fwd)

    def linear_token_logprobs_bwd(
        grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, hidden: torch.Tensor,
        weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, lse: torch.Tensor,
        entropy: torch.Tensor, inv_temperature: float, ignore_index: int, softcap: float,
        needs_input_grad: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of hidden, weight and bias in their dtypes; an empty tensor for one ``needs_input_grad``
        omits."""
        return chunked.linear_logprobs_bwd(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                                           inv_temperature=inv_temperature, ignore_index=ignore_index,
                                           softcap=softcap, needs_input_grad=needs_input_grad, rows_bwd=rows().bwd)

    def linear_token_logprobs_stats_fwd(
        hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
        inv_temperature: float, ignore_index: int, with_entropy: bool, softcap: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``linear_token_logprobs_fwd`` and, from the same tiles, bool ``is_top1_N`` and fp32
        ``log_sum_sq_probs_N``; same backward."""
        return linear_logprobs_stats_fwd(hidden, weight, bias, labels, inv_temperature=inv_temperature,
                                         ignore_index=ignore_index, with_entropy=with_entropy, softcap=softcap,
                                         rows=rows())

    return EntryPoints(token_logprobs_fwd, token_logprobs_bwd, linear_token_logprobs_fwd, linear_token_logprobs_bwd,
                       linear_token_logprobs_stats_fwd)
