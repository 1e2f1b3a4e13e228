"""The final hidden states of a causal LM's forward, taken from its decoder trunk without asking the model for them.

``model(..., output_hidden_states=...)`` makes transformers 5 install output-capturing forward hooks on every decoder
layer and attention module; those hooks read a ``ContextVar`` that Dynamo cannot trace, so a decoder layer compiled
on its own (``runtime.compile.compile_blocks``) fails with ``fullgraph=True`` once they exist. The trunk
(``model.get_decoder()``, e.g. ``LlamaModel``) returns the same tensor, the final-normed hidden states, as its
``last_hidden_state``; one forward hook on the trunk catches it and leaves the layers hook-free. The hook is registered
for one forward and removed after it, so the model is unchanged outside that call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate.utils import is_peft_model


def decoder_trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The module that returns the final-normed hidden states of ``model`` (unwrapped from PEFT/DDP/compile)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DeepSpeed engine
        model = model.module
    if is_peft_model(model):
        model = model.get_base_model()
    model = getattr(model, "_orig_mod", model)
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
