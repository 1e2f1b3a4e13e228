"""Public per-token log-prob / entropy ops and their torch.library registration.

Legend: N tokens (leading dims flattened), V vocabulary, H hidden.

The compiled and Triton backends run as ``torch.library.custom_op``s with fake implementations and autograd, so a
``torch.compile(fullgraph=True)`` region around a call captures it as one opaque node (no graph break); the
reference backend is plain torch that Dynamo traces directly. The backend is chosen when a call is traced or run
(``registry.resolve``); a compiled graph keeps the backend it was traced with.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from fusedrl.ops import checks
from fusedrl.ops import dispatch as registry
from fusedrl.ops.compiler import compile_kernel
from fusedrl.ops.logprobs import chunked
from fusedrl.ops.logprobs import compiled as rows
from fusedrl.ops.logprobs.reference import linear_token_logprobs_reference, token_logprobs_reference

registry.register_op("logprobs", "per-token log-prob (and entropy) gathered from given logits")
registry.register_op("linear_logprobs", "per-token log-prob (and entropy) from hidden states and an LM head")

# Rows per chunk so that one fp32 [C, V] tile stays near 32 MiB: at V=32000 that is 256 tokens. Measured on the
# 2-core CPU (N=4096, H=1024, V=32000): chunks of 256..2048 tokens run the matmuls within 10% of each other, and
# the tile plus its gradient are the only vocabulary-sized buffers alive, which bounds peak memory.
_TILE_BYTES = 32 * 2**20


class TokenLogprobs(NamedTuple):
    """Per-token log-probabilities and entropy, both fp32 and shaped like the labels."""

    logprobs: torch.Tensor
    entropy: torch.Tensor


def _chunk_tokens(vocab_size: int) -> int:
    # A power of two, so that typical token counts split into equal chunks and the compiled kernels see one shape.
    return max(16, 1 << (_TILE_BYTES // (4 * vocab_size)).bit_length() - 1)


def _row_functions(backend: str, op: str) -> tuple[chunked.RowsFwd, chunked.RowsBwd]:
    if backend == "compiled":
        return _compiled_rows_fwd, _compiled_rows_bwd
    if backend == "triton":
        # Imported on first use: triton.jit reads TRITON_INTERPRET when the module is imported.
        from fusedrl.ops.logprobs import triton as triton_rows

        # A kernel that fails to build at run time falls back to the compiled rows (registry.run_with_fallback).
        return (functools.partial(registry.run_with_fallback, op, triton_rows.rows_fwd, _compiled_rows_fwd),
                functools.partial(registry.run_with_fallback, op, triton_rows.rows_bwd, _compiled_rows_bwd))
    raise ValueError(f"backend {backend!r} has no row kernels; choose compiled or triton")


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    # Compiled kernels guard on requires_grad and strides: saved activations arrive with requires_grad and
    # upstream gradients of a .sum() arrive expanded (stride 0). Detached, contiguous inputs keep one compiled
    # graph per dtype instead of a recompile per variation (the limit is 8 per function).
    return None if t is None else t.detach().contiguous()


def _compiled_rows_fwd(logits_CV, labels_C, inv_temperature, ignore_index, with_entropy):
    variant = compile_kernel(rows.fwd_variant(with_entropy))
    return variant(_plain(logits_CV), _plain(labels_C), inv_temperature, ignore_index)


def _compiled_rows_bwd(logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, grad_entropy_C, inv_temperature,
                       ignore_index):
    variant = compile_kernel(rows.bwd_variant(grad_logprobs_C is not None, grad_entropy_C is not None))
    tensors = (logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, grad_entropy_C)
    return variant(*map(_plain, tensors), inv_temperature, ignore_index)


@torch.compiler.assume_constant_result
def _resolve(op: str, device: torch.device) -> str:
    # Constant while tracing: selection reads context variables and the environment, which Dynamo cannot trace.
    return registry.resolve(op, device)


# ---------------------------------------------------------------------------------------------------------------
# logits -> (logprobs, entropy)


@torch.library.custom_op("fusedrl::token_logprobs", mutates_args=())
def _token_logprobs_op(
    logits: torch.Tensor, labels: torch.Tensor, inv_temperature: float, ignore_index: int, with_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows_fwd, _ = _row_functions(backend, "logprobs")
    return chunked.logprobs_fwd(
        logits, labels, inv_temperature=inv_temperature, ignore_index=ignore_index, with_entropy=with_entropy,
        rows_fwd=rows_fwd, chunk_tokens=_chunk_tokens(logits.shape[-1]),
    )


@_token_logprobs_op.register_fake
def _(logits, labels, inv_temperature, ignore_index, with_entropy, backend):
    out = logits.new_empty(labels.shape, dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("fusedrl::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, logits: torch.Tensor,
    labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, inv_temperature: float, ignore_index: int,
    backend: str,
) -> torch.Tensor:
    _, rows_bwd = _row_functions(backend, "logprobs")
    return chunked.logprobs_bwd(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, inv_temperature=inv_temperature,
        ignore_index=ignore_index, rows_bwd=rows_bwd, chunk_tokens=_chunk_tokens(logits.shape[-1]),
    )


@_token_logprobs_backward_op.register_fake
def _(grad_logprobs, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index, backend):
    return torch.empty_like(logits)


def _token_logprobs_setup(ctx, inputs, output):
    logits, labels, inv_temperature, ignore_index, with_entropy, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.args = (inv_temperature, ignore_index, with_entropy, backend)


def _token_logprobs_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    inv_temperature, ignore_index, with_entropy, backend = ctx.args
    grad_logits = _token_logprobs_backward_op(
        grad_logprobs, grad_entropy if with_entropy else None, logits, labels, lse, entropy, inv_temperature,
        ignore_index, backend,
    )
    return grad_logits, None, None, None, None, None


_token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


def _token_logprobs(logits, labels, temperature, ignore_index, with_entropy):
    checks.check_float("logits", logits)
    checks.check_labels(labels, logits.shape[:-1], logits.device, against="logits.shape")
    checks.check_temperature(temperature)
    checks.check_label_range(labels, logits.shape[-1], ignore_index)
    backend = _resolve("logprobs", logits.device)
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


@torch.library.custom_op("fusedrl::linear_token_logprobs", mutates_args=())
def _linear_token_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    inv_temperature: float, ignore_index: int, with_entropy: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows_fwd, _ = _row_functions(backend, "linear_logprobs")
    return chunked.linear_logprobs_fwd(
        hidden, weight, bias, labels, inv_temperature=inv_temperature, ignore_index=ignore_index,
        with_entropy=with_entropy, rows_fwd=rows_fwd, chunk_tokens=_chunk_tokens(weight.shape[0]),
    )


@_linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy, backend):
    out = hidden.new_empty(labels.shape, dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("fusedrl::linear_token_logprobs_backward", mutates_args=())
def _linear_token_logprobs_backward_op(
    grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, hidden: torch.Tensor,
    weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
    inv_temperature: float, ignore_index: int, backend: str, needs_input_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, rows_bwd = _row_functions(backend, "linear_logprobs")
    grads = chunked.linear_logprobs_bwd(
        grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy, inv_temperature=inv_temperature,
        ignore_index=ignore_index, rows_bwd=rows_bwd, chunk_tokens=_chunk_tokens(weight.shape[0]),
        needs_hidden_grad=needs_input_grad[0], needs_weight_grad=needs_input_grad[1],
        needs_bias_grad=needs_input_grad[2],
    )
    # custom ops cannot return None: an empty tensor stands for "not needed" and is dropped by the autograd glue.
    return tuple(hidden.new_empty(0) if grad is None else grad for grad in grads)


@_linear_token_logprobs_backward_op.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy, inv_temperature, ignore_index,
      backend, needs_input_grad):
    def like(needed, tensor):
        return torch.empty_like(tensor) if needed and tensor is not None else hidden.new_empty(0)

    return like(needs_input_grad[0], hidden), like(needs_input_grad[1], weight), like(needs_input_grad[2], bias)


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.args = (inv_temperature, ignore_index, with_entropy, backend)


def _linear_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    inv_temperature, ignore_index, with_entropy, backend = ctx.args
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grad_hidden, grad_weight, grad_bias = _linear_token_logprobs_backward_op(
        grad_logprobs, grad_entropy if with_entropy else None, hidden, weight, bias, labels, lse, entropy,
        inv_temperature, ignore_index, backend, needs,
    )
    return (
        grad_hidden if needs[0] else None,
        grad_weight if needs[1] else None,
        grad_bias if needs[2] else None,
        None, None, None, None, None,
    )


_linear_token_logprobs_op.register_autograd(_linear_backward, setup_context=_linear_setup)


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
    backend = _resolve("linear_logprobs", hidden.device)
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
