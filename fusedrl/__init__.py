"""fusedrl: fused kernels and TRL-compatible trainers for preference and RL fine-tuning of language models."""

from fusedrl.engine.ops.logprobs import (
    TokenLogprobs,
    linear_token_logprobs,
    token_logprobs,
    token_logprobs_and_entropy,
)
from fusedrl.engine.ops.preference import (
    LinearPreferenceLoss,
    PreferenceLoss,
    linear_preference_loss,
    preference_loss,
)
from fusedrl.engine.preference_registry import (
    dpo_loss_types,
    register_preference_loss,
    registered_preference_losses,
    unregister_preference_loss,
)
from fusedrl.engine.registry import configure_kernels, kernel_backends, use_kernels

__version__ = "0.1.0"

__all__ = [
    "LinearPreferenceLoss",
    "PreferenceLoss",
    "TokenLogprobs",
    "configure_kernels",
    "dpo_loss_types",
    "kernel_backends",
    "linear_preference_loss",
    "linear_token_logprobs",
    "preference_loss",
    "register_preference_loss",
    "registered_preference_losses",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "unregister_preference_loss",
    "use_kernels",
]

# Trainers pull in transformers/accelerate (seconds of import time): loaded on first use, so kernel-only users and
# `fusedrl aot` stay light. `from fusedrl import DPOTrainer, DPOConfig` works as with TRL.
def __getattr__(name: str):
    if name.endswith(("Trainer", "Config")):
        from fusedrl import trainers

        if name in trainers.__all__:
            return getattr(trainers, name)
    raise AttributeError(f"module 'fusedrl' has no attribute {name!r}")
