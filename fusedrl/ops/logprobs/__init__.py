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
Benchmarks: ``benchmarks/ops/logprobs.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fusedrl.ops import checks, dispatch
from fusedrl.ops.logprobs import compiled
from fusedrl.ops.logprobs.reference import linear_token_logprobs_reference, token_logprobs_reference

dispatch.register_op("logprobs", "per-token log-prob (and entropy) gathered from given logits")
dispatch.register_op("linear_logprobs", "per-token log-prob (and entropy) from hidden states and an LM head")

_TRITON = "fusedrl.ops.logprobs.triton"


class TokenLogprobs(NamedTuple):
    """Per-token log-probabilities and entropy, both fp32 and shaped like the labels."""

    logprobs: torch.Tensor
    entropy: torch.Tensor


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


def _fake_linear_token_logprobs(hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy):
    out = hidden.new_empty(labels.shape, dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out)


def _fake_linear_token_logprobs_backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                                         inv_temperature, ignore_index, needs_input_grad):
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
    hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.args = (inv_temperature, ignore_index, with_entropy)


def _linear_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    inv_temperature, ignore_index, with_entropy = ctx.args
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grad_hidden, grad_weight, grad_bias = _linear_token_logprobs_backward_op(
        grad_logprobs, grad_entropy if with_entropy else None, hidden, weight, bias, labels, lse, entropy,
        inv_temperature, ignore_index, needs, ctx.backend,
    )
    return (
        grad_hidden if needs[0] else None,
        grad_weight if needs[1] else None,
        grad_bias if needs[2] else None,
        None, None, None, None,
    )


_linear_token_logprobs_op = dispatch.define_op(
    "linear_token_logprobs", op="linear_logprobs", compiled=compiled.linear_token_logprobs_fwd,
    triton=f"{_TRITON}:linear_token_logprobs_fwd", fake=_fake_linear_token_logprobs, backward=_linear_backward,
    setup_context=_linear_setup,
)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
) -> torch.Tensor | TokenLogprobs:
    """Per-token log-probs (and entropy) of ``hidden @ weight.T + bias`` without ever holding ``[N, V]`` logits.

    hidden: ``[..., H]``; weight: ``[V, H]`` (the LM head); bias: ``[V]`` or None; labels: ``[...]`` int64
    (already shifted; ``ignore_index`` marks prompt and padding positions, which cost no compute).
    Returns fp32 logprobs ``[...]``, or ``TokenLogprobs(logprobs, entropy)`` when ``with_entropy``.
    Gradients flow to hidden, weight and bias in their own dtypes.
    """
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
    checks.check_label_range(labels, weight.shape[0], ignore_index)
    backend = dispatch.traced_backend("linear_logprobs", hidden.device)
    if backend == "reference":
        logprobs, entropy = linear_token_logprobs_reference(
            hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
            with_entropy=with_entropy,
        )
    else:
        logprobs_N, entropy_N, _ = _linear_token_logprobs_op(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1).long(), 1.0 / temperature,
            ignore_index, with_entropy, backend,
        )
        logprobs, entropy = logprobs_N.view(labels.shape), entropy_N.view(labels.shape)
    return TokenLogprobs(logprobs, entropy) if with_entropy else logprobs
