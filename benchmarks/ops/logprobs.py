"""Benchmark cases of the ``logprobs`` op (``fusedrl/ops/logprobs/``): ``linear_token_logprobs`` (hidden states + LM
head, with and without entropy, all or half of the tokens labelled, soft-capped) and ``token_logprobs`` (given
logits).

Legend: N tokens, H hidden, V vocabulary, B sequences of T tokens (N = B * T).

Inputs and paths: ``peers.py`` ("linear", "logits").
"""

from __future__ import annotations

from benchmarks.spec import Case, Target

_LINEAR_FULL = {"N": 4096, "H": 1024, "V": 32000}
# --quick: 1/4 of the tokens, 1/2 of the hidden, 1/4 of the vocabulary (~1/32 of the FLOPs); the whole quick suite
# then takes ~3 minutes on 2 cores, most of it interpreter start-up and Inductor compiles in the fresh processes.
_LINEAR_QUICK = {"N": 1024, "H": 512, "V": 8000}
_LOGITS_FULL = {"B": 4, "T": 1024, "V": 32000}
_LOGITS_QUICK = {"B": 4, "T": 256, "V": 8000}

_LINEAR_ENTROPY_PATHS = ("fusedrl", "trl_chunked", "naive", "floor")
# naive does the same work whatever the labels, so the half-labelled variants leave it out.
_HALF_LABELLED_ENTROPY_PATHS = ("fusedrl", "trl_chunked", "floor")
_LINEAR_ENTROPY_TARGETS = (
    Target("fusedrl", "time_ratio_max", 1.15, vs="floor"),
    Target("fusedrl", "speedup_min", 1.8, vs="trl_chunked"),
    Target("fusedrl", "peak_mb_max", 300.0),
)
_LINEAR_PATHS = ("fusedrl", "torch_native", "trl_chunked", "liger", "naive", "floor")
_HALF_LABELLED_PATHS = ("fusedrl", "torch_native", "trl_chunked", "floor")
_LINEAR_TARGETS = (
    Target("fusedrl", "speedup_min", 1.0, vs="torch_native"),
    Target("fusedrl", "peak_ratio_max", 1.0, vs="torch_native"),
)
# In preference and RL batches the prompt (and padding) positions carry label -100; half is typical.
_HALF_LABELLED = {"labelled_fraction": 0.5}
_HALF_DESCRIPTION = "as above with 50% of labels = -100 at random positions; naive left out (same work as above)"
# Gemma 2's final_logit_softcapping. Neither torch's linear_cross_entropy nor Liger's kernel takes a cap: TRL's chunked
# function (its final_logit_softcapping) is the peer.
_SOFTCAP = 30.0

CASES: tuple[Case, ...] = (
    Case(
        name="linear_logprobs_entropy",
        op="linear_logprobs_entropy",
        inputs="linear",
        shape=_LINEAR_FULL,
        quick_shape=_LINEAR_QUICK,
        paths=_LINEAR_ENTROPY_PATHS,
        base="fusedrl",
        description="hidden @ W.T -> log p(label) and entropy, fwd+bwd (grad hidden, weight), all tokens labelled",
        path_kwargs={"with_entropy": True},
        targets=_LINEAR_ENTROPY_TARGETS,
    ),
    Case(
        name="linear_logprobs_entropy.half_labelled",
        op="linear_logprobs_entropy",
        inputs="linear",
        shape=_LINEAR_FULL,
        quick_shape=_LINEAR_QUICK,
        paths=_HALF_LABELLED_ENTROPY_PATHS,
        base="fusedrl",
        description=_HALF_DESCRIPTION,
        input_kwargs=_HALF_LABELLED,
        path_kwargs={"with_entropy": True},
        targets=_LINEAR_ENTROPY_TARGETS,
    ),
    Case(
        name="linear_logprobs_entropy.softcap",
        op="linear_logprobs_entropy",
        inputs="linear",
        shape=_LINEAR_FULL,
        quick_shape=_LINEAR_QUICK,
        paths=_LINEAR_ENTROPY_PATHS,
        base="fusedrl",
        description=(
            f"as linear_logprobs_entropy with Gemma 2's soft cap {_SOFTCAP:g} * tanh(z / {_SOFTCAP:g}) on the logits "
            "(softcap=; TRL's final_logit_softcapping); floor: the same uncapped matmuls"
        ),
        path_kwargs={"with_entropy": True, "softcap": _SOFTCAP},
        # The cap is elementwise work on tiles the matmuls dominate: set a priori, no more than the uncapped case's
        # margin over the floor (1.15) of extra time, no more memory.
        targets=(
            Target("fusedrl", "time_ratio_max", 1.15, vs="fusedrl", vs_case="linear_logprobs_entropy"),
            Target("fusedrl", "peak_mb_max", 300.0),
        ),
    ),
    Case(
        name="linear_logprobs",
        op="linear_logprobs",
        inputs="linear",
        shape=_LINEAR_FULL,
        quick_shape=_LINEAR_QUICK,
        paths=_LINEAR_PATHS,
        base="fusedrl",
        description="hidden @ W.T -> log p(label) only, fwd+bwd (grad hidden, weight), all tokens labelled",
        path_kwargs={"with_entropy": False},
        targets=_LINEAR_TARGETS,
    ),
    Case(
        name="linear_logprobs.half_labelled",
        op="linear_logprobs",
        inputs="linear",
        shape=_LINEAR_FULL,
        quick_shape=_LINEAR_QUICK,
        paths=_HALF_LABELLED_PATHS,
        base="fusedrl",
        description=_HALF_DESCRIPTION,
        input_kwargs=_HALF_LABELLED,
        path_kwargs={"with_entropy": False},
        targets=_LINEAR_TARGETS,
    ),
    Case(
        name="logprobs_entropy",
        op="logprobs_entropy",
        inputs="logits",
        shape=_LOGITS_FULL,
        quick_shape=_LOGITS_QUICK,
        paths=("fusedrl", "trl", "reference"),
        base="fusedrl",
        description="given fp32 logits [B, T, V] -> log p(label) and entropy, fwd+bwd (grad logits)",
        targets=(Target("fusedrl", "speedup_min", 3.0, vs="trl"),),
        repeats=5,
    ),
)
