"""The compiled backend's path for rows that come grouped by adapter (ids non-decreasing: the layout of the trainers'
joint mode, where each adapter's rows are one block): one small LoRA matmul per adapter on its own rows, so the
LoRA work is ``R * (I + O)`` multiply-adds per row whatever K, where the dense masked graph of ``compiled.py`` does
``K * R * (I + O)``. At the bench-head trunk's widths (I = 256, O = 256 or 1024, R = 16, K = 4) the dense LoRA terms
cost ~36% of the base matmuls against ~9% here.

Same results as ``compiled.py`` up to fp32 summation order (the LoRA terms and the sum in fp32, the base matmul in
x's dtype), same saved ``hidden``. Legend as ``compiled.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_segments(adapter_ids_N: torch.Tensor, num_adapters: int) -> list[tuple[int, int, int]] | None:
    """``[(adapter, start, end)]`` of the adapters that have rows, when the ids are non-decreasing, else None (one
    host sync; base-only rows, id -1, form the leading block and need no LoRA term)."""
    num_rows = adapter_ids_N.numel()
    if num_rows < 2:
        return None
    counts = torch.bincount(adapter_ids_N + 1, minlength=num_adapters + 1)
    grouped = (adapter_ids_N[1:] >= adapter_ids_N[:-1]).all().reshape(1).to(counts.dtype)
    *counts, is_grouped = torch.cat([counts, grouped]).tolist()
    if not is_grouped:
        return None
    segments, start = [], counts[0]
    for adapter, count in enumerate(counts[1:]):
        if count:
            segments.append((adapter, start, start + count))
        start += count
    return segments


def segmented_fwd(x_NI, weight_OI, bias_O, lora_A_KRI, lora_B_KOR, scaling_K, segments):
    """``(y [N, O] in x's dtype, hidden [N, R] fp32)`` as ``compiled.multi_lora_fwd``."""
    y_NO = F.linear(x_NI, weight_OI, bias_O).float()
    hidden_NR = x_NI.new_zeros((x_NI.shape[0], lora_A_KRI.shape[1]), dtype=torch.float32)
    for adapter, start, end in segments:
        down = (x_NI[start:end].float() @ lora_A_KRI[adapter].float().T) * scaling_K[adapter]
        hidden_NR[start:end] = down
        y_NO[start:end] += down @ lora_B_KOR[adapter].float().T
    return y_NO.to(x_NI.dtype), hidden_NR


def segmented_bwd(grad_y_NO, x_NI, weight_OI, lora_A_KRI, lora_B_KOR, scaling_K, hidden_NR, segments, x_grad: bool,
                  lora_grad: bool):
    """``(grad x, grad lora_A, grad lora_B)`` as ``compiled.multi_lora_bwd`` (an empty tensor for each one not
    asked for); an adapter without rows gets zeros."""
    grad_x = (grad_y_NO @ weight_OI).float() if x_grad else x_NI.new_empty(0)
    grad_A = torch.zeros_like(lora_A_KRI, dtype=torch.float32) if lora_grad else lora_A_KRI.new_empty(0)
    grad_B = torch.zeros_like(lora_B_KOR, dtype=torch.float32) if lora_grad else lora_B_KOR.new_empty(0)
    for adapter, start, end in segments:
        grad_rows = grad_y_NO[start:end].float()
        up = (grad_rows @ lora_B_KOR[adapter].float()) * scaling_K[adapter]
        if x_grad:
            grad_x[start:end] += up @ lora_A_KRI[adapter].float()
        if lora_grad:
            grad_A[adapter] = up.T @ x_NI[start:end].float()
            grad_B[adapter] = grad_rows.T @ hidden_NR[start:end]
    if x_grad:
        grad_x = grad_x.to(grad_y_NO.dtype)
    if lora_grad:
        grad_A, grad_B = grad_A.to(lora_A_KRI.dtype), grad_B.to(lora_B_KOR.dtype)
    return grad_x, grad_A, grad_B
