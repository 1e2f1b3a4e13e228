"""GRPO-loss benchmark inputs and paths, registered into ``peers.INPUTS`` / ``peers.PATHS`` under "grpo".

Legend: B sequences (completions), T completion positions, H hidden, V vocabulary.

Every path computes TRL 1.16's default GRPO loss (``loss_type="dapo"``, ``epsilon`` 0.2, ``beta`` 0, token-level
ratios) from the completion positions' last hidden states and the LM head, on the same inputs, and backpropagates
it to the hidden states and the head. Old log-probs are given (``num_iterations > 1``, so the ratios are not all 1
and some tokens clip); completions are right-padded (lengths uniform in [T/2, T]).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from benchmarks import peers

EPSILON = 0.2  # GRPOConfig.epsilon (epsilon_high defaults to it)


@dataclass
class GRPOInputs:
    hidden_BTH: torch.Tensor  # policy last hidden states of the completion positions, requires grad
    weight_VH: torch.Tensor  # LM head, requires grad
    completion_ids_BT: torch.Tensor  # int64 sampled tokens (0 on padding)
    mask_BT: torch.Tensor  # int64 completion mask, as TRL's completion_mask
    old_logps_BT: torch.Tensor  # log-probs of the sampling policy
    advantages_B: torch.Tensor
    # Path-owned buffers built on the first (untimed, warmup) call: the floor's completion rows and upstream gradient.
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def zero_grad(self) -> None:
        self.hidden_BTH.grad = None
        self.weight_VH.grad = None
        for value in self.cache.values():
            value.grad = None


def grpo_inputs(shape: Mapping[str, int], dtype: torch.dtype) -> GRPOInputs:
    B, T, H, V = shape["B"], shape["T"], shape["H"], shape["V"]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (2.0 / H**0.5)  # logit std ~2, as peers.linear_inputs
    lengths_B = torch.randint(T // 2, T + 1, (B,), generator=gen)
    mask_BT = (torch.arange(T) < lengths_B.unsqueeze(1)).long()
    ids_BT = torch.randint(0, V, (B, T), generator=gen) * mask_BT
    # The old policy is the current one plus ~0.2 nats of noise per token, so the ratios are near 1 as in training
    # and a few percent leave [0.8, 1.2]. One sequence of logits at a time (untimed, before any measurement).
    with torch.no_grad():
        old_BT = torch.stack([torch.log_softmax(h_TH @ weight.T, dim=-1).gather(-1, ids_T.unsqueeze(-1)).squeeze(-1)
                              for h_TH, ids_T in zip(hidden, ids_BT)])
    old_BT = old_BT + 0.2 * torch.randn(B, T, generator=gen)
    return GRPOInputs(
        hidden_BTH=hidden.to(dtype).requires_grad_(),
        weight_VH=weight.to(dtype).requires_grad_(),
        completion_ids_BT=ids_BT,
        mask_BT=mask_BT,
        old_logps_BT=old_BT,
        advantages_B=torch.randn(B, generator=gen),
    )


def _fusedrl_grpo(x: GRPOInputs, fused: bool) -> None:
    import fusedrl

    with fusedrl.use_kernels(linear_logprobs="compiled", policy_loss="compiled"):
        out = fusedrl.linear_policy_loss(x.hidden_BTH, x.weight_VH, x.completion_ids_BT, x.mask_BT, x.old_logps_BT,
                                         x.advantages_B, epsilon_low=EPSILON, epsilon_high=EPSILON, loss_type="dapo",
                                         fused=fused)
        out.loss.backward()


def fusedrl_grpo(x: GRPOInputs) -> None:
    """``fusedrl.linear_policy_loss`` with the compiled backends (explicit request: raises rather than falling back)
    and ``fused=True`` as the trainers run it (3 head passes); entropies on, as TRL's trainer computes them for its
    logged ``entropy``."""
    _fusedrl_grpo(x, fused=True)


def fusedrl_grpo_recompute(x: GRPOInputs) -> None:
    """The same with ``fused=False``: per-token log-probs whose backward recomputes each tile (4 passes)."""
    _fusedrl_grpo(x, fused=False)


def trl_grpo(x: GRPOInputs) -> None:
    """TRL's GRPO path written out: the LM head over the whole micro-batch (``_compute_loss`` scores all B rows in one
    chunk), ``selective_log_softmax`` as its fp32 CPU branch does it (gather the label logit, subtract a per-row
    ``logsumexp``), ``entropy_from_logits`` under no_grad in chunks of 128 rows, then ``_compute_loss``'s
    per-token clipped objective and dapo aggregation (one process, no accumulation)."""
    logits_BTV = x.hidden_BTH @ x.weight_VH.T
    ids_BT = x.completion_ids_BT
    label_logits_BT = logits_BTV.gather(-1, ids_BT.unsqueeze(-1)).squeeze(-1)
    lse_BT = torch.stack([torch.logsumexp(row_TV, dim=-1) for row_TV in logits_BTV])
    logps_BT = label_logits_BT - lse_BT
    with torch.no_grad():
        flat_NV = logits_BTV.detach().reshape(-1, logits_BTV.shape[-1])
        entropy = torch.cat([-(torch.exp(lp) * lp).sum(-1) for lp in
                             (torch.log_softmax(chunk, dim=-1) for chunk in flat_NV.split(128))])
    mask = x.mask_BT
    ratio = torch.exp(logps_BT - x.old_logps_BT)
    clipped = torch.clamp(ratio, 1 - EPSILON, 1 + EPSILON)
    advantages = x.advantages_B.unsqueeze(1)
    per_token_loss = -torch.min(ratio * advantages, clipped * advantages)
    loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    _ = (entropy.view_as(mask) * mask).sum() / mask.sum()  # the logged entropy metric
    loss.backward()


def liger_grpo(x: GRPOInputs) -> None:
    """``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (``compiled=True``, one sequence per chunk, its
    defaults) configured as TRL's defaults: beta 0 without a reference model, dapo, epsilon 0.2. Its first call
    compiles (untimed warmup). It computes no entropy."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=EPSILON, epsilon_high=EPSILON,
                                       loss_type="dapo")
    loss, _ = loss_fn(x.hidden_BTH, x.weight_VH, x.completion_ids_BT, x.mask_BT, x.advantages_B,
                      old_per_token_logps=x.old_logps_BT)
    loss.backward()


def floor_grpo(x: GRPOInputs) -> None:
    """The GEMMs any GRPO-loss method must do (:func:`peers.labelled_rows_floor`): the LM head's 3 passes over the
    completion tokens (mask 1), no reference (beta 0)."""
    peers.labelled_rows_floor(x.cache, x.hidden_BTH, x.weight_VH, x.mask_BT.bool())


peers.INPUTS["grpo"] = grpo_inputs
peers.PATHS["grpo"] = {
    "fusedrl": peers.PathSpec(fusedrl_grpo, "fusedrl compiled, fused head+loss"),
    "fusedrl_recompute": peers.PathSpec(fusedrl_grpo_recompute, "fusedrl compiled, recompute backward (fused=False)"),
    "trl": peers.PathSpec(trl_grpo, "TRL-style: full logits + selective_log_softmax"),
    "liger": peers.PathSpec(liger_grpo, "Liger LigerFusedLinearGRPOLoss"),
    "floor": peers.PathSpec(floor_grpo, "floor: 3 GEMM passes over the completion tokens"),
}
