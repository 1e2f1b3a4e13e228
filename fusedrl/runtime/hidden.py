"""The final hidden states of a causal LM's forward, taken from its decoder trunk without asking the model for them.

``model(..., output_hidden_states=...)`` makes transformers 5 install output-capturing forward hooks on every decoder
layer and attention module; those hooks read a ``ContextVar`` that Dynamo cannot trace, so a decoder layer compiled
on its own (``runtime.compile.compile_blocks``) fails with ``fullgraph=True`` once they exist. The trunk
(``model.get_decoder()``, e.g. ``LlamaModel``) returns the same tensor, the final-normed hidden states, as its
``last_hidden_state``; one forward hook on the trunk catches it and leaves the layers hook-free. The hook is registered
for one forward and removed after it, so the model is unchanged outside that call.

An encoder-decoder model (T5) may transform its decoder's output before the head (T5 multiplies it by
``d_model**-0.5`` when ``config.scale_decoder_outputs``), and takes no ``logits_to_keep``: :func:`head_input_forward`
catches the head's own input instead, with a pre-hook on the output embeddings that also hands the head only the last
position (``[N, 1, V]`` logits, as ``logits_to_keep=1`` gives a causal LM).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate.utils import is_peft_model


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without its PEFT / DDP / DeepSpeed / compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DeepSpeed engine
        model = model.module
    if is_peft_model(model):
        model = model.get_base_model()
    return getattr(model, "_orig_mod", model)


def decoder_trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The module that returns the final-normed hidden states of ``model`` (unwrapped from PEFT/DDP/compile)."""
    model = _unwrapped(model)
    get_decoder = getattr(model, "get_decoder", None)
    trunk = get_decoder() if callable(get_decoder) else None
    if not isinstance(trunk, torch.nn.Module) or trunk is model:
        raise ValueError(f"{type(model).__name__} exposes no decoder trunk (get_decoder()); fusedrl needs the final "
                         "hidden states before the LM head")
    return trunk


class _Caught:
    """Holds the last output the hook saw (``value``)."""

    value: torch.Tensor | None = None


@contextlib.contextmanager
def catch_final_hidden(model: torch.nn.Module) -> Iterator[_Caught]:
    """Inside the block, each forward of ``model`` stores its final hidden states ``[N, T, H]`` in ``caught.value``."""
    caught = _Caught()

    def hook(module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        caught.value = hidden

    handle = decoder_trunk(model).register_forward_hook(hook)
    try:
        yield caught
    finally:
        handle.remove()


def final_hidden_states(model: torch.nn.Module, **inputs) -> tuple[object, torch.Tensor]:
    """``(outputs, hidden_NTH)``: ``model(**inputs, use_cache=False, logits_to_keep=1)`` and its final-normed hidden
    states, caught on the trunk. Use this instead of ``output_hidden_states=...``: once transformers' capture hooks
    are installed on a model they stay, and compiled blocks of that model stop tracing."""
    with catch_final_hidden(model) as final:
        outputs = model(**inputs, use_cache=False, logits_to_keep=1)
    return outputs, final.value


def head_input_forward(model: torch.nn.Module, **inputs) -> tuple[object, torch.Tensor]:
    """``(outputs, hidden_NTH)``: ``model(**inputs, use_cache=False)`` and the input of its LM head
    (``get_output_embeddings()``) ``[N, T, H]``, exactly what the model projects to logits (T5's scaling included).
    For the forward, the head gets only the last position of that input: ``outputs.logits`` is ``[N, 1, V]``, whose
    gradient is zero, so the full ``[N, T, V]`` logits are never built."""
    caught = _Caught()

    def hook(module, args):
        caught.value = args[0]
        return (args[0][..., -1:, :], *args[1:])

    head = _unwrapped(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(_unwrapped(model)).__name__} exposes no LM head (get_output_embeddings()); fusedrl "
                         "needs the hidden states its head projects")
    handle = head.register_forward_pre_hook(hook)
    try:
        outputs = model(**inputs, use_cache=False)
    finally:
        handle.remove()
    if caught.value is None:
        raise ValueError(f"{type(_unwrapped(model)).__name__}'s forward never called its LM head "
                         "(get_output_embeddings()); fusedrl cannot catch the hidden states it projects")
    return outputs, caught.value
