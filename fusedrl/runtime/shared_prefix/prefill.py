"""Generation's prompt prefill, each distinct prompt once: GRPO/RLOO/Online DPO sample G completions of a prompt
from G copies of it, and ``model.generate`` would run the prompt's forward G times before the first token.

:func:`shared_prompt_cache` runs the distinct prompts' first ``P - 1`` positions once into a KV cache and copies each
prompt's cache to its rows; ``generate`` handed that cache runs only the last prompt position per row, then samples
as before (the same RNG draws). Position ids are generate's own for a left-padded batch (the attention mask's
cumulative sum), so every cached key and value is the one the plain prefill computes, up to fp32 summation order.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache

from fusedrl.runtime.shared_prefix.support import unsupported_reason


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword the model's forward and ``generate`` take a KV cache under: ``cache`` from transformers 5.25
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword_of(type(base))


@functools.cache
def _cache_keyword_of(model_cls: type) -> str:  # one signature inspection per class, not per generation round
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def shared_prompt_cache(model: torch.nn.Module, prompt_ids_BP: torch.Tensor,
                        prompt_mask_BP: torch.Tensor) -> DynamicCache | None:
    """A KV cache of positions ``[0, P - 1)`` of every row of the left-padded prompts, computed once per distinct
    prompt; None when no prompt repeats, the prompts are one position long, or the model's cache cannot be copied
    row by row (``support.unsupported_reason``: recurrent states, encoder-decoder models)."""
    num_rows, length = prompt_ids_BP.shape
    if length < 2 or unsupported_reason(model) is not None:
        return None
    rows_BF = torch.cat([prompt_ids_BP, prompt_mask_BP], dim=1)
    distinct, inverse_B = torch.unique(rows_BF, dim=0, return_inverse=True)
    if distinct.shape[0] == num_rows:
        return None
    first_U = torch.full((distinct.shape[0],), num_rows, dtype=torch.long, device=inverse_B.device)
    first_U = first_U.scatter_reduce(0, inverse_B, torch.arange(num_rows, device=inverse_B.device), reduce="amin")
    ids_UP, mask_UP = prompt_ids_BP[first_U, :-1], prompt_mask_BP[first_U, :-1]
    position_ids = (mask_UP.long().cumsum(-1) - 1).masked_fill(mask_UP == 0, 0)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids_UP, attention_mask=mask_UP, position_ids=position_ids, use_cache=True,
              logits_to_keep=1, **{cache_keyword(model): cache})
    cache.batch_select_indices(inverse_B)
    return cache
