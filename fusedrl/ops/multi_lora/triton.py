"""Multi-LoRA as segmented Triton kernels: the Triton implementations of ``fusedrl::multi_lora``
(:func:`multi_lora_fwd`) and ``fusedrl::multi_lora_backward`` (:func:`multi_lora_bwd`), with the signatures and
results of ``compiled.py`` (whose docstring derives the gradients).

Legend: N rows, I input features, O output features, K adapters, R rank; BLOCK_R is R padded to a power of two of at
least 16 (``tl.dot``'s smallest side; the padding lanes are masked to 0); G row tiles.

Grouping (torch on the device, no host sync, :func:`group_rows`): a stable sort of the adapter ids gives ``order``,
the row indices with each adapter's rows contiguous and in their original order (base-only rows, id -1, sort first
and are never visited), each adapter's segment ``[start, end)`` of ``order``, and a tile table: tile g holds up to
BLOCK_M = 64 rows of ONE adapter, so a program multiplies by one adapter's weights. The grid has G = N // BLOCK_M + K
tiles, an upper bound of what the segments need (each adapter wastes at most one partial tile), independent of how
the rows are spread; unused tiles exit after reading their entry.

Forward, one launch per phase for all adapters:
- base: ``y = x @ weight.T + bias`` by ``F.linear`` (cuBLAS on a GPU). The base GEMM is 99% of the layer's flops
  at R = 16, I = O = 4096 (``I * O`` against ``R * (I + O)`` per row), and a Triton GEMM without autotuning would not
  beat cuBLAS; the issue's target (within 1.3x of one adapter's LoRA linear) is measured against a layer whose base
  runs there too.
- shrink, grid (G,): tile g sweeps I in BLOCK_H steps, ``acc [BLOCK_M, BLOCK_R] += x[rows, h] @ lora_A[k, :, h].T``,
  and writes ``hidden[rows] = scaling[k] * acc`` (fp32 ``[N, R]``, 0 for base-only rows; saved for the backward).
- expand, grid (G, cdiv(O, BLOCK_N)): ``y[rows, cols] += hidden[rows] @ lora_B[k, cols].T``, a read-modify-write of
  y in x's dtype (the base result and the LoRA term are summed in fp32 and rounded once).

Backward (``g = dL/dy``), the same two kernels with the other weight read transposed (strides), then one reduction:
- shrink over O: ``u = scaling[k] * g @ lora_B[k]`` (fp32 ``[N, R]``);
- ``dx = g @ weight`` by torch, then expand: ``dx[rows] += u[rows] @ lora_A[k]``;
- segmented reduction, grid (cdiv(H, BLOCK_N), K, S): program (h, k, s) sums the rows of the s-th of S equal chunks
  of adapter k's segment, ``out[k][:, h] = sum_n small[n].T big[n, h]``: ``grad_A[k] = sum u[n].T x[n]`` and
  ``grad_B[k] = sum g[n].T hidden[n]`` (stored transposed through strides). Each program accumulates its chunk in
  fp32 registers and writes its partial to an fp32 ``[S, K, ...]`` buffer that torch sums in a fixed order: no
  atomics, so the same inputs give the same bits every run, and an adapter with no rows gets exact zeros.
  S = clamp(N // (K * 1024), 1, 8) splits each adapter's rows so that a skewed or single adapter still fills the
  GPU: at N = 8192, K = 4, H = 4096 that is 32 x 4 x 2 = 256 programs (2.4 per SM of an A100), and the partials'
  sum and the cast add 576 B per row to the kernel's 10.6 KB (the AOT report's model).

All math is fp32: operands of any float dtype are cast after the load. ``tl.dot`` runs IEEE fp32 when x (so y and
dx) is fp32 (the tests compare with the fp32 reference at 1e-5) and TF32 otherwise: a bf16 or fp16 operand is exact
in TF32, and fp32 adapters, ``hidden`` and ``u`` round to TF32's 10-bit mantissa, finer than the bf16 rounding of y.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_M = 64  # rows per tile (shrink, expand) and per step of the reduction's row loop
ROWS_PER_SPLIT = 1024  # rows an adapter's reduction program sums at least, on average (sets S)
MAX_SPLIT = 8
NUM_WARPS = 4


@triton.jit
def _lora_shrink_kernel(
    in_ptr,  # [N, H] activations (x forward, dL/dy backward), any float dtype, rows contiguous
    weight_ptr,  # [K, R, H] adapter weights seen through the strides below (lora_A; lora_B transposed)
    scaling_ptr,  # [K] fp32
    order_ptr,  # [N] int32: row indices grouped by adapter (group_rows)
    tile_adapter_ptr,  # [G] int32: the adapter of each tile, -1 for an unused tile
    tile_start_ptr,  # [G] int32: the tile's first position in order
    tile_end_ptr,  # [G] int32: the end of its adapter's segment in order (later positions are masked)
    out_ptr,  # [N, R] fp32 out: scaling[k] * in[n] @ W_k.T for the rows of the tile
    num_cols,  # H, also the row stride of in
    rank,  # R, also the row stride of out
    stride_wk,  # elements between adapters of weight
    stride_wr,  # elements between rank entries
    stride_wh,  # elements between features
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    adapter = tl.load(tile_adapter_ptr + tile)
    if adapter < 0:
        return
    pos = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    row_ok = pos < tl.load(tile_end_ptr + tile)
    # int64: N * H passes 2^31 at 512K rows of 4096 features.
    rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    weight_ptr += adapter * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for start in range(0, num_cols, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        col_ok = cols < num_cols
        a = tl.load(in_ptr + rows[:, None] * num_cols + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + cols[:, None] * stride_wh + ranks[None, :] * stride_wr,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    acc *= tl.load(scaling_ptr + adapter)
    tl.store(out_ptr + rows[:, None] * rank + ranks[None, :], acc, mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _lora_expand_kernel(
    in_ptr,  # [N, R] fp32 (hidden forward, u backward), rows contiguous
    weight_ptr,  # [K, H, R] adapter weights seen through the strides below (lora_B; lora_A transposed)
    order_ptr,  # [N] int32, as the shrink kernel
    tile_adapter_ptr,  # [G] int32
    tile_start_ptr,  # [G] int32
    tile_end_ptr,  # [G] int32
    out_ptr,  # [N, H] in place (y forward, dx backward), any float dtype: out[n] += in[n] @ W_k.T
    num_cols,  # H, also the row stride of out
    rank,  # R, also the row stride of in
    stride_wk,  # elements between adapters of weight
    stride_wh,  # elements between features
    stride_wr,  # elements between rank entries
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    adapter = tl.load(tile_adapter_ptr + tile)
    if adapter < 0:
        return
    pos = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    row_ok = pos < tl.load(tile_end_ptr + tile)
    rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < num_cols
    offsets = rows[:, None] * num_cols + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    out = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    weight_ptr += adapter * stride_wk
    # The rank in chunks of 16 (one step at R <= 16): an IEEE fp32 dot over all of R = 64 at once was lowered with
    # 4.3 KB of stack per thread on sm_80 / sm_90; in chunks of 16, 8-24 bytes.
    for start in range(0, BLOCK_R, 16):
        ranks = start + tl.arange(0, 16)
        rank_ok = ranks < rank
        h = tl.load(in_ptr + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                    other=0.0)
        w = tl.load(weight_ptr + ranks[:, None] * stride_wr + cols[None, :] * stride_wh,
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        out = tl.dot(h, w, out, input_precision=DOT_PRECISION)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_grad_kernel(
    small_ptr,  # [N, R] fp32 (u for grad_A, hidden for grad_B), rows contiguous
    big_ptr,  # [N, H] any float dtype (x for grad_A, dL/dy for grad_B), rows contiguous
    order_ptr,  # [N] int32, as the shrink kernel
    seg_start_ptr,  # [K] int32: first position of each adapter's rows in order
    seg_count_ptr,  # [K] int32: its number of rows
    out_ptr,  # [S, K, ...] fp32 out: the partial sum of split s, out[s, k][r, h] through the strides below
    num_cols,  # H, also the row stride of big
    rank,  # R, also the row stride of small
    stride_split,  # elements between splits of out
    stride_ok,  # elements between adapters of out
    stride_or,  # elements between rank entries of out
    stride_oh,  # elements between features of out
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    adapter = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    col_ok = cols < num_cols
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    seg_start = tl.load(seg_start_ptr + adapter)
    count = tl.load(seg_count_ptr + adapter)
    chunk = tl.cdiv(count, num_splits)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, count)
    acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_M):
        pos = start + tl.arange(0, BLOCK_M)
        row_ok = pos < hi
        rows = tl.load(order_ptr + seg_start + pos, mask=row_ok, other=0).to(tl.int64)
        s = tl.load(small_ptr + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                    other=0.0)
        b = tl.load(big_ptr + rows[:, None] * num_cols + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(s), b, acc, input_precision=DOT_PRECISION)
    out_ptr += split * stride_split + adapter * stride_ok
    tl.store(out_ptr + ranks[:, None] * stride_or + cols[None, :] * stride_oh, acc,
             mask=rank_ok[:, None] & col_ok[None, :])


class RowGroups(NamedTuple):
    """Rows grouped by adapter (:func:`group_rows`); every tensor int32 on the rows' device."""

    order: torch.Tensor  # [N] row indices, each adapter's rows contiguous and in their original order
    seg_start: torch.Tensor  # [K] first position of adapter k's rows in order
    seg_count: torch.Tensor  # [K] its number of rows
    tile_adapter: torch.Tensor  # [G] the adapter of each tile of BLOCK_M rows, -1 when unused
    tile_start: torch.Tensor  # [G] the tile's first position in order
    tile_end: torch.Tensor  # [G] the end of its adapter's segment in order


