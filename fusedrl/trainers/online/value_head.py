"""PPO's value model: a transformer trunk with a scalar head, and the module that trains it together with the policy.

A value model is TRL's choice, an ``AutoModelForSequenceClassification`` with ``num_labels=1``: its trunk
(``base_model_prefix``) gives the final hidden states and its ``score`` head maps each position to one scalar, so
``values[n, t]`` is the value of the state after input token t. :func:`value_model_from_policy` builds one from the
policy itself (trunk weights copied, head zero, so every value starts at 0) when none is given.

:class:`PolicyAndValue` holds the policy and the value model as one ``nn.Module``: ``Trainer`` and accelerate then
prepare, optimise, clip, checkpoint and (under DDP) synchronise both with one optimizer, as TRL's PPO does.

Legend: N sequences, T positions, H hidden.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from accelerate.utils import is_peft_model
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from fusedrl.runtime.hidden import catch_final_hidden


def _trunk(model: PreTrainedModel) -> torch.nn.Module:
    prefix = getattr(model, "base_model_prefix", None)
    trunk = getattr(model, prefix, None) if prefix else None
    if trunk is None:
        raise ValueError(f"{type(model).__name__} has no transformer trunk at base_model_prefix={prefix!r}; pass a "
                         "value model that is an AutoModelForSequenceClassification")
    return trunk


def check_value_model(model: torch.nn.Module) -> None:
    """A value model needs a trunk and a ``score`` head with one output (ValueError naming what is missing)."""
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"value model {type(model).__name__} has no `score` linear head; use an "  # noqa: TRY004
                         "AutoModelForSequenceClassification (num_labels=1) or value_model_from_policy(policy)")
    if head.out_features != 1:
        raise ValueError(f"value model's score head has {head.out_features} outputs; it must have 1 (num_labels=1)")
    _trunk(model)


def value_model_from_policy(policy: PreTrainedModel) -> PreTrainedModel:
    """A sequence-classification copy of ``policy`` (``num_labels=1``): the same trunk weights, a zero ``score``
    head, the policy's dtype and device. A PEFT policy contributes its base model's weights."""
    base = policy.get_base_model() if is_peft_model(policy) else policy
    config = copy.deepcopy(base.config)
    config.num_labels = 1
    # Whole, like the policy: under DeepSpeed ZeRO-3 transformers builds every from_config model partitioned
    # (zero.Init), and the sequence classifier builds its trunk that way even when the policy was loaded whole
    # (zero3_init_flag: false); the trunk copy below needs whole tensors. transformers' own guard against nested
    # zero.Init turns it off here; DeepSpeed partitions both models when the trainer prepares them.
    from transformers.modeling_utils import set_zero3_state

    with set_zero3_state():
        value_model = AutoModelForSequenceClassification.from_config(config)
    first = next(base.parameters())
    value_model.to(device=first.device, dtype=first.dtype)
    # Under a LoRA adapter the base weights sit at `<layer>.base_layer.weight` beside the `lora_*` tensors.
    state = {key.replace(".base_layer", ""): value for key, value in _trunk(base).state_dict().items()
             if "lora_" not in key}
    _trunk(value_model).load_state_dict(state)
    torch.nn.init.zeros_(value_model.score.weight)
    if value_model.score.bias is not None:
        torch.nn.init.zeros_(value_model.score.bias)
    return value_model


def token_values(value_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[N, T]``: the value model's scalar at every position of ``input_ids`` (no pooling)."""
    hidden_NTH = _trunk(value_model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state
    head = value_model.score
    return head(hidden_NTH.to(head.weight.dtype)).squeeze(-1).float()


class PolicyValueOutput(NamedTuple):
    """``hidden_NTH``: the policy's final hidden states (for the fused head); ``values_NT``: fp32 values;
    ``logits_N1V``: the policy's last-position logits, unused by the loss (see :meth:`PolicyAndValue.forward`)."""

    hidden_NTH: torch.Tensor
    values_NT: torch.Tensor
    logits_N1V: torch.Tensor | None = None


class PolicyAndValue(torch.nn.Module):
    """The policy and the value model trained as one module (see the module docstring).

    ``forward`` runs both on the same ``[N, T]`` inputs and returns :class:`PolicyValueOutput`; the policy is asked for
    its last hidden states only (``logits_to_keep=1``), so ``[N, T, V]`` logits are never built. ``config`` and
    ``get_output_embeddings`` are the policy's, which is what the fused LM head reads.
    """

    def __init__(self, policy: PreTrainedModel, value_model: PreTrainedModel):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.config = policy.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, policy_call=None):
        """:class:`PolicyValueOutput` of both models on ``[N, T]`` inputs; or, with ``policy_call``, the result of
        ``policy_call(policy)`` (generation), run inside this forward so that a sharding engine's hooks on this
        module run as they do in training: under FSDP2 this module is the root unit, whose pre-forward hook
        initialises the units and gathers the parameters it owns (a forward of the policy alone fails there)."""
        if policy_call is not None:
            return policy_call(self.policy)
        # The final hidden states come from a hook on the trunk (runtime/hidden.py), which keeps compiled blocks
        # traceable; logits_to_keep=1 leaves a [N, 1, V] slice of logits.
        with catch_final_hidden(self.policy) as final:
            outputs = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False, logits_to_keep=1)
        values_NT = token_values(self.value_model, input_ids, attention_mask, position_ids)
        # The logits slice is returned so that DDP counts the LM head as used: with find_unused_parameters (Trainer's
        # default for a module that is no PreTrainedModel) it marks every parameter its forward's outputs do not
        # reach as ready at once, and the fused head's gradient, which reaches lm_head.weight after the forward,
        # would mark it a second time (a RuntimeError on 2 processes).
        return PolicyValueOutput(final.value, values_NT, outputs.logits)

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    def activation_checkpointing_enable(self, **kwargs):
        for model in (self.policy, self.value_model):
            model.activation_checkpointing_enable(**kwargs)

    def gradient_checkpointing_enable(self, **kwargs):  # transformers' deprecated name
        for model in (self.policy, self.value_model):
            model.gradient_checkpointing_enable(**kwargs)
