"""fusedrl: fused kernels and TRL-compatible trainers for preference and RL fine-tuning of language models."""

from fusedrl.ops.advantages import (
    group_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
)
from fusedrl.ops.ddim import DDIMStepOutput, ddim_step_logprob
from fusedrl.ops.dispatch import configure_kernels, kernel_backends, use_kernels
from fusedrl.ops.gae import GAEResult, gae
from fusedrl.ops.logprobs import (
    TokenLogprobs,
    linear_token_logprobs,
    token_logprobs,
    token_logprobs_and_entropy,
)
from fusedrl.ops.multi_lora import multi_lora_linear
from fusedrl.ops.policy import (
    LinearPolicyLoss,
    PolicyLoss,
    kl_penalty,
    linear_policy_loss,
    policy_loss,
    value_loss,
)
from fusedrl.ops.preference import (
    KTOLoss,
    LinearKTOLoss,
    LinearORPOLoss,
    LinearPreferenceLoss,
    ORPOLoss,
    PreferenceLoss,
    kto_kl,
    kto_loss,
    linear_kto_loss,
    linear_orpo_loss,
    linear_preference_loss,
    orpo_loss,
    preference_loss,
)
from fusedrl.ops.preference.registry import (
    dpo_loss_types,
    register_preference_loss,
    registered_preference_losses,
    unregister_preference_loss,
)

__version__ = "0.1.0"

__all__ = [
    "DDIMStepOutput",
    "GAEResult",
    "KTOLoss",
    "LinearKTOLoss",
    "LinearORPOLoss",
    "LinearPolicyLoss",
    "LinearPreferenceLoss",
    "ORPOLoss",
    "PolicyLoss",
    "PreferenceLoss",
    "TokenLogprobs",
    "configure_kernels",
    "ddim_step_logprob",
    "dpo_loss_types",
    "gae",
    "group_advantages",
    "kernel_backends",
    "kl_penalty",
    "kto_kl",
    "kto_loss",
    "linear_kto_loss",
    "linear_orpo_loss",
    "linear_policy_loss",
    "linear_preference_loss",
    "linear_token_logprobs",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "multi_lora_linear",
    "orpo_loss",
    "policy_loss",
    "preference_loss",
    "register_preference_loss",
    "registered_preference_losses",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "unregister_preference_loss",
    "use_kernels",
    "value_loss",
]

# Trainers pull in transformers/accelerate (seconds of import time): loaded on first use, so kernel-only users and
# `fusedrl aot` stay light. `from fusedrl import DPOTrainer, DPOConfig` works as with TRL, and so do the diffusion
# trainers (`DDPOTrainer`, `DDPOConfig`, `AlignPropTrainer`, `AlignPropConfig`) and `fusedrl.use_adapter` (PEFT).
def __getattr__(name: str):
    if name == "use_adapter":
        from fusedrl.trainers.adapters import use_adapter

        return use_adapter
    if name.endswith(("Trainer", "Config")):
        from fusedrl import trainers

        if name in trainers.__all__:
            return getattr(trainers, name)
        from fusedrl.trainers import diffusion  # DDPO, AlignProp: diffusers is imported with the trainer itself

        if name in diffusion.__all__:
            return getattr(diffusion, name)
    raise AttributeError(f"module 'fusedrl' has no attribute {name!r}")
