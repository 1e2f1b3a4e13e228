"""Public per-token log-prob / entropy ops and their torch.library registration.

Legend: N tokens (leading dims flattened), V vocabulary, H hidden.

Backends of the ``logprobs`` (given logits) and ``linear_logprobs`` (hidden states + LM head) ops:
- ``reference``: ``reference.py``, plain torch that Dynamo traces directly;
- ``compiled``: the ``fusedrl::token_logprobs`` / ``fusedrl::linear_token_logprobs`` custom ops (and their
  ``*_backward`` ops) running ``compiled.py``: ``torch.compile`` of per-chunk row statistics, chunked by
  ``chunked.py``;
- ``triton``: the same custom ops running ``triton.py``: Triton row kernels under the same chunk drivers; a kernel
  that fails to build falls back to ``compiled`` (``dispatch.define_op``).
The custom ops have fake implementations and autograd (each backward is a custom op of its own), so a
``torch.compile(fullgraph=True)`` region captures a call as one opaque node per direction (no graph break). The
backend is chosen when a call is traced or run (``dispatch.traced_backend``); a compiled graph keeps the backend it
was traced with.

The per-token op pays 4 head passes per step (its upstream gradient is unknown in the forward). The losses whose
gradient w.r.t. a token's log-prob is known once its pair / sequence is done take the fused head+loss path at 3
(``fused.py``, the driver the ``linear_logprobs`` backends share with ``ops/preference/fused_head.py``,
``ops/preference/linear_kto.py`` and ``ops/policy/fused_head.py``). ``with_stats=True``
(``fusedrl::linear_token_logprobs_stats``) returns the top-1 flags and ``log sum p^2`` of the forward's own tiles, so
the unfused path needs no pass of its own for them.
Soft cap (``softcap=``, Gemma 2's ``final_logit_softcapping``): every op from hidden states takes it and caps each
fp32 logits tile, ``c * tanh(z / c)``, before the temperature, as the model's own forward then TRL do; the backward
goes through the cap. None or 0 is the plain head, bitwise.
Benchmarks: ``benchmarks/ops/logprobs.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fusedrl.ops import checks, dispatch
from fusedrl.ops.logprobs import compiled
from fusedrl.ops.logprobs.reference import (
    linear_token_logprobs_reference,
    linear_token_statistics_reference,
    token_logprobs_reference,
)
from fusedrl.ops.logprobs.reference import soft_cap as _soft_cap

dispatch.register_op("logprobs", "per-token log-prob (and entropy) gathered from given logits")
dispatch.register_op("linear_logprobs", "per-token log-prob (and entropy) from hidden states and an LM head")

_TRITON = "fusedrl.ops.logprobs.triton"

# Public for trainers: the cap itself, for the head's detached statistics formed outside the ops (the mean-logit
# metric, compute_metrics' logits).
soft_cap = _soft_cap


class TokenLogprobs(NamedTuple):
    """Per-token log-probabilities and entropy, both fp32 and shaped like the labels."""

    logprobs: torch.Tensor
    entropy: torch.Tensor


class TokenLogprobsWithStats(NamedTuple):
    """:class:`TokenLogprobs` plus the detached metrics of the same logits tiles (``linear_token_logprobs(...,
    with_stats=True)``): bool ``is_top1`` (the label is the argmax) and fp32 ``log_sum_sq_probs``
    (``log sum_v p_v^2``, WPO's statistic), shaped like the labels, False / 0 where the label is ignored."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor
    log_sum_sq_probs: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# logits -> (logprobs, entropy)


def _fake_token_logprobs(logits, labels, inv_temperature, ignore_index, with_entropy):
    out = logits.new_empty(labels.shape, dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out)


def _fake_token_logprobs_backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy, inv_temperature,
                                  ignore_index):
    return torch.empty_like(logits)


_token_logprobs_backward_op = dispatch.define_op(
    "token_logprobs_backward", op="logprobs", compiled=compiled.token_logprobs_bwd,
    triton=f"{_TRITON}:token_logprobs_bwd", fake=_fake_token_logprobs_backward,
)


def _token_logprobs_setup(ctx, inputs, output):
    logits, labels, inv_temperature, ignore_index, with_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.args = (inv_temperature, ignore_index, with_entropy)


def _token_logprobs_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    inv_temperature, ignore_index, with_entropy = ctx.args
    grad_logits = _token_logprobs_backward_op(
        grad_logprobs, grad_entropy if with_entropy else None, logits, labels, lse, entropy, inv_temperature,
        ignore_index, ctx.backend,
    )
    return grad_logits, None, None, None, None


_token_logprobs_op = dispatch.define_op(
    "token_logprobs", op="logprobs", compiled=compiled.token_logprobs_fwd, triton=f"{_TRITON}:token_logprobs_fwd",
    fake=_fake_token_logprobs, backward=_token_logprobs_backward, setup_context=_token_logprobs_setup,
)


