"""The compiled backend of the ``multi_lora`` op: every adapter's LoRA as one dense matmul over all rows, masked to
each row's own adapter, the formulation ``torch.compile`` handles without data-dependent shapes. ``triton.py`` has the
same entry points (:func:`multi_lora_fwd`, :func:`multi_lora_bwd`) with the same arguments and results.

Legend: N rows, I input features, O output features, K adapters, R rank; ``A_cat [K*R, I]`` stacks the adapters'
lora_A, ``B_cat [O, K*R]`` their lora_B side by side; ``onehot [N, K]`` marks each row's adapter (none for id -1).

Forward: ``down = x @ A_cat.T`` (every adapter's down-projection of every row), ``h = where(onehot, scaling * down,
0)`` keeps each row's own block, ``y = x @ weight.T + bias + h @ B_cat.T``. The op also returns ``hidden [N, R]``, the
row's own scaled block (``h`` summed over K, 0 for base-only rows), which the backward reads.

Backward (``g = dL/dy``): ``u = where(onehot, scaling * g @ B_cat, 0)`` [N, K, R], then ``dx = g @ weight + u @
A_cat``, ``dA = u.T @ x`` (rows of other adapters are 0 in u, so each adapter sums its own rows) and ``dB = g.T @
(onehot * hidden)``. The LoRA matmuls run over all K adapters for every row: ``K * R * (I + O)`` multiply-adds per
row against the base's ``I * O``, 6% of it at K = 8, R = 16, I = O = 4096 (0.8% for one adapter); the Triton
backend's work does not grow with K, nor does ``segmented.py``'s, which runs instead when the rows come grouped by
adapter (the trainers' joint layout). The base matmul stays in the input dtype (bf16 with fp32 accumulation, as
``nn.Linear``); the LoRA terms and the sum are fp32, rounded once to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedrl.ops.compiler import compile_kernel
from fusedrl.ops.multi_lora.segmented import grouped_segments, segmented_bwd, segmented_fwd


def _scaled_onehot(adapter_ids_N: torch.Tensor, scaling_K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(onehot [N, K, 1] bool, scale [N, K, 1] fp32)``: the row's adapter and its scaling at that adapter."""
    adapters_K = torch.arange(scaling_K.shape[0], device=adapter_ids_N.device)
    onehot_NK1 = (adapter_ids_N.unsqueeze(1) == adapters_K).unsqueeze(2)
    return onehot_NK1, scaling_K.float().view(1, -1, 1)


def _a_cat(lora_A_KRI: torch.Tensor) -> torch.Tensor:
    """``A_cat [K*R, I]`` fp32: the adapters' down-projections stacked."""
    return lora_A_KRI.float().reshape(-1, lora_A_KRI.shape[2])


def _b_cat(lora_B_KOR: torch.Tensor) -> torch.Tensor:
    """``B_cat [O, K*R]`` fp32: the adapters' up-projections side by side."""
    return lora_B_KOR.float().permute(1, 0, 2).reshape(lora_B_KOR.shape[1], -1)


def _forward(x_NI, weight_OI, bias_O, lora_A_KRI, lora_B_KOR, scaling_K, adapter_ids_N):
    num_rows = x_NI.shape[0]
    num_adapters, rank, _ = lora_A_KRI.shape
    onehot_NK1, scale_1K1 = _scaled_onehot(adapter_ids_N, scaling_K)
    down_NKR = (x_NI.float() @ _a_cat(lora_A_KRI).T).view(num_rows, num_adapters, rank)
    # where, not a multiply by the mask: a large x in another adapter's block must not become 0 * inf.
    h_NKR = torch.where(onehot_NK1, down_NKR * scale_1K1, 0.0)
    y_NO = F.linear(x_NI, weight_OI, bias_O).float() + h_NKR.reshape(num_rows, -1) @ _b_cat(lora_B_KOR).T
    return y_NO.to(x_NI.dtype), h_NKR.sum(1)


def _lora_grad_rows(grad_y_NO, lora_B_KOR, scaling_K, adapter_ids_N):
    """``u [N, K*R]`` fp32: ``scaling * grad_y @ B_k`` in the row's own adapter block, 0 elsewhere."""
    num_adapters, _, rank = lora_B_KOR.shape
    onehot_NK1, scale_1K1 = _scaled_onehot(adapter_ids_N, scaling_K)
    up_NKR = (grad_y_NO.float() @ _b_cat(lora_B_KOR)).view(grad_y_NO.shape[0], num_adapters, rank)
    return torch.where(onehot_NK1, up_NKR * scale_1K1, 0.0).reshape(grad_y_NO.shape[0], -1)


