"""One trainer's shared-prefix forwards: the once-per-run decision, the layout per batch, the token counts.

Legend: N plain rows, T plain positions, S shared rows, L shared positions, H hidden.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

from fusedrl.runtime.hidden import catch_final_hidden, final_hidden_states
from fusedrl.runtime.shared_prefix.layout import SharedLayout, attention_cost, shared_layout
from fusedrl.runtime.shared_prefix.mask import attention_mask_4d
from fusedrl.runtime.shared_prefix.support import unsupported_reason, unwrapped_causal_lm, window_allows

logger = logging.getLogger("fusedrl")

_SHAREABLE_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids"})


class PrefixSharing:
    """Runs a causal LM's forwards in the shared-prefix layout when it is exact and cheaper, else in the plain one.

    ``enabled``: the config's ``shared_prefix``. The first forward decides per model whether the layout is exact for
    it (``support.unsupported_reason``) and logs the decision once. Per batch, the layout is used only when its trunk
    work (attention included) is below the plain layout's. ``counts``: positions the trunk ran (``trunk``) and would
    have run in the plain layout (``plain``), summed over every forward so far (read them per step from a callback).
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._verdicts: dict[int, str | None] = {}
        self.counts = {"plain": 0, "trunk": 0}

    def _reason(self, model: torch.nn.Module) -> str | None:
        key = id(model)
        if key not in self._verdicts:
            reason = unsupported_reason(model)
            self._verdicts[key] = reason
            name = type(unwrapped_causal_lm(model)).__name__
            if not self.enabled:
                logger.info("shared_prefix=False: %s runs every row whole (the plain layout)", name)
            elif reason is None:
                logger.info("shared_prefix: on for %s: rows that share a prompt go through the trunk once, with a "
                            "4D attention mask keeping sibling completions apart", name)
            else:
                logger.warning("shared_prefix: off for %s (%s); rows run whole", name, reason)
        return self._verdicts[key]

    def layout(self, model: torch.nn.Module, inputs: dict, *, row_keys_N: torch.Tensor | None = None,
               keep_padding: bool = False) -> SharedLayout | None:
        """The shared layout of ``inputs`` for ``model``, or None where the plain layout is to run."""
        # _reason first: it logs the decision once per model, shared_prefix=False included.
        if self._reason(model) is not None or not self.enabled or set(inputs) - _SHAREABLE_INPUTS:
            return None
        input_ids = inputs.get("input_ids")
        if input_ids is None or input_ids.dim() != 2 or inputs.get("attention_mask") is None:
            return None
        config = unwrapped_causal_lm(model).config
        if not window_allows(config, input_ids.shape[1]):
            return None
        layout = shared_layout(input_ids, inputs["attention_mask"], inputs.get("position_ids"),
                               row_keys_N=row_keys_N, keep_padding=keep_padding,
                               attention_cost=attention_cost(config.get_text_config()))
        return layout if layout.shared_cost < layout.plain_cost else None

    def forward(self, model: torch.nn.Module, inputs: dict, *, row_keys_N: torch.Tensor | None = None,
                keep_padding: bool = False, around: Callable[[torch.Tensor | None], contextlib.AbstractContextManager]
                | None = None, **extra) -> tuple[object, torch.Tensor]:
        """``(outputs, final hidden states [N, T, H])`` of ``model(**inputs, **extra)``, as ``final_hidden_states``
        returns them, hidden states at padded positions zero unless ``keep_padding``. ``extra`` other than
        nothing (e.g. MoE router logits: their load-balancing loss counts tokens, and a shared prompt is counted
        once) keeps the plain layout. ``around(row_keys)``: the context to run the forward in, given the
        ``row_keys_N`` of the rows actually run (the shared rows' or the plain ones'), e.g. LoRA adapter routing."""
        layout = None if extra else self.layout(model, inputs, row_keys_N=row_keys_N, keep_padding=keep_padding)
        input_ids = inputs.get("input_ids")
        plain = 0 if input_ids is None else input_ids.numel()
        self.counts["plain"] += plain
        if layout is None:
            self.counts["trunk"] += plain
            with around(row_keys_N) if around is not None else contextlib.nullcontext():
                return final_hidden_states(model, **inputs, **extra)
        self.counts["trunk"] += layout.shared_tokens
        config = unwrapped_causal_lm(model).config
        dtype = next(model.parameters()).dtype
        mask = attention_mask_4d(layout, getattr(config, "_attn_implementation", None) or "eager", dtype)
        keys = None if row_keys_N is None else row_keys_N[layout.leader_S]
        with around(keys) if around is not None else contextlib.nullcontext(), \
                catch_final_hidden(model) as final:
            outputs = model(input_ids=layout.input_ids_SL, attention_mask=mask, position_ids=layout.position_ids_SL,
                            use_cache=False, logits_to_keep=1)
        return outputs, layout.gather(final.value)
