"""The one tiny-model factory of the suite: a randomly initialised Llama small enough for CPU parity runs.

The defaults (hidden 48, 2 layers, 4 attention / 2 KV heads, vocab 128 = the preset tokenizer's 103 tokens padded,
64 positions, untied head, pad/bos/eos 0/1/2 = ``build_tokenizer()``'s ids) are the preference trainers' model. A file
that needs another size passes overrides, so each test keeps the exact model its golden values were recorded with.
The ``tiny`` model preset (``fusedrl.cli.presets``) is the package's own and is loaded from there.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

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