class LaunchConfig(NamedTuple):
    block_r: int  # R padded to a power of two >= 16
    block_k: int  # features per step of the shrink's sweep
    block_n: int  # features per expand program and per reduction program
    dot_precision: str  # "ieee" or "tf32"


def launch_config(rank: int, *, exact: bool) -> LaunchConfig:
    """Block sizes for rank R (``exact``: x is fp32, IEEE dot), from AOT builds for sm_80 / sm_90
    (``fusedrl aot`` reports R = 16; R = 64 and 128 were built the same way). TF32 (bf16 / fp16 operands): 64
    features per shrink step and 128 per expand / reduction program compile to 64-140 registers per thread at
    R = 16 with no spill; 128 features halve the re-reads of the programs' ``[64, R]`` fp32 row block against 64 (on a
    GPU those mostly hit L2). Above R = 32 the blocks halve, which keeps R = 64 and 128 spill-free. IEEE fp32 dots
    are FMA loops with more live registers: the expand spilled 4.6 KB of stack per thread at 128 features, so exact
    runs take half the features (252 registers, no spill at R = 16); above R = 32 they keep 8-24 bytes of stack in the
    expand (R = 64) and spill in the reduction at R = 128 on sm_80: correct, slower."""
    block_r = max(16, triton.next_power_of_2(rank))
    small = block_r <= 32
    if exact:
        return LaunchConfig(block_r, 64 if small else 16, 64 if small else 32, "ieee")
    return LaunchConfig(block_r, 64 if small else 32, 128 if small else 64, "tf32")