def _token_logprobs(logits, labels, temperature, ignore_index, with_entropy):
    checks.check_float("logits", logits)
    checks.check_labels(labels, logits.shape[:-1], logits.device, against="logits.shape")
    checks.check_temperature(temperature)
    checks.check_label_range(labels, logits.shape[-1], ignore_index)
    backend = dispatch.traced_backend("logprobs", logits.device)
    if backend == "reference":
        return token_logprobs_reference(
            logits, labels, temperature=temperature, ignore_index=ignore_index, with_entropy=with_entropy
        )
    logits_NV = logits.reshape(-1, logits.shape[-1])
    logprobs_N, entropy_N, _ = _token_logprobs_op(
        logits_NV, labels.reshape(-1).long(), 1.0 / temperature, ignore_index, with_entropy, backend
    )
    return logprobs_N.view(labels.shape), entropy_N.view(labels.shape)


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100
) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``labels``, without a ``[..., V]`` log-softmax buffer.

    logits: ``[..., V]`` fp32/bf16/fp16; labels: ``[...]`` int64. Returns fp32 ``[...]``; positions with
    ``labels == ignore_index`` are 0 and get no gradient. Differentiable w.r.t. ``logits`` (fp32 accumulation).
    """
    logprobs, _ = _token_logprobs(logits, labels, temperature, ignore_index, with_entropy=False)
    return logprobs


def token_logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100
) -> TokenLogprobs:
    """Log-probs as :func:`token_logprobs` and the entropy of ``softmax(logits / temperature)``, from one pass
    over the logits. Both fp32 ``[...]`` and differentiable; ignored positions are 0 in both."""
    return TokenLogprobs(*_token_logprobs(logits, labels, temperature, ignore_index, with_entropy=True))


# ---------------------------------------------------------------------------------------------------------------
# hidden states + LM head -> (logprobs, entropy)


def _fake_linear_token_logprobs(hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy, softcap):
    out = hidden.new_empty(labels.shape, dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out)


def _fake_linear_token_logprobs_backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                                         inv_temperature, ignore_index, softcap, needs_input_grad):
    def like(needed, tensor):
        return torch.empty_like(tensor) if needed and tensor is not None else hidden.new_empty(0)

    return like(needs_input_grad[0], hidden), like(needs_input_grad[1], weight), like(needs_input_grad[2], bias)


# Takes which of hidden / weight / bias need a gradient, so a frozen LM head (LoRA) skips the [V, H] weight gradient;
# a gradient not asked for comes back as an empty tensor, since a custom op cannot return None.
_linear_token_logprobs_backward_op = dispatch.define_op(
    "linear_token_logprobs_backward", op="linear_logprobs", compiled=compiled.linear_token_logprobs_bwd,
    triton=f"{_TRITON}:linear_token_logprobs_bwd", fake=_fake_linear_token_logprobs_backward,
)


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy, softcap = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.args = (inv_temperature, ignore_index, with_entropy, softcap)


def _linear_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    inv_temperature, ignore_index, with_entropy, softcap = ctx.args
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grad_hidden, grad_weight, grad_bias = _linear_token_logprobs_backward_op(
        grad_logprobs, grad_entropy if with_entropy else None, hidden, weight, bias, labels, lse, entropy,
        inv_temperature, ignore_index, softcap, needs, ctx.backend,
    )
    return (
        grad_hidden if needs[0] else None,
        grad_weight if needs[1] else None,
        grad_bias if needs[2] else None,
        None, None, None, None, None,
    )


_linear_token_logprobs_op = dispatch.define_op(
    "linear_token_logprobs", op="linear_logprobs", compiled=compiled.linear_token_logprobs_fwd,
    triton=f"{_TRITON}:linear_token_logprobs_fwd", fake=_fake_linear_token_logprobs, backward=_linear_backward,
    setup_context=_linear_setup,
)


def _fake_linear_token_logprobs_stats(hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy,
                                      softcap):
    out = hidden.new_empty(labels.shape, dtype=torch.float32)
    return (out, torch.empty_like(out), torch.empty_like(out), labels.new_empty(labels.shape, dtype=torch.bool),
            torch.empty_like(out))


def _linear_stats_setup(ctx, inputs, output):
    _linear_setup(ctx, inputs, output[:3])
    ctx.mark_non_differentiable(*output[3:])


def _linear_stats_backward(ctx, grad_logprobs, grad_entropy, grad_lse, *_stats):
    return _linear_backward(ctx, grad_logprobs, grad_entropy, grad_lse)


# The forward with the metrics of its tiles (fused.linear_logprobs_stats_fwd): a loss that cannot take the fused
# head+loss path (it couples the batch) still gets its top-1 and WPO statistics without a head pass of their own.
_linear_token_logprobs_stats_op = dispatch.define_op(
    "linear_token_logprobs_stats", op="linear_logprobs", compiled=compiled.linear_token_logprobs_stats_fwd,
    triton=f"{_TRITON}:linear_token_logprobs_stats_fwd", fake=_fake_linear_token_logprobs_stats,
    backward=_linear_stats_backward, setup_context=_linear_stats_setup,
)


def _autocast_head(hidden, weight, bias):
    """hidden, weight and bias cast to the autocast dtype when autocast is on for their device, as autocast casts an
    ``nn.Linear``'s inputs (float64 excepted), so the head's matmuls run in bf16 there and the backward recomputes the
    same bf16 tiles whatever the autocast state of the ``backward()`` call. The custom ops themselves run with autocast
    off (``dispatch.define_op``); the casts' backward returns each gradient in its input's dtype."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(dtype)

    return cast(hidden), cast(weight), cast(bias)


