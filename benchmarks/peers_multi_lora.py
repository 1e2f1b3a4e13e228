"""Multi-LoRA linear benchmark inputs and paths, registered into ``peers.INPUTS`` / ``peers.PATHS`` under
"multi_lora".

Legend: N rows, I input features, O output features, K adapters, R rank.

One LoRA-adapted linear layer, forward and backward (the upstream gradient is fixed), as joint training runs it: K
adapters stacked, each taking N / K consecutive rows (each adapter's sequences of the step, concatenated). Paths:
- ``fusedrl``: ``fusedrl.multi_lora_linear``, compiled backend (explicit request: raises rather than falling back;
  the runner builds CPU inputs, where the Triton kernels only run interpreted, a correctness tool);
- ``single_lora``: ONE adapter over all N rows, PEFT's ``lora.Linear.forward`` written out (``base(x) + B(A(x)) *
  scaling``, dropout 0): the issue's bar, a multi-adapter layer within 1.3x of a single-adapter one of the same rows.
  It trains its own copies of x and adapter 0 (its gradients differ from the others', so the runner does not compare
  them);
- ``peft_loop``: PEFT 0.21's ``lora.Linear._mixed_batch_forward`` written out with autograd (PEFT only runs it in eval
  mode: "Cannot pass `adapter_names` when the model is in training mode"): the base over all rows, then per adapter
  its rows gathered, ``B_k(A_k(x_k)) * scaling_k`` added back in place. PEFT builds each adapter's row indices with a
  Python list comprehension per call; here they are one ``nonzero`` each, which favours the peer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks import peers

SCALING = 2.0  # PEFT's lora_alpha / r with lora_alpha = 2 r, a common setting


@dataclass
class MultiLoRAInputs:
    x_NI: torch.Tensor  # requires grad
    weight_OI: torch.Tensor  # the frozen base layer
    bias_O: torch.Tensor
    lora_A_KRI: torch.Tensor  # requires grad
    lora_B_KOR: torch.Tensor  # requires grad
    adapter_ids_N: torch.Tensor  # int64, N / K consecutive rows per adapter
    grad_y_NO: torch.Tensor  # fixed upstream gradient
    # single_lora's own leaves: the same values as x and adapter 0.
    single_x_NI: torch.Tensor
    single_A_RI: torch.Tensor
    single_B_OR: torch.Tensor

    def zero_grad(self) -> None:
        for t in (self.x_NI, self.lora_A_KRI, self.lora_B_KOR, self.single_x_NI, self.single_A_RI, self.single_B_OR):
            t.grad = None


def multi_lora_inputs(shape: Mapping[str, int], dtype: torch.dtype) -> MultiLoRAInputs:
    N, I, O, R, K = shape["N"], shape["I"], shape["O"], shape["R"], shape["K"]
    gen = torch.Generator().manual_seed(0)
    x_NI = torch.randn(N, I, generator=gen).to(dtype)
    lora_A_KRI = (torch.randn(K, R, I, generator=gen) / I**0.5).to(dtype)
    # Trained adapters: B is no longer PEFT's zero init, so every term of the backward is exercised.
    lora_B_KOR = (torch.randn(K, O, R, generator=gen) / R**0.5).to(dtype)
    return MultiLoRAInputs(
        x_NI=x_NI.clone().requires_grad_(),
        weight_OI=(torch.randn(O, I, generator=gen) / I**0.5).to(dtype),
        bias_O=torch.randn(O, generator=gen).to(dtype),
        lora_A_KRI=lora_A_KRI.clone().requires_grad_(),
        lora_B_KOR=lora_B_KOR.clone().requires_grad_(),
        adapter_ids_N=torch.arange(K).repeat_interleave(N // K),
        grad_y_NO=torch.randn(N, O, generator=gen).to(dtype),
        single_x_NI=x_NI.clone().requires_grad_(),
        single_A_RI=lora_A_KRI[0].clone().requires_grad_(),
        single_B_OR=lora_B_KOR[0].clone().requires_grad_(),
    )


def fusedrl_multi_lora(x: MultiLoRAInputs) -> None:
    """``fusedrl.multi_lora_linear``, compiled backend."""
    import fusedrl

    with fusedrl.use_kernels(multi_lora="compiled"):
        y_NO = fusedrl.multi_lora_linear(x.x_NI, x.weight_OI, x.bias_O, x.lora_A_KRI, x.lora_B_KOR, SCALING,
                                         x.adapter_ids_N)
    y_NO.backward(x.grad_y_NO)


def single_lora(x: MultiLoRAInputs) -> None:
    """One adapter over all N rows: PEFT's ``lora.Linear.forward`` (dropout 0), eager."""
    y_NO = F.linear(x.single_x_NI, x.weight_OI, x.bias_O)
    y_NO = y_NO + F.linear(F.linear(x.single_x_NI, x.single_A_RI), x.single_B_OR) * SCALING
    y_NO.backward(x.grad_y_NO)


def peft_loop(x: MultiLoRAInputs) -> None:
    """PEFT's ``_mixed_batch_forward`` with autograd: the base over all rows, then a loop over the adapters."""
    result_NO = F.linear(x.x_NI, x.weight_OI, x.bias_O)
    for k in range(x.lora_A_KRI.shape[0]):
        rows = (x.adapter_ids_N == k).nonzero().squeeze(1)
        sub_batch = x.x_NI[rows]
        result_NO[rows] += F.linear(F.linear(sub_batch, x.lora_A_KRI[k]), x.lora_B_KOR[k]) * SCALING
    result_NO.backward(x.grad_y_NO)


peers.INPUTS["multi_lora"] = multi_lora_inputs
peers.PATHS["multi_lora"] = {
    "fusedrl": peers.PathSpec(fusedrl_multi_lora, "fusedrl compiled"),
    "single_lora": peers.PathSpec(single_lora, "one LoRA adapter over the same rows (PEFT's forward, eager)"),
    "peft_loop": peers.PathSpec(peft_loop, "PEFT 0.21 _mixed_batch_forward written out (loop over adapters)"),
}
