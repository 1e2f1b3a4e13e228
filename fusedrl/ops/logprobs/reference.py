"""Readable fp32 reference for per-token log-probs and entropy: the ground truth of tests and benchmarks.

Shapes: N tokens (any leading dims flattened), V vocabulary, H hidden.
It materialises the full fp32 ``[..., V]`` log-softmax, so it is for checking, not for training at scale.
``softcap`` (Gemma 2's ``final_logit_softcapping``): the logits from hidden states are ``c * tanh(z / c)`` of the
head's output z, before the temperature divides them, as transformers' Gemma2ForCausalLM and then TRL do.
"""

from __future__ import annotations

import torch


def token_logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log_softmax(logits / temperature)`` gathered at ``labels`` and, optionally, the entropy.

    logits: ``[..., V]`` any float dtype; labels: ``[...]`` integer. Returns fp32 ``(logprobs, entropy)`` of shape
    ``labels.shape`` (entropy None unless requested); positions where ``labels == ignore_index`` are 0 with no
    gradient. Differentiable through torch autograd.
    """
    scaled = logits.float() / temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    logprobs = logp_all.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs))
    if not with_entropy:
        return logprobs, None
    probs = logp_all.exp()
    # -inf logits have p = 0 and contribute 0 (the limit of p log p); masking log p before the product keeps the
    # backward free of 0 * inf as well.
    finite_logp = torch.where(probs > 0, logp_all, torch.zeros_like(logp_all))
    entropy = -(probs * finite_logp).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logprobs, entropy


def soft_cap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 ``softcap * tanh(logits / softcap)``, or ``logits.float()`` when ``softcap`` is None or 0."""
    logits = logits.float()
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same from hidden states ``[..., H]`` and an LM head ``weight`` ``[V, H]`` (+ ``bias`` ``[V]``), in fp32;
    ``softcap`` caps the head's output (:func:`soft_cap`) before the temperature."""
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    logits = soft_cap(logits, softcap)
    return token_logprobs_reference(
        logits, labels, temperature=temperature, ignore_index=ignore_index, with_entropy=with_entropy
    )


@torch.no_grad()
def token_statistics_reference(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """The metrics of the logits rows, detached: bool ``is_top1`` (the label is the first maximal logit, as
    ``torch.argmax``) and fp32 ``log sum_v p_v^2`` (WPO's statistic), shaped like ``labels``, False / 0 where the label
    is ``ignore_index``."""
    scaled = logits.float() / temperature
    valid = labels != ignore_index
    is_top1 = (scaled.argmax(-1) == labels) & valid
    log_sum_sq = torch.logsumexp(2.0 * scaled, -1) - 2.0 * torch.logsumexp(scaled, -1)
    return is_top1, torch.where(valid, log_sum_sq, torch.zeros_like(log_sum_sq))


def linear_token_statistics_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
    temperature: float = 1.0, ignore_index: int = -100, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_statistics_reference` of ``hidden @ weight.T (+ bias)`` in fp32, soft-capped by ``softcap``."""
    logits = hidden.detach().float() @ weight.detach().float().T
    if bias is not None:
        logits = logits + bias.detach().float()
    logits = soft_cap(logits, softcap)
    return token_statistics_reference(logits, labels, temperature=temperature, ignore_index=ignore_index)
