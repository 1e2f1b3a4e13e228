"""Construction-time pieces of :class:`~fusedrl.trainers.online.grpo.GRPOTrainer` that mirror TRL 1.16's
``GRPOTrainer.__init__``: the reward-source and Liger refusals, and ``cast_lm_head_to_fp32``.

``cast_lm_head_to_fp32`` (ScaleRL) has two halves. The model's own ``lm_head`` (what ``generate`` samples from) is
cast to fp32 and its forward replaced by an fp32 projection of fp32 hidden states, exactly as TRL patches it, so the
sampled completions match TRL's; with tied embeddings the shared weight becomes fp32 too and the embedding's output
is cast back to the model's dtype. The fused head reads that fp32 weight through ``FusedHeadMixin._lm_head``, which
then skips its bf16 cast under bf16 mixed precision, and the trainer hands it the hidden states in the weight's dtype.
"""

from __future__ import annotations

import types

import torch
from accelerate.utils import is_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from fusedrl.trainers.models import CAST_LM_HEAD_PEFT_ERROR


def check_reward_source(reward_funcs, config_reward_funcs) -> None:
    """TRL's refusal of a trainer without rewards (GRPO checks it once its environments, which may own a reward
    through ``get_reward``, are probed)."""
    source = reward_funcs if reward_funcs is not None else config_reward_funcs
    if source is None or (isinstance(source, (list, tuple)) and len(source) == 0):
        raise ValueError("No reward source provided. fusedrl: reward_funcs is required: pass reward_funcs "
                         "(callables, registered reward names or reward models), or name them in the config's "
                         "reward_funcs (YAML / command line)")


def _is_prompt_learning(model, peft_config) -> bool:
    configs = [] if peft_config is None else [peft_config]
    attached = getattr(model, "peft_config", None)  # a PeftModel (or a model with adapters) given directly
    if isinstance(attached, dict):
        configs += list(attached.values())
    return any(getattr(config, "is_prompt_learning", False) for config in configs)


def check_liger_prompt_learning(args, model, peft_config) -> None:
    """Liger with prompt-learning PEFT (prompt / prefix / p-tuning), refused at construction as TRL's tests require:
    Liger's GRPO loss bypasses ``PeftModel.forward``, which is where the virtual tokens are prepended."""
    if getattr(args, "use_liger_kernel", False) and _is_prompt_learning(model, peft_config):
        raise ValueError("use_liger_kernel=True does not support prompt-learning PEFT methods (prompt tuning, prefix "
                         "tuning, p-tuning): their virtual tokens are added in PeftModel.forward, which Liger's loss "
                         "bypasses. Set use_liger_kernel=False (fusedrl's fused LM head already avoids the logits) or "
                         "use an adapter such as LoRA")


def _fp32_projection(self: torch.nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    # TRL's forward: fp32 inputs, weight and bias (an autocast region around the model still decides the matmul).
    return torch.nn.functional.linear(hidden_states.to(torch.float32), self.weight.to(torch.float32),
                                      None if self.bias is None else self.bias.to(torch.float32))


def _cast_output_to(dtype: torch.dtype):
    def hook(module, args, output):
        return output.to(dtype)

    return hook


def cast_lm_head_to_fp32(model: torch.nn.Module) -> None:
    """Cast ``model``'s output embedding to fp32 in place and make its forward an fp32 projection (TRL's
    ``cast_lm_head_to_fp32``); with tied embeddings the input embedding's outputs keep the original dtype. A PEFT
    adapter on the head is refused in TRL's words (``prepare_model`` refuses it first, in the same words). The
    forward is bound to the head (not a closure), so a deep copy of the model (the reference) projects with its own
    weight."""
    base = model.get_base_model() if is_peft_model(model) else model
    lm_head = base.get_output_embeddings()
    if isinstance(lm_head, BaseTunerLayer):  # TRL's type and words (a configuration error, not a wrong argument)
        raise ValueError(CAST_LM_HEAD_PEFT_ERROR)  # noqa: TRY004
    original_dtype = lm_head.weight.dtype
    lm_head.float()
    lm_head.forward = types.MethodType(_fp32_projection, lm_head)
    if base.config.get_text_config().tie_word_embeddings:
        # Only the activations are cast back; the shared weight stays fp32 (TRL's choice, for the logits' sake).
        base.get_input_embeddings().register_forward_hook(_cast_output_to(original_dtype))
