"""The embedded-default demo (golden first steps) and the `fusedrl dpo` command line."""

from __future__ import annotations

import importlib
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from fusedrl.cli import launch
from fusedrl.cli import main as cli_main
from fusedrl.cli.demo import build_demo_trainer
from tests.utils import assert_close

GOLDEN = Path(__file__).parents[1] / "golden" / "demo_dpo_first_steps.json"
STEPS = 6


def _first_losses(tmp_path, kernels: str) -> list[float]:
    trainer = build_demo_trainer(tmp_path, max_steps=STEPS, logging_steps=1, kernels=kernels)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][:STEPS]


def test_demo_golden_first_steps(tmp_path):
    """The demo recipe's first 6 DPO losses on the reference backend (CPU, fp32) against the checked-in values;
    FUSEDRL_UPDATE_GOLDEN=1 rewrites them. Step 1 is ln 2 = 0.693147: policy and reference start equal."""
    losses = _first_losses(tmp_path, "all=reference")
    if os.environ.get("FUSEDRL_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"loss": losses}, indent=1) + "\n")
    assert losses[0] == pytest.approx(0.6931472, abs=1e-6)
    assert_close(torch.tensor(losses), torch.tensor(json.loads(GOLDEN.read_text())["loss"]), name="demo losses")


def test_demo_compiled_backend_matches_golden(tmp_path):
    losses = _first_losses(tmp_path, "all=compiled")
    golden = torch.tensor(json.loads(GOLDEN.read_text())["loss"])
    # Chunked vs full-logits sums differ in fp32 rounding only; six optimizer steps keep that below 1e-5.
    assert_close(torch.tensor(losses), golden, name="demo losses (compiled)", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("command", ["dpo", "orpo", "cpo", "kto"])
def test_cli_trains_and_saves(tmp_path, command):
    config = tmp_path / "cfg.yaml"
    config.write_text("learning_rate: 0.001\nmax_steps: 5\nbeta: 0.2\n")
    out = tmp_path / "run"
    code = cli_main([
        command, "--model", "tiny", "--dataset", "arithmetic", "--config", str(config), "--num_rows", "16",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "64",
        "--output_dir", str(out), "--report_to", "none", "--bf16", "False", "--save_strategy", "no",
        "--kernels", "linear_logprobs=compiled",
    ])
    assert code == 0
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


def test_cli_flags_override_yaml(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("learning_rate: 0.001\nmax_steps: 5\nloss_type: [sigmoid, sft]\nloss_weights: [1.0, 0.5]\n")
    job = launch.build_job("dpo", [
        "--model", "tiny", "--dataset", "arithmetic", "--config", str(config), "--num_rows", "8",
        "--max_steps", "2", "--output_dir", str(tmp_path), "--kernels", "all=reference",
    ])
    assert job.config.max_steps == 2  # the flag wins over the YAML file
    assert job.config.learning_rate == 0.001  # the YAML file wins over the default
    assert list(job.config.loss_type) == ["sigmoid", "sft"] and list(job.config.loss_weights) == [1.0, 0.5]
    assert job.config.kernels == "all=reference"
    assert len(job.train_dataset) == 8 and job.eval_dataset is not None


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "huge", "--dataset", "arithmetic"], "--model 'huge': not a preset"),
        (["--model", "tiny", "--dataset", "nope.txt"], "--dataset 'nope.txt': not a preset"),
    ],
    ids=["bad-model", "bad-dataset"],
)
def test_cli_bad_arguments_say_what_is_accepted(tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match):
        launch.build_job("dpo", [*argv, "--output_dir", str(tmp_path)])


def test_cli_bad_kernels_flag_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        launch.build_job("dpo", ["--model", "tiny", "--dataset", "arithmetic", "--kernels", "all=fast",
                                 "--output_dir", str(tmp_path)])


# `fusedrl bench`: the benchmark suite runs from a source checkout, in its own process.
CLI_MODULE = importlib.import_module("fusedrl.cli.main")  # `fusedrl.cli.main` the attribute is the function


def test_bench_runs_the_checkout_suite_in_a_subprocess(capfd):
    """In this checkout `fusedrl bench --list` is `python -m benchmarks.run --list` in the repository root: it lists
    every case (and runs none), and this process never imports the benchmarks package."""
    assert CLI_MODULE.checkout_root() == Path(__file__).resolve().parents[2]
    assert cli_main(["bench", "--list"]) == 0
    listed = capfd.readouterr().out.split("\n")
    assert [line.split()[0] for line in listed if line.strip()] == [
        "linear_logprobs_entropy", "linear_logprobs_entropy.half_labelled", "linear_logprobs_entropy.softcap",
        "linear_logprobs",
        "linear_logprobs.half_labelled", "logprobs_entropy", "linear_preference.dpo_sigmoid", "gae",
        "linear_policy_loss.grpo", "ddim_step_logprob.score", "ddim_step_logprob.draw", "multi_lora_linear",
        "shared_prefix_attention", "shared_prefix_attention.no_grad",
        "dpo_trainer", "dpo_trainer.bf16", "dpo_trainer_long", "dpo_trainer_long.bf16", "dpo_compile",
        "grpo_trainer", "grpo_trainer_g8", "grpo_trainer_long", "ddpo_trainer", "alignprop_trainer", "multi_adapter_trainer",
    ]
    assert "benchmarks" not in sys.modules


def test_bench_outside_a_checkout_says_how_to_run_it(tmp_path, monkeypatch):
    """An installed wheel (site-packages/fusedrl, no benchmarks/ beside it): a message, no process started."""
    installed = tmp_path / "site-packages" / "fusedrl"
    installed.mkdir(parents=True)
    monkeypatch.setattr(CLI_MODULE, "PACKAGE_DIR", installed)

    def no_benchmark(*args, **kwargs):
        raise AssertionError(f"a benchmark process was started: {args}")

    monkeypatch.setattr(CLI_MODULE, "subprocess", types.SimpleNamespace(run=no_benchmark))
    assert CLI_MODULE.checkout_root() is None
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "--quick"])
    message = str(exit_info.value.code)
    assert f"found no benchmarks/run.py beside {installed}" in message
    assert "pip install -e '.[bench]'" in message and "python -m benchmarks.run --help" in message