def _backward_input(grad_y_NO, weight_OI, lora_A_KRI, lora_B_KOR, scaling_K, adapter_ids_N):
    u_NC = _lora_grad_rows(grad_y_NO, lora_B_KOR, scaling_K, adapter_ids_N)
    return ((grad_y_NO @ weight_OI).float() + u_NC @ _a_cat(lora_A_KRI)).to(grad_y_NO.dtype)


def _backward_lora(grad_y_NO, x_NI, lora_A_KRI, lora_B_KOR, scaling_K, adapter_ids_N, hidden_NR):
    num_adapters, rank, num_in = lora_A_KRI.shape
    u_NC = _lora_grad_rows(grad_y_NO, lora_B_KOR, scaling_K, adapter_ids_N)
    grad_A = (u_NC.T @ x_NI.float()).view(num_adapters, rank, num_in)
    onehot_NK1, _ = _scaled_onehot(adapter_ids_N, scaling_K)
    h_NC = torch.where(onehot_NK1, hidden_NR.unsqueeze(1), 0.0).reshape(x_NI.shape[0], -1)
    grad_B = (grad_y_NO.float().T @ h_NC).view(-1, num_adapters, rank).permute(1, 0, 2)
    # Contiguous: the custom op's fake promises lora_B's layout.
    return grad_A.to(lora_A_KRI.dtype), grad_B.to(lora_B_KOR.dtype).contiguous()


def _plain(*tensors: torch.Tensor) -> list[torch.Tensor]:
    # Detached and contiguous: Dynamo guards on requires_grad and strides (the upstream gradient of a sum is an
    # expanded stride-0 tensor), each a graph of its own otherwise.
    return [t.detach().contiguous() for t in tensors]


def multi_lora_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: torch.Tensor, adapter_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled forward of ``fusedrl::multi_lora`` (``segmented.py`` when the rows come grouped by adapter):
    ``(y [N, O] in x's dtype, hidden [N, R] fp32)``, hidden being
    ``scaling[k] * x @ lora_A[k].T`` of the row's adapter (0 for base-only rows), saved for the backward.

    x: ``[N, I]``; weight: ``[O, I]`` and bias ``[O]`` (or None) in x's dtype; lora_A: ``[K, R, I]``, lora_B:
    ``[K, O, R]`` in one float dtype; scaling: fp32 ``[K]``; adapter_ids: int64 ``[N]`` in ``[-1, K)``."""
    segments = grouped_segments(adapter_ids, lora_A.shape[0])
    if segments is not None:
        with torch.no_grad():
            return segmented_fwd(x, weight, bias, lora_A, lora_B, scaling, segments)
    # A zero bias rather than None: one graph for both (a bias-free layer pays an [O] read).
    bias = weight.new_zeros(weight.shape[0]) if bias is None else bias
    with torch.no_grad():  # the gradient is analytic (multi_lora_bwd); one grad mode for Dynamo to guard on
        return compile_kernel(_forward)(*_plain(x, weight, bias, lora_A, lora_B, scaling, adapter_ids))


def multi_lora_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: torch.Tensor, adapter_ids: torch.Tensor, hidden: torch.Tensor, x_grad: bool, lora_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compiled backward of ``fusedrl::multi_lora``: ``(grad x [N, I] in x's dtype or [0] unless x_grad,
    grad lora_A [K, R, I] and grad lora_B [K, O, R] in their dtype, or [0] each unless lora_grad)`` from the upstream
    gradient ``grad_y [N, O]`` (x's dtype) and the forward's ``hidden``; the rest as :func:`multi_lora_fwd`. One
    compiled function per gradient, so a frozen input (x of the first adapted layer) costs no matmul."""
    segments = grouped_segments(adapter_ids, lora_A.shape[0])
    if segments is not None:
        with torch.no_grad():
            return segmented_bwd(grad_y, x, weight, lora_A, lora_B, scaling, hidden, segments, x_grad, lora_grad)
    empty = x.new_empty(0)
    grad_x, grad_A, grad_B = empty, lora_A.new_empty(0), lora_B.new_empty(0)
    with torch.no_grad():
        if x_grad:
            grad_x = compile_kernel(_backward_input)(*_plain(grad_y, weight, lora_A, lora_B, scaling, adapter_ids))
        if lora_grad:
            grad_A, grad_B = compile_kernel(_backward_lora)(
                *_plain(grad_y, x, lora_A, lora_B, scaling, adapter_ids, hidden))
    return grad_x, grad_A, grad_B
