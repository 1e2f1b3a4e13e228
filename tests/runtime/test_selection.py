"""Kernel selection as the README orders it, in the ops and in the trainers, eager and compiled.

Priority, highest first: the caller's ``with fusedrl.use_kernels(...)``, the trainer's ``kernels=`` field (or the
process-wide ``configure_kernels``), ``FUSEDRL_KERNELS``, the default. A compiled loss region resolves the backends on
every call and recompiles when they change, instead of reusing a graph traced for other backends.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from datasets import Dataset
from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

import fusedrl
from fusedrl.cli import presets
from fusedrl.ops import dispatch
from fusedrl.trainers import DPOConfig, DPOTrainer


@pytest.fixture
def no_process_config():
    dispatch.configure_kernels(None)
    yield
    dispatch.configure_kernels(None)


def test_priority_use_kernels_over_config_over_process_over_env(monkeypatch, no_process_config):
    cpu = torch.device("cpu")
    assert dispatch.resolve("logprobs", cpu) == "compiled"  # the CPU default
    monkeypatch.setenv(dispatch.ENV_VAR, "logprobs=reference")
    assert dispatch.resolve("logprobs", cpu) == "reference"
    dispatch.configure_kernels("logprobs=compiled")
    assert dispatch.resolve("logprobs", cpu) == "compiled"  # process config over the environment
    with dispatch.config_kernels({"logprobs": "reference"}):
        assert dispatch.resolve("logprobs", cpu) == "reference"  # a trainer's field over the process config
        with fusedrl.use_kernels(logprobs="compiled"):
            assert dispatch.resolve("logprobs", cpu) == "compiled"  # the caller over the trainer's field
        assert dispatch.resolve("logprobs", cpu) == "reference"
    dispatch.configure_kernels(None)
    assert dispatch.resolve("logprobs", cpu) == "reference"  # back to the environment


def test_config_kernels_checks_names():
    with pytest.raises(ValueError, match="unknown op 'logprob'"), dispatch.config_kernels({"logprob": "compiled"}):
        pass


def test_pinned_selection_raises_for_unmet_request(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fusedrl.use_kernels(linear_logprobs="triton"), pytest.raises(ValueError, match="kernels need a CUDA device"), \
            dispatch.pinned_selection("cpu"):
        pass


def _pairs() -> Dataset:
    return Dataset.from_dict({"prompt": ["1+1=", "12+30=", "7+8=", "100-1="], "chosen": ["2", "42", "15", "99"],
                              "rejected": ["3", "41", "16", "9"]})


def _trainer(tmp_path, **fields) -> DPOTrainer:
    tokenizer = presets.build_tokenizer()
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                     learning_rate=1e-3, report_to="none", save_strategy="no", bf16=False, use_cpu=True,
                     disable_tqdm=True, dataloader_pin_memory=False, gradient_checkpointing=False, seed=0,
                     kernels="linear_logprobs=compiled", **fields)
    return DPOTrainer(model=presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer), args=args,
                      train_dataset=_pairs(), processing_class=tokenizer)


@pytest.mark.parametrize("compile_region", [False, True], ids=["eager", "compiled"])
def test_callers_triton_request_after_training_raises_without_interpreter(tmp_path, monkeypatch, compile_region):
    """After one ``train()``, a caller's ``use_kernels(linear_logprobs="triton")`` on a CPU without the Triton
    interpreter raises: it outranks the trainer's ``kernels=`` field, and the compiled region does not reuse the graph
    it traced for ``compiled``."""
    trainer = _trainer(tmp_path, compile=compile_region)
    trainer.train()
    assert len([entry for entry in trainer.state.log_history if "loss" in entry]) == 2
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fusedrl.use_kernels(linear_logprobs="triton"), pytest.raises(ValueError, match="use_kernels asks for "
                                                                                          "linear_logprobs=triton"):
        trainer.train()


def test_compiled_region_recompiles_when_selection_changes(tmp_path):
    """The DPO loss region traced with ``compiled`` heads is traced again under a caller's ``reference`` selection
    (the reference head is plain torch inside the graph), and both runs give the eager trainer's losses to fp32
    precision (the second run continues from the first run's weights in both trainers)."""
    runs = {}
    for name in ("eager", "compiled"):
        trainer = _trainer(tmp_path / name, compile=name == "compiled")
        clear_compilation_metrics()
        trainer.train()
        first = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        traced_once = Counter(metric.co_name for metric in get_compilation_metrics())["_dpo_region"]
        with fusedrl.use_kernels(linear_logprobs="reference"):
            trainer.train()
        second = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        traced_twice = Counter(metric.co_name for metric in get_compilation_metrics())["_dpo_region"]
        runs[name] = (first, second, traced_once, traced_twice)
    assert runs["eager"][2:] == (0, 0)
    # The first run may reuse a graph an earlier test traced for the same selection (the region cache is
    # process-wide); the caller's new selection must trace exactly one more.
    assert runs["compiled"][3] == runs["compiled"][2] + 1
    assert runs["eager"][1] != runs["eager"][0]  # the second run starts from trained weights
    for index in (0, 1):
        torch.testing.assert_close(torch.tensor(runs["compiled"][index]), torch.tensor(runs["eager"][index]),
                                   rtol=1e-5, atol=1e-6)
