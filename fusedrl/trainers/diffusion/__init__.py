"""Diffusion RL trainers (DDPO, AlignProp) on diffusers pipelines, with their rewards and prompts.

``pipeline``: the trained Stable Diffusion pipeline (LoRA, sampling through ``fusedrl.ddim_step_logprob``);
``config`` / ``common``: what the trainers share (``DiffusionConfig``, ``DiffusionTrainerBase``); ``ddpo_config`` /
``ddpo``: DDPO; ``alignprop_config`` / ``alignprop``: AlignProp; ``rewards`` / ``prompts``: registries of image rewards
and prompt functions. Names resolve on first use, so importing the rewards or prompts does not import diffusers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DiffusionPipeline": "pipeline",
    "SampleOutput": "pipeline",
    "DiffusionConfig": "config",
    "DiffusionTrainerBase": "common",
    "DDPOConfig": "ddpo_config",
    "DDPOTrainer": "ddpo",
    "PerPromptStatTracker": "ddpo",
    "AlignPropConfig": "alignprop_config",
    "AlignPropTrainer": "alignprop",
}

__all__ = [
    "AlignPropConfig", "AlignPropTrainer", "DDPOConfig", "DDPOTrainer", "DiffusionConfig", "DiffusionPipeline",
    "DiffusionTrainerBase", "PerPromptStatTracker", "SampleOutput",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
