"""Which models a shared-prefix forward is exact for, and why the others are refused.

The layout (``layout.py``) hands the model explicit position ids and a custom 4D mask. That is exact for a decoder
whose every layer is full causal self-attention over those positions, masked by that mask, and whose other layers
act per token: Llama-, Mistral- and Qwen2/3-style models (dense or mixture-of-experts). Everything else is refused
with its reason, and the caller keeps the plain layout:

- encoder-decoder models (the decoder's prompt is the encoder's, not a prefix of the decoder rows);
- recurrent or convolutional layers (Mamba, LFM2, NemotronH: a state runs along the row and would cross segments),
  and any model type not listed in ``SUPPORTED_MODEL_TYPES``;
- attention implementations that cannot take a dense mask (flash-attention kernels);
- prompt-learning PEFT (virtual tokens prepended to every row);
- sliding-window layers when a plain row is longer than the window (the custom mask replaces the window; shorter
  rows never reach it, so those batches stay exact: :func:`window_allows`).
"""

from __future__ import annotations

import torch
from accelerate.utils import is_peft_model

from fusedrl.runtime.shared_prefix.mask import MASK_IMPLEMENTATIONS

# Checked exact on tiny models of each type (tests/runtime/test_shared_prefix.py).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe"})


def unwrapped_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / DeepSpeed / PEFT / compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if is_peft_model(model):
        model = model.get_base_model()
    return getattr(model, "_orig_mod", model)


def _is_prompt_learning(model: torch.nn.Module) -> bool:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if not is_peft_model(model):
        return False
    return any(getattr(config, "is_prompt_learning", False) for config in model.peft_config.values())


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why a shared-prefix forward would not be exact for ``model`` (None: it is)."""
    if _is_prompt_learning(model):
        return "prompt-learning PEFT prepends virtual tokens to every row"
    config = unwrapped_causal_lm(model).config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model's prompt goes through the encoder, not the decoder rows"
    model_type = getattr(config.get_text_config(), "model_type", None) or config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"model_type {model_type!r} is not one whose layers are all full causal attention + per-token "
                f"layers (supported: {sorted(SUPPORTED_MODEL_TYPES)})")
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in MASK_IMPLEMENTATIONS:
        return (f"attn_implementation {implementation!r} cannot take a custom 4D mask (supported: "
                f"{list(MASK_IMPLEMENTATIONS)})")
    return None


def sliding_window(config) -> int | None:
    """The attention window of a model with sliding-window layers, else None."""
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def window_allows(config, num_positions: int) -> bool:
    """Whether plain rows of ``num_positions`` never reach the sliding window (so the custom mask loses nothing)."""
    window = sliding_window(config)
    return window is None or num_positions <= window
