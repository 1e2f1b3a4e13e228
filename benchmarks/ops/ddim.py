"""Benchmark cases of the ``ddim_logprob`` op (``fusedrl/ops/ddim/``): ``ddim_step_logprob`` on Stable Diffusion
latents, the two calls a DDPO run makes: scoring stored latents with the log-prob's backward (training) and drawing
the next latents (sampling, no grad).

Legend: B latents of C x H x W.

Inputs and paths: ``peers_ddim.py`` ("ddim"), imported here so that every process that loads the cases has them.
"""

from __future__ import annotations

from benchmarks import peers_ddim  # noqa: F401  (registers the "ddim" inputs and paths)
from benchmarks.spec import Case, Target

# DDPOConfig's train_batch_size is 1 per device (sample_batch_size 1); 32 latents stand for a batch gathered over
# devices or a larger per-device batch: 4 x 64 x 64 x 32 = 524288 elements, 2 MB per fp32 tensor.
_FULL = {"B": 32, "C": 4, "H": 64, "W": 64}
_QUICK = {"B": 8, "C": 4, "H": 32, "W": 32}
_PATHS = ("fusedrl", "reference", "trl")

CASES: tuple[Case, ...] = (
    Case(
        name="ddim_step_logprob.score",
        op="ddim_step_logprob",
        inputs="ddim",
        shape=_FULL,
        quick_shape=_QUICK,
        paths=_PATHS,
        base="fusedrl",
        description=(
            "DDPO's training call: a DDIM step (epsilon, eta 1, SD's scheduler, 50 steps, per-sample timesteps) "
            "scoring given latents, log-prob fwd+bwd to the model output, fp32. fusedrl forms the gradient in its "
            "one forward pass; TRL's formula runs ~20 eager elementwise ops and their autograd"
        ),
        path_kwargs={"score": True},
        targets=(Target("fusedrl", "time_ratio_max", 1.0, vs="trl"),
                 Target("fusedrl", "peak_ratio_max", 1.0, vs="trl")),
        # A call moves a few MB: tens of ms on the 2-core CPU, so more repeats keep the median stable.
        repeats=20,
        quick_repeats=10,
    ),
    Case(
        name="ddim_step_logprob.draw",
        op="ddim_step_logprob",
        inputs="ddim",
        shape=_FULL,
        quick_shape=_QUICK,
        paths=_PATHS,
        base="fusedrl",
        description=(
            "DDPO's sampling call: the same step drawing the next latents (seeded noise) and their log-prob under "
            "no_grad, fp32"
        ),
        path_kwargs={"score": False},
        targets=(Target("fusedrl", "time_ratio_max", 1.0, vs="trl"),),
        repeats=20,
        quick_repeats=10,
    ),
)
