"""fusedrl: fused kernels and TRL-compatible trainers for preference and RL fine-tuning of language models."""

from fusedrl.engine.ops.logprobs import (
    TokenLogprobs,
    linear_token_logprobs,
    token_logprobs,
    token_logprobs_and_entropy,
)
from fusedrl.engine.registry import configure_kernels, kernel_backends, use_kernels

__version__ = "0.1.0"

__all__ = [
    "TokenLogprobs",
    "configure_kernels",
    "kernel_backends",
    "linear_token_logprobs",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "use_kernels",
]
