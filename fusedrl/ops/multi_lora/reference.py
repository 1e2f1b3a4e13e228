"""Readable fp32 multi-LoRA linear: a loop over the adapters, the truth the other backends are tested against.

Legend: N rows, I input features (H_in), O output features (H_out), K adapters, R rank.

Semantics (shared by every backend of ``fusedrl.multi_lora_linear``). Row n with adapter id ``k = adapter_ids[n]``:

    y[n] = x[n] @ weight.T + bias + scaling[k] * (x[n] @ lora_A[k].T) @ lora_B[k].T      (0 <= k < K)
    y[n] = x[n] @ weight.T + bias                                                          (k == -1: base only)

which is PEFT's ``LoraLayer.forward`` for one adapter per row (``lora_A[k]`` / ``lora_B[k]`` are the adapter's
``lora_A.weight`` [R, I] and ``lora_B.weight`` [O, R], ``scaling[k]`` its ``lora_alpha / r``; dropout 0). Gradients
flow to x, lora_A and lora_B; an adapter with no rows gets an exact zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_lora_linear_reference(
    x_NI: torch.Tensor,
    weight_OI: torch.Tensor,
    bias_O: torch.Tensor | None,
    lora_A_KRI: torch.Tensor,
    lora_B_KOR: torch.Tensor,
    scaling_K: torch.Tensor,
    adapter_ids_N: torch.Tensor,
) -> torch.Tensor:
    """``y [N, O]`` in x's dtype, computed in fp32 with torch autograd (every adapter runs on every row and a mask
    keeps its own rows: K times the LoRA work, and no data-dependent shapes, so Dynamo traces it whole).

    x: ``[N, I]``; weight: ``[O, I]``; bias: ``[O]`` or None; lora_A: ``[K, R, I]``; lora_B: ``[K, O, R]``, any float
    dtypes; scaling: ``[K]``; adapter_ids: int ``[N]`` in ``[-1, K)``.
    """
    x = x_NI.float()
    y_NO = F.linear(x, weight_OI.float(), None if bias_O is None else bias_O.float())
    for k in range(lora_A_KRI.shape[0]):
        delta_NO = scaling_K[k].float() * F.linear(F.linear(x, lora_A_KRI[k].float()), lora_B_KOR[k].float())
        # torch.where, not a multiply by the mask: a row of another adapter must not see this adapter's inf or NaN.
        y_NO = torch.where((adapter_ids_N == k).unsqueeze(1), y_NO + delta_NO, y_NO)
    return y_NO.to(x_NI.dtype)