def group_rows(adapter_ids: torch.Tensor, num_adapters: int) -> RowGroups:
    """The grouping of the module docstring from int64 ``[N]`` ids in ``[-1, K)``: a stable sort and a few ``[K]``
    / ``[G]`` torch ops, all on the device (no host sync), G = N // BLOCK_M + K."""
    device = adapter_ids.device
    sorted_ids, order = torch.sort(adapter_ids, stable=True)
    adapters = torch.arange(num_adapters, device=device)
    seg_start = torch.searchsorted(sorted_ids, adapters)
    seg_end = torch.searchsorted(sorted_ids, adapters, right=True)
    num_tiles = torch.div(seg_end - seg_start + BLOCK_M - 1, BLOCK_M, rounding_mode="floor")
    tiles_end = torch.cumsum(num_tiles, 0)
    tile = torch.arange(adapter_ids.numel() // BLOCK_M + num_adapters, device=device)
    owner = torch.searchsorted(tiles_end, tile, right=True)  # == K for tiles past the last segment's
    used = owner < num_adapters
    owner = owner.clamp(max=num_adapters - 1)
    tile_start = seg_start[owner] + (tile - (tiles_end[owner] - num_tiles[owner])) * BLOCK_M
    return RowGroups(
        order=order.int(), seg_start=seg_start.int(), seg_count=(seg_end - seg_start).int(),
        tile_adapter=torch.where(used, owner, -1).int(), tile_start=tile_start.int(), tile_end=seg_end[owner].int(),
    )


def _shrink(in_NH, weight, strides, scaling_K, groups: RowGroups, out_NR, config: LaunchConfig) -> None:
    """``out[rows of k] = scaling[k] * in[rows] @ W_k.T``; ``strides``: (adapter, rank, feature) of W."""
    _lora_shrink_kernel[(groups.tile_adapter.numel(),)](
        in_NH, weight, scaling_K, groups.order, groups.tile_adapter, groups.tile_start, groups.tile_end, out_NR,
        in_NH.shape[1], out_NR.shape[1], *strides,
        BLOCK_M=BLOCK_M, BLOCK_H=config.block_k, BLOCK_R=config.block_r, DOT_PRECISION=config.dot_precision,
        num_warps=NUM_WARPS,
    )


def _expand(in_NR, weight, strides, groups: RowGroups, out_NH, config: LaunchConfig) -> None:
    """``out[rows of k] += in[rows] @ W_k.T`` in place; ``strides``: (adapter, feature, rank) of W."""
    grid = (groups.tile_adapter.numel(), triton.cdiv(out_NH.shape[1], config.block_n))
    _lora_expand_kernel[grid](
        in_NR, weight, groups.order, groups.tile_adapter, groups.tile_start, groups.tile_end, out_NH,
        out_NH.shape[1], in_NR.shape[1], *strides,
        BLOCK_M=BLOCK_M, BLOCK_N=config.block_n, BLOCK_R=config.block_r, DOT_PRECISION=config.dot_precision,
        num_warps=NUM_WARPS,
    )


def num_splits(num_rows: int, num_adapters: int) -> int:
    """S of the reduction (module docstring); read at each call, so a test can lower ROWS_PER_SPLIT."""
    return max(1, min(MAX_SPLIT, num_rows // (num_adapters * ROWS_PER_SPLIT)))


def _segment_sum(small_NR, big_NH, groups: RowGroups, shape, strides, config: LaunchConfig) -> torch.Tensor:
    """fp32 ``out[k][r, h] = sum over adapter k's rows of small[n, r] * big[n, h]``, laid out as ``shape`` (K first)
    with (rank, feature) ``strides``."""
    num_adapters = groups.seg_start.numel()
    splits = num_splits(small_NR.shape[0], num_adapters)
    partial = small_NR.new_empty((splits, *shape), dtype=torch.float32)
    grid = (triton.cdiv(big_NH.shape[1], config.block_n), num_adapters, splits)
    _lora_grad_kernel[grid](
        small_NR, big_NH, groups.order, groups.seg_start, groups.seg_count, partial, big_NH.shape[1],
        small_NR.shape[1], partial.stride(0), partial.stride(1), *strides,
        BLOCK_M=BLOCK_M, BLOCK_H=config.block_n, BLOCK_R=config.block_r, DOT_PRECISION=config.dot_precision,
        num_warps=NUM_WARPS,
    )
    return partial[0] if splits == 1 else partial.sum(0)


def multi_lora_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: torch.Tensor, adapter_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``compiled.multi_lora_fwd``: ``(y [N, O] in x's dtype, hidden [N, R] fp32)``."""
    x, lora_A, lora_B = x.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    num_adapters, rank, num_in = lora_A.shape
    num_out = lora_B.shape[1]
    config = launch_config(rank, exact=x.dtype == torch.float32)
    groups = group_rows(adapter_ids, num_adapters)
    y = F.linear(x, weight, bias).contiguous()
    hidden = x.new_zeros((x.shape[0], rank), dtype=torch.float32)
    _shrink(x, lora_A, (rank * num_in, num_in, 1), scaling.float().contiguous(), groups, hidden, config)
    _expand(hidden, lora_B, (num_out * rank, rank, 1), groups, y, config)
    return y, hidden


def multi_lora_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: torch.Tensor, adapter_ids: torch.Tensor, hidden: torch.Tensor, x_grad: bool, lora_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``compiled.multi_lora_bwd``: ``(grad x or [0], grad lora_A or [0], grad lora_B or [0])``. The grouping is
    recomputed from the ids (a sort of N ints) rather than saved: the custom op's outputs are its only state."""
    grad_y, x, lora_A, lora_B = grad_y.contiguous(), x.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    num_adapters, rank, num_in = lora_A.shape
    num_out = lora_B.shape[1]
    config = launch_config(rank, exact=x.dtype == torch.float32)
    groups = group_rows(adapter_ids, num_adapters)
    # Rows outside every segment (base only) are never read: empty, not zeros.
    u = x.new_empty((x.shape[0], rank), dtype=torch.float32)
    _shrink(grad_y, lora_B, (num_out * rank, 1, rank), scaling.float().contiguous(), groups, u, config)
    grad_x, grad_A, grad_B = x.new_empty(0), lora_A.new_empty(0), lora_B.new_empty(0)
    if x_grad:
        grad_x = (grad_y @ weight).contiguous()
        _expand(u, lora_A, (rank * num_in, 1, num_in), groups, grad_x, config)
    if lora_grad:
        grad_A = _segment_sum(u, x, groups, (num_adapters, rank, num_in), (num_in, 1), config).to(lora_A.dtype)
        grad_B = _segment_sum(hidden.contiguous(), grad_y, groups, (num_adapters, num_out, rank), (1, rank),
                              config).to(lora_B.dtype)
    return grad_x, grad_A, grad_B
