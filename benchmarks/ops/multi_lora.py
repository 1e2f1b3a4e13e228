"""Benchmark case of the ``multi_lora`` op (``fusedrl/ops/multi_lora/``): one LoRA-adapted linear layer, forward and
backward, with K adapters trained together, each on its own rows; against one adapter over the same rows (the issue's
1.3x bar) and PEFT's per-adapter loop.

Legend: N rows, I input features, O output features, R rank, K adapters.

Inputs and paths: ``peers_multi_lora.py`` ("multi_lora"), imported here so that every process that loads the cases
has them.
"""

from __future__ import annotations

from benchmarks import peers_multi_lora  # noqa: F401  (registers the "multi_lora" inputs and paths)
from benchmarks.spec import Case, Target

# 4 adapters x 2 sequences x 512 tokens through a 2048-wide projection (a 1B model's attention), r = 16: the base
# matmuls are 2 x 17 GFLOP per call, ~1 s fp32 on the 2-core reference machine.
_FULL = {"N": 4096, "I": 2048, "O": 2048, "R": 16, "K": 4}
_QUICK = {"N": 1024, "I": 512, "O": 512, "R": 16, "K": 4}

CASES: tuple[Case, ...] = (
    Case(
        name="multi_lora_linear",
        op="multi_lora_linear",
        inputs="multi_lora",
        shape=_FULL,
        quick_shape=_QUICK,
        paths=("fusedrl", "single_lora", "peft_loop"),
        base="fusedrl",
        description=(
            "A LoRA linear layer (frozen base with bias, K = 4 adapters of r = 16, scaling 2), fwd+bwd to x and the "
            "adapters, fp32, each adapter on N / K consecutive rows. fusedrl: multi_lora_linear (compiled: every "
            "adapter's LoRA as one masked matmul); single_lora: one adapter over all N rows, PEFT's forward; "
            "peft_loop: PEFT's mixed-batch forward (gather each adapter's rows, add its LoRA back), with autograd"
        ),
        targets=(Target("fusedrl", "time_ratio_max", 1.3, vs="single_lora"),),
        repeats=5,
        quick_repeats=10,
    ),
)
