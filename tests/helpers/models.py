"""The one tiny-model factory of the suite: a randomly initialised Llama small enough for CPU parity runs.

The defaults (hidden 48, 2 layers, 4 attention / 2 KV heads, vocab 128 = the preset tokenizer's 103 tokens padded,
64 positions, untied head, pad/bos/eos 0/1/2 = ``build_tokenizer()``'s ids) are the preference trainers' model. A file
that needs another size passes overrides, so each test keeps the exact model its golden values were recorded with.
The ``tiny`` model preset (``fusedrl.cli.presets``) is the package's own and is loaded from there. ``tiny_gemma2`` is
the same widths as Gemma 2, the model with soft-capped logits; ``tiny_t5`` the encoder-decoder stand-in.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

TINY_LLAMA = {"vocab_size": 128, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def tiny_llama_config(**overrides) -> LlamaConfig:
    """``TINY_LLAMA`` with ``overrides`` on top (any ``LlamaConfig`` field, e.g. ``num_labels``)."""
    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def tiny_llama(seed: int = 0, *, model_cls: type[PreTrainedModel] = LlamaForCausalLM, isolate_rng: bool = True,
               **overrides) -> PreTrainedModel:
    """``model_cls(tiny_llama_config(**overrides))`` initialised right after ``torch.manual_seed(seed)``.

    ``isolate_rng=True`` restores the global CPU generator afterwards, so building a model shifts no later draw.
    ``False`` leaves the generator where the initialisation left it: that is how the callback and reward tests have
    always built their models, and their later draws (LoRA initialisation, the Trainer's data order) continue from
    that state.
    """
    config = tiny_llama_config(**overrides)
    with torch.random.fork_rng(devices=[]) if isolate_rng else contextlib.nullcontext():
        torch.manual_seed(seed)
        return model_cls(config)


# Gemma 2 at the same widths (head_dim 12 = 48 / 4 heads; the head tied to the embeddings, as Gemma 2's), the model
# with soft-capped logits (logits = c * tanh(head(h) / c)). At this initialisation the head's outputs have std 0.13
# and reach 0.46, where Gemma 2's own cap of 30 bends them by 1e-5 relative (a head ignoring it would pass a 1e-5
# parity test); a cap of 0.25 puts them on tanh's curved part (tanh(0.46 / 0.25) = 0.95, not 1.84).
TINY_GEMMA2 = {**{key: TINY_LLAMA[key] for key in ("vocab_size", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                   "max_position_embeddings", "bos_token_id", "eos_token_id",
                                                   "pad_token_id")},
               "head_dim": 12, "final_logit_softcapping": 0.25}


def tiny_gemma2(seed: int = 0, **overrides) -> Gemma2ForCausalLM:
    """``Gemma2ForCausalLM(Gemma2Config(**TINY_GEMMA2, **overrides))`` initialised right after
    ``torch.manual_seed(seed)``, the global CPU generator restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Gemma2ForCausalLM(Gemma2Config(**{**TINY_GEMMA2, **overrides}))


# The encoder-decoder stand-in (ORPO/CPO): T5 of the same widths and the preset tokenizer's ids (pad 0 also starts the
# decoder, as in T5). T5Config's tie_word_embeddings=False means "T5 v1.1": weights still tied, no d_model**-0.5.
TINY_T5 = {"vocab_size": 128, "d_model": 48, "d_kv": 12, "d_ff": 96, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32, "dropout_rate": 0.0,
           "pad_token_id": 0, "decoder_start_token_id": 0, "eos_token_id": 2, "bos_token_id": 1}


def tiny_t5(seed: int = 0, **overrides) -> T5ForConditionalGeneration:
    """``T5ForConditionalGeneration(T5Config(**TINY_T5, **overrides))`` initialised right after
    ``torch.manual_seed(seed)``, the global CPU generator restored afterwards (two calls give equal weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(T5Config(**{**TINY_T5, **overrides}))
