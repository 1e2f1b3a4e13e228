"""Named Llama-architecture presets, built with random weights (nothing is downloaded).

Embeddings are untied (``tie_word_embeddings=False``): the LM head is then its own ``weight_VH`` parameter, as in
Llama-2/3-8B, so the fused log-prob kernels' ``grad_weight`` can be compared with the reference on its own instead of
summed with the embedding-gather gradient, and save/load has no tied keys to reconcile.

``vocab_size`` is padded above the tokenizer's 103 tokens (to a multiple of 64, or to 32000 for ``bench-head``). The
padded rows are never labels; their logits are trained down like any wrong token, and if sampling ever picks one the
tokenizer decodes it to nothing.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """Shape of a preset. ``vocab_size=None`` means the tokenizer's size rounded up to a multiple of 64."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int | None = None
    max_position_embeddings: int = 128


MODEL_PRESETS: dict[str, ModelPreset] = {
    # Unit tests: 90k parameters, a forward + backward on 8 x 32 tokens takes a few milliseconds.
    "tiny": ModelPreset(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
    # `make demo`: DPO on the arithmetic task passes 0.9 held-out reward accuracy on 2 CPU cores (see recipes.py).
    "demo": ModelPreset(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=384
    ),
    # Benchmarks: a realistic LM head (32000 x 256 = 8.2M parameters, as many again in the input embedding) on a
    # 3.2M-parameter trunk, so the head dominates the cost as it does in a real LM.
    "bench-head": ModelPreset(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=704,
        vocab_size=32000,
        max_position_embeddings=512,
    ),
}


def _padded_vocab_size(preset: ModelPreset, tokenizer: PreTrainedTokenizerBase) -> int:
    num_tokens = len(tokenizer)
    if preset.vocab_size is None:
        return -(-num_tokens // 64) * 64
    if preset.vocab_size < num_tokens:
        raise ValueError(f"preset vocab_size {preset.vocab_size} is below the tokenizer's {num_tokens} tokens")
    return preset.vocab_size


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The ``LlamaConfig`` of preset ``name``, with special-token ids taken from ``tokenizer``."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    preset = MODEL_PRESETS[name]
    return LlamaConfig(
        vocab_size=_padded_vocab_size(preset, tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(name: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised fp32 ``LlamaForCausalLM`` of preset ``name``; the same seed gives the same weights.

    The global torch RNG is left as it was: initialisation draws from a forked generator state.
    """
    config = preset_config(name, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
