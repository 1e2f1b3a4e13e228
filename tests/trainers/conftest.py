"""Fixtures of the trainer tests: checkpoints that a fusedrl trainer and its TRL peer both load by path, as a TRL
user would, each saved once per session (a model is read-only once saved)."""

from __future__ import annotations

import pytest

from fusedrl.cli import presets
from tests.helpers.models import tiny_llama


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """``tiny_llama()`` (seed 0), the preference trainers' model. TRL reloads its reference from this path; fusedrl
    copies the loaded policy."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def preset_model_dir(tmp_path_factory) -> str:
    """The ``tiny`` preset (seed 0), the online trainers' model (GRPO and RLOO parity)."""
    path = tmp_path_factory.mktemp("tiny")
    presets.load_preset_model("tiny", seed=0, tokenizer=presets.build_tokenizer()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> str:
    """The tiny Stable Diffusion pipeline (``presets.diffusion.save_tiny_pipeline``, seed 0), the diffusion trainers'
    model, loaded by path as a user would (``DiffusionPipeline.from_pretrained``)."""
    from fusedrl.cli.presets.diffusion import save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd")))


