"""Where every token of a padded batch goes in the shared-prefix layout, and back.

Legend: N plain rows, T plain positions, S shared rows, L shared positions, H hidden.

A plain batch ``[N, T]`` (DPO's ``[chosen; rejected]``, GRPO's G completions of each prompt) repeats each prompt in
several rows. Rows whose first positions are identical (token ids, attention mask and position ids alike) are
grouped; one shared row holds the group's common prefix once, then each member's remaining positions, one segment
per member. Positions whose attention mask is 0 are dropped (no query reads a masked key, so no kept position
changes), unless ``keep_padding``: a caller that reads the hidden states at padded positions (ORPO's per-position
logits metric) keeps them as queries that are never keys.

Grouping: each row is linked to the rows it shares its longest common prefix with, and linked rows form a group
(a DPO pair: chosen and rejected share the prompt; a GRPO group: the G completions of a prompt). A row's links depend
on its own prompt's rows, not on which other prompts share the batch, so a pair lays out the same way in any batch
(and, with rows padded to 16 positions, gives the same bits). A group of m rows with common prefix P is one row of
``sum(len) - (m - 1) * P`` positions; where that row's trunk work (attention included) is not below its rows' apart,
the rows stay apart. Hidden states at a kept position depend on the tokens, masks and position ids at and before it
only, so any grouping is exact: the grouping decides the cost, never the result.
"""

from __future__ import annotations

import dataclasses

import torch

# Shared rows are padded to a multiple of 16 positions: torch's CPU SDPA with a mask sums each query's keys in vector
# lanes, so its result at a position changes with the row length's remainder (measured: a 13-key row gave different
# bits at 13, 17 and 32 positions; at 16, 32, ... 320 the same bits). With the padding a group's hidden states do
# not depend on which other groups share its batch: a reference precomputed in batches of 3 pairs gives the bits a
# training batch of 4 pairs gives (DPO's accuracy at a zero margin is decided by those bits).
_LENGTH_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class SharedLayout:
    """The shared-prefix layout of one plain batch.

    ``input_ids_SL``, ``position_ids_SL``: the shared rows (padding at the end of short rows: token 0, position 0);
    ``column_SL``: each shared position's plain column (causal order), -1 on padding;
    ``segment_SL``: 0 for the prefix, j + 1 for the j-th member's suffix, -1 on padding;
    ``key_SL``: whether the position may be attended to (its plain attention mask);
    ``index_NT``: flat index ``s * L + l`` of each plain position in the shared rows, ``S * L`` where the position was
    dropped (gathered as zeros); ``group_N``: each plain row's shared row; ``leader_S``: each shared row's first
    plain row;
    ``plain_tokens`` / ``shared_tokens``: positions a trunk forward runs, ``N * T`` and ``S * L``;
    ``plain_cost`` / ``shared_cost``: the trunk work of each layout, attention included (``_cost``).
    """

    input_ids_SL: torch.Tensor
    position_ids_SL: torch.Tensor
    column_SL: torch.Tensor
    segment_SL: torch.Tensor
    key_SL: torch.Tensor
    index_NT: torch.Tensor
    group_N: torch.Tensor
    leader_S: torch.Tensor
    plain_tokens: int
    shared_tokens: int
    plain_cost: float
    shared_cost: float

    def gather(self, hidden_SLH: torch.Tensor) -> torch.Tensor:
        """``[N, T, H]`` plain-layout hidden states from the shared ones (zeros at dropped positions). Differentiable:
        the prefix's gradient is the sum over the members that read it."""
        num_rows, num_positions = self.index_NT.shape
        flat = hidden_SLH.reshape(-1, hidden_SLH.shape[-1])
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])
        return flat[self.index_NT.reshape(-1)].reshape(num_rows, num_positions, -1)


def _common_prefix(rows_MT: torch.Tensor, leader_T: torch.Tensor) -> torch.Tensor:
    """``[M]`` length of the prefix each row shares with ``leader`` (all features equal)."""
    equal = (rows_MT == leader_T).all(dim=-1)
    return equal.long().cumprod(dim=-1).sum(dim=-1)


def _cost(length: int, attention_cost: float) -> float:
    """Trunk work of one row of ``length`` positions, in units of one position's non-attention work: a masked dense
    attention pays every query-key pair, masked or not."""
    return length + attention_cost * length * length


def _groups(features_NTF: torch.Tensor, kept_NT: torch.Tensor, row_keys_N: torch.Tensor | None,
            attention_cost: float) -> list[list[int]]:
    """Rows linked to every row they share their longest prefix with, in connected groups (module docstring); a
    group whose shared row would cost more trunk work than its rows apart is split up. Rows with different
    ``row_keys`` (e.g. LoRA adapters) never share."""
    num_rows = features_NTF.shape[0]
    shared_NN = torch.stack([_common_prefix(features_NTF, features_NTF[row]) for row in range(num_rows)])
    shared_NN.fill_diagonal_(-1)
    if row_keys_N is not None:
        shared_NN[row_keys_N[:, None] != row_keys_N[None, :]] = -1
    longest_N = shared_NN.max(dim=1).values if num_rows > 1 else torch.zeros(num_rows, dtype=torch.long)
    links_NN = (shared_NN == longest_N[:, None]) & (longest_N[:, None] > 0)

    parent = list(range(num_rows))

    def root(row: int) -> int:
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    for row, other in links_NN.nonzero().tolist():
        parent[root(other)] = root(row)
    components: dict[int, list[int]] = {}
    for row in range(num_rows):
        components.setdefault(root(row), []).append(row)

    kept_cum_NT = kept_NT.long().cumsum(dim=-1)
    lengths = kept_cum_NT[:, -1].tolist()
    groups = []
    for members in components.values():
        prefix = int(shared_NN[members[0], members[1:]].min()) if len(members) > 1 else 0
        prefix_tokens = int(kept_cum_NT[members[0], prefix - 1]) if prefix > 0 else 0
        size = sum(lengths[m] for m in members) - (len(members) - 1) * prefix_tokens
        apart = sum(_cost(lengths[m], attention_cost) for m in members)
        if len(members) > 1 and _cost(size, attention_cost) < apart:
            groups.append(members)
        else:
            groups.extend([m] for m in members)
    return sorted(groups)


