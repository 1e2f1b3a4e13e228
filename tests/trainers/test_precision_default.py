"""The precision of a config whose ``bf16`` the user left unset: TRL's ``bf16=True`` where transformers accepts it,
fp32 with one log line where it would fail ("Your setup doesn't support bf16/gpu"); an explicit choice is kept.

Which machine the config sees is set by patching the two availability checks (fusedrl's and transformers' own
``is_torch_bf16_gpu_available``), so the cases hold on this CPU-only machine and on a GPU one alike.
"""

from __future__ import annotations

import logging

import pytest
import transformers.training_args

import fusedrl.trainers.config as config_module
from fusedrl.cli import launch, presets
from fusedrl.trainers import (
    CPOConfig,
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    KTOConfig,
    OnlineDPOConfig,
    ORPOConfig,
    PPOConfig,
    RLOOConfig,
)
from tests.helpers.data import standard_pairs
from tests.helpers.models import tiny_llama

CONFIGS = (DPOConfig, ORPOConfig, CPOConfig, KTOConfig, GRPOConfig, RLOOConfig, PPOConfig, OnlineDPOConfig)
FP32_LINE = "bf16 not set and this machine has no bf16-capable accelerator: training in fp32 (bf16=False)"


@pytest.fixture
def machine(monkeypatch):
    """``machine(bf16=...)``: make fusedrl and transformers see a machine with (True) or without (False) a
    bf16-capable accelerator, and no XLA device."""
    def set_machine(*, bf16: bool) -> None:
        for module in (config_module, transformers.training_args):
            monkeypatch.setattr(module, "is_torch_bf16_gpu_available", lambda: bf16)
            monkeypatch.setattr(module, "is_torch_xla_available", lambda: False)

    return set_machine


def _precision_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "bf16" in record.getMessage()]


@pytest.mark.parametrize("config_cls", CONFIGS, ids=lambda cls: cls.__name__)
def test_unset_bf16_without_a_bf16_device_trains_in_fp32_and_says_so(config_cls, machine, caplog, tmp_path):
    """The issue's `DPOConfig(output_dir=...)` on a machine without CUDA: it raised inside transformers; every
    config now picks fp32 and logs it once."""
    machine(bf16=False)
    with caplog.at_level(logging.INFO, logger="fusedrl"):
        config = config_cls(output_dir=str(tmp_path), report_to="none")
    assert config.bf16 is False and config.fp16 is False
    assert [line.removeprefix("fusedrl: ") for line in _precision_lines(caplog)] == [
        f"{FP32_LINE}. Set bf16=False to silence this, or bf16=True with use_cpu=True for bf16 autocast on the CPU"]
    assert [r.levelname for r in caplog.records if FP32_LINE in r.getMessage()] == ["WARNING"]


def test_unset_bf16_with_a_bf16_device_is_trls_default(machine, caplog, tmp_path):
    machine(bf16=True)
    with caplog.at_level(logging.INFO, logger="fusedrl"):
        config = DPOConfig(output_dir=str(tmp_path), report_to="none")
    assert config.bf16 is True
    assert _precision_lines(caplog) == ["fusedrl: bf16 not set: training with bf16 mixed precision (TRL's default)"]


def test_unset_bf16_with_use_cpu_keeps_cpu_autocast(machine, caplog, tmp_path):
    """use_cpu=True: transformers runs bf16 under CPU autocast, as TRL's default does."""
    machine(bf16=False)
    with caplog.at_level(logging.INFO, logger="fusedrl"):
        config = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert config.bf16 is True
    assert _precision_lines(caplog) == [
        "fusedrl: bf16 not set: training with bf16 mixed precision (TRL's default) on the CPU (use_cpu=True: autocast)"]


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_explicit_bf16_is_kept_without_a_word(bf16, machine, caplog, tmp_path):
    """An explicit choice is the user's: bf16=True on a machine without bf16 keeps transformers' error."""
    machine(bf16=False)
    with caplog.at_level(logging.INFO, logger="fusedrl"):
        if bf16:
            with pytest.raises(ValueError, match="Your setup doesn't support bf16/gpu"):
                DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=True)
        else:
            assert DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False).bf16 is False
    assert _precision_lines(caplog) == []


def test_fp16_leaves_bf16_off(machine, caplog, tmp_path):
    machine(bf16=True)
    with caplog.at_level(logging.INFO, logger="fusedrl"):
        config = DPOConfig(output_dir=str(tmp_path), report_to="none", fp16=True)
    assert config.bf16 is False and config.fp16 is True
    assert _precision_lines(caplog) == []


def test_default_config_trains_in_fp32_without_a_bf16_device(machine, tmp_path):
    """End to end: a trainer built from a config with no precision set trains (one step) without mixed precision."""
    machine(bf16=False)
    config = DPOConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, per_device_train_batch_size=2,
                       gradient_checkpointing=False, save_strategy="no", dataloader_pin_memory=False)
    trainer = DPOTrainer(model=tiny_llama(), args=config, train_dataset=standard_pairs(4),
                         processing_class=presets.build_tokenizer())
    assert trainer.accelerator.mixed_precision == "no"
    trainer.train()
    assert trainer.state.global_step == 1


def test_cli_leaves_the_choice_to_the_config(machine, caplog, tmp_path):
    """The command line no longer forces `--bf16 False` without CUDA: the config's rule applies, log line included;
    a `--bf16` flag still wins."""
    machine(bf16=False)
    argv = ["--model", "tiny", "--dataset", "arithmetic", "--num_rows", "4", "--output_dir", str(tmp_path),
            "--report_to", "none"]
    with caplog.at_level(logging.INFO, logger="fusedrl"):
        assert launch.build_job("dpo", argv).config.bf16 is False
    assert any(FP32_LINE in line for line in _precision_lines(caplog))
    assert launch.build_job("dpo", [*argv, "--bf16", "True", "--use_cpu", "True"]).config.bf16 is True