def cap_argument(softcap: float | None) -> float:
    """The soft cap as the custom ops take it: a float, 0.0 for none (None or 0)."""
    return float(softcap) if softcap else 0.0


def checked_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, *,
                 temperature: float, ignore_index: int, softcap: float | None = None):
    """``(hidden, weight, bias)`` cast for autocast (:func:`_autocast_head`) and checked as an LM head's inputs with
    their labels (and ``softcap``: None, 0 or a finite number > 0); every op from hidden states (this module's, the
    fused head+loss ops) starts with it."""
    hidden, weight, bias = _autocast_head(hidden, weight, bias)
    checks.check_float("hidden", hidden)
    checks.check_float("weight", weight, min_dim=2)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"weight ({weight.dtype}, {weight.device}) must match hidden ({hidden.dtype}, {hidden.device})"
        )
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}] of {weight.dtype}, got {tuple(bias.shape)} "
                         f"{bias.dtype}")
    checks.check_labels(labels, hidden.shape[:-1], hidden.device, against="hidden.shape")
    checks.check_temperature(temperature)
    checks.check_softcap(softcap)
    checks.check_label_range(labels, weight.shape[0], ignore_index)
    return hidden, weight, bias


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    with_stats: bool = False,
    softcap: float | None = None,
) -> torch.Tensor | TokenLogprobs:
    """Per-token log-probs (and entropy) of ``hidden @ weight.T + bias`` without ever holding ``[N, V]`` logits.

    hidden: ``[..., H]``; weight: ``[V, H]`` (the LM head); bias: ``[V]`` or None; labels: ``[...]`` int64
    (already shifted; ``ignore_index`` marks prompt and padding positions, which cost no compute).
    Returns fp32 logprobs ``[...]``, or ``TokenLogprobs(logprobs, entropy)`` when ``with_entropy``, or with
    ``with_stats`` :class:`TokenLogprobsWithStats` (the top-1 flags and ``log sum p^2`` of the same logits tiles;
    entropy zeros unless ``with_entropy``).
    ``softcap``: the logits are ``softcap * tanh((hidden @ weight.T + bias) / softcap)`` before the temperature
    divides them (Gemma 2's ``final_logit_softcapping``; the entropy and the statistics are those of the capped
    logits); None or 0: no cap.
    Gradients flow to hidden, weight and bias in their own dtypes. Inside an autocast region the head computes in the
    autocast dtype, as ``nn.Linear`` would (fp32 accumulation across chunks; outputs stay fp32).
    """
    hidden, weight, bias = checked_head(hidden, weight, bias, labels, temperature=temperature,
                                        ignore_index=ignore_index, softcap=softcap)
    backend = dispatch.traced_backend("linear_logprobs", hidden.device)
    stats = (None, None)
    if backend == "reference":
        logprobs, entropy = linear_token_logprobs_reference(
            hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
            with_entropy=with_entropy, softcap=softcap,
        )
        if with_stats:
            stats = linear_token_statistics_reference(hidden, weight, labels, bias=bias, temperature=temperature,
                                                      ignore_index=ignore_index, softcap=softcap)
    else:
        op = _linear_token_logprobs_stats_op if with_stats else _linear_token_logprobs_op
        outs = op(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1).long(), 1.0 / temperature,
                  ignore_index, with_entropy, cap_argument(softcap), backend)
        logprobs, entropy = outs[0].view(labels.shape), outs[1].view(labels.shape)
        if with_stats:
            stats = (outs[3].view(labels.shape), outs[4].view(labels.shape))
    if with_stats:
        return TokenLogprobsWithStats(logprobs, entropy if with_entropy else torch.zeros_like(logprobs.detach()),
                                      *stats)
    return TokenLogprobs(logprobs, entropy) if with_entropy else logprobs