def shared_layout(input_ids_NT: torch.Tensor, attention_mask_NT: torch.Tensor,
                  position_ids_NT: torch.Tensor | None = None, *, row_keys_N: torch.Tensor | None = None,
                  keep_padding: bool = False, attention_cost: float = 0.0) -> SharedLayout:
    """The shared-prefix layout of a right- or left-padded batch (module docstring).

    input_ids_NT, attention_mask_NT: the plain batch; position_ids_NT: as the model would get them (None: 0..T-1 in
    every row, what a causal LM uses without them); row_keys_N: rows with different keys are never grouped.
    """
    num_rows, num_positions = input_ids_NT.shape
    device = input_ids_NT.device
    if position_ids_NT is None:
        position_ids_NT = torch.arange(num_positions, device=device).expand(num_rows, -1)
    mask_NT = attention_mask_NT.bool()
    features_NTF = torch.stack([input_ids_NT, mask_NT.long(), position_ids_NT.long()], dim=-1).cpu()
    kept_NT = torch.ones_like(mask_NT) if keep_padding else mask_NT
    kept_cpu = kept_NT.cpu()
    groups = _groups(features_NTF, kept_cpu, None if row_keys_N is None else row_keys_N.cpu(), attention_cost)

    # Per shared row: (plain row, plain column, segment) of each kept position, in order.
    rows_out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    group_N = torch.empty(num_rows, dtype=torch.long)
    for s, members in enumerate(groups):
        leader = members[0]
        prefix = int(_common_prefix(features_NTF[members], features_NTF[leader]).min()) if len(members) > 1 \
            else num_positions
        columns = torch.arange(num_positions)
        pieces_row, pieces_col, pieces_seg = [], [], []
        head = columns[:prefix][kept_cpu[leader, :prefix]]
        pieces_row.append(torch.full_like(head, leader))
        pieces_col.append(head)
        pieces_seg.append(torch.zeros_like(head))
        for j, member in enumerate(members):
            group_N[member] = s
            tail = columns[prefix:][kept_cpu[member, prefix:]]
            pieces_row.append(torch.full_like(tail, member))
            pieces_col.append(tail)
            pieces_seg.append(torch.full_like(tail, j + 1))
        rows_out.append((torch.cat(pieces_row), torch.cat(pieces_col), torch.cat(pieces_seg)))

    num_shared = len(groups)
    length = -(-max(len(cols) for _, cols, _ in rows_out) // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE
    plain_row_SL = torch.zeros(num_shared, length, dtype=torch.long)
    column_SL = torch.full((num_shared, length), -1, dtype=torch.long)
    segment_SL = torch.full((num_shared, length), -1, dtype=torch.long)
    index_NT = torch.full((num_rows, num_positions), num_shared * length, dtype=torch.long)
    for s, (rows, cols, segs) in enumerate(rows_out):
        n = len(cols)
        plain_row_SL[s, :n], column_SL[s, :n], segment_SL[s, :n] = rows, cols, segs
        flat = s * length + torch.arange(n)
        index_NT[rows, cols] = flat
        prefix_positions = segs == 0  # the prefix is read by every member of the group
        for member in groups[s][1:]:
            index_NT[member, cols[prefix_positions]] = flat[prefix_positions]

    valid_SL = column_SL >= 0
    safe_col = column_SL.clamp(min=0)
    plain_row_SL, safe_col, valid_SL = plain_row_SL.to(device), safe_col.to(device), valid_SL.to(device)
    input_ids_SL = torch.where(valid_SL, input_ids_NT[plain_row_SL, safe_col], 0)
    position_ids_SL = torch.where(valid_SL, position_ids_NT[plain_row_SL, safe_col], 0)
    key_SL = valid_SL & mask_NT[plain_row_SL, safe_col]
    return SharedLayout(input_ids_SL, position_ids_SL, column_SL.to(device), segment_SL.to(device), key_SL,
                        index_NT.to(device), group_N.to(device),
                        torch.tensor([members[0] for members in groups], device=device), num_rows * num_positions, num_shared * length,
                        num_rows * _cost(num_positions, attention_cost), num_shared * _cost(length, attention_cost))


def attention_cost(config) -> float:
    """One query-key pair's attention work (QK^T and AV: 4 * heads * head_dim FLOPs) relative to one position's
    projections and MLP (2 * H * (q + k + v + o widths) + 6 * H * I FLOPs for a gated MLP), from a decoder config.
    For the bench-head Llama (H 256, 4 heads, I 704) it is 1/1570: a 1000-position row spends 39% of its work on
    attention, a 300-position row 16%."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    projections = 2 * hidden * head_dim * (2 * heads + 2 * kv_heads)
    return 4 * heads * head_dim / (projections + 6 * hidden * intermediate)
