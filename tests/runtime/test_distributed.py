"""Distributed DPO on CPU: 2 gloo processes give the losses of 1 process with the same global batch.

Every multi-process run goes through the real command line, ``python -m fusedrl dpo --accelerate_config <name>``,
which starts torchrun (ddp) or ``accelerate launch`` with the bundled config and adds what a CPU run needs
(fusedrl/runtime/launcher.py). One process with 8 pairs per step and two with 4 each see the same pairs in the same
order (accelerate hands batch ``2k + r`` of 4 to rank ``r``), and DDP, FSDP2 and ZeRO all average gradients over
the ranks, so the logged losses (the mean over both ranks) agree to fp32 rounding. Step 1 is ln 2 everywhere (policy
and reference start equal); steps 2-3 check the update, the sharded reference, and for the sync cases a reference
moved halfway to the policy after every step (TR-DPO, alpha 0.5).

The multi-process runs take 15-60 s each on 2 cores, so each case is one short run (3 steps, tiny model, a dataset
without a test split so no evaluation pass) and the single-process baselines are shared across cases.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fusedrl.cli import main as cli_main
from fusedrl.runtime import launcher
from tests.helpers import distributed
from tests.utils import assert_close

pytestmark = pytest.mark.slow

STEPS = 3
PAIRS_PER_STEP = 8
NUM_PROCESSES = 2
RUN_TIMEOUT_S = 300
SYNC = ["--sync_ref_model", "True", "--ref_model_sync_steps", "1", "--ref_model_mixup_alpha", "0.5"]
PRECOMPUTE = ["--precompute_ref_log_probs", "True"]


def _common(dataset: Path) -> list[str]:
    return [
        "--model", "tiny", "--dataset", str(dataset), "--kernels", "all=reference", "--bf16", "False",
        "--max_steps", str(STEPS), "--logging_steps", "1", "--learning_rate", "1e-3", "--report_to", "none",
        # trainer_state.json (the logged losses) is written with a checkpoint.
        "--save_strategy", "steps", "--save_steps", str(STEPS), "--save_only_model", "True",
    ]


def _losses(output_dir: Path) -> torch.Tensor:
    state = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == STEPS, state["log_history"]
    return torch.tensor(losses, dtype=torch.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The arithmetic preset's first STEPS * 8 training pairs, saved without a test split."""
    from fusedrl.cli import presets

    path = tmp_path_factory.mktemp("data") / "arithmetic"
    presets.load_preset_dataset("arithmetic", "train", n=STEPS * PAIRS_PER_STEP).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def baselines(dataset, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Single-process losses, 8 pairs per step: plain DPO (also the precomputed-reference result: the reference
    is the initial policy either way) and TR-DPO syncing."""
    root = tmp_path_factory.mktemp("single")
    losses = {}
    for name, extra in (("plain", []), ("sync", SYNC)):
        code = cli_main(["dpo", *_common(dataset), *extra, "--per_device_train_batch_size", str(PAIRS_PER_STEP),
                         "--output_dir", str(root / name)])
        assert code == 0
        losses[name] = _losses(root / name)
    assert losses["plain"][0].item() == pytest.approx(0.6931472, abs=1e-6)  # ln 2: policy == reference
    assert not torch.allclose(losses["plain"], losses["sync"])  # syncing changes steps 2-3, so it is tested
    return losses


@pytest.fixture(scope="module")
def long_prompt_dataset(tmp_path_factory) -> Path:
    """The same pairs behind a 60-character worked-examples context (the preset tokenizer is character level): pairs
    whose prompts are long enough for the shared-prefix layout to be chosen."""
    from fusedrl.cli import presets

    path = tmp_path_factory.mktemp("data") / "arithmetic_long"
    pairs = presets.load_preset_dataset("arithmetic", "train", n=STEPS * PAIRS_PER_STEP)
    context = "Worked examples:\n3+4=7\n12-5=7\n20+22=42\n9-3=6\n13+29=42\n8-6=2\nNow: "
    pairs.map(lambda row: {"prompt": context + row["prompt"]}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("config", ["fsdp2", "zero3"])
def test_shared_prefix_under_sharding_matches_one_plain_process(config, long_prompt_dataset, tmp_path, caplog):
    """Two sharded processes with shared prefixes (the default) give the losses of one process running every row
    whole (shared_prefix=False); one process with the default logs that it shares."""
    code = cli_main(["dpo", *_common(long_prompt_dataset), "--shared_prefix", "False",
                     "--per_device_train_batch_size", str(PAIRS_PER_STEP), "--output_dir", str(tmp_path / "plain")])
    assert code == 0
    with caplog.at_level("INFO", logger="fusedrl"):
        code = cli_main(["dpo", *_common(long_prompt_dataset), "--max_steps", "1", "--save_strategy", "no",
                         "--per_device_train_batch_size", str(PAIRS_PER_STEP), "--output_dir", str(tmp_path / "one")])
    assert code == 0 and "shared_prefix: on" in caplog.text
    result = distributed.launch(lambda port: [
        sys.executable, "-m", "fusedrl", "dpo", "--accelerate_config", config,
        "--num_processes", str(NUM_PROCESSES), "--main_process_port", str(port),
        *_common(long_prompt_dataset), "--per_device_train_batch_size", str(PAIRS_PER_STEP // NUM_PROCESSES),
        "--output_dir", str(tmp_path / "shared"),
    ], timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, distributed.failure_report(result, config)
    assert_close(_losses(tmp_path / "shared"), _losses(tmp_path / "plain"), name=f"{config} shared-prefix losses")


CASES = [
    ("ddp", "plain", []),
    ("zero2", "plain", []),
    ("fsdp2", "plain", []),
    ("zero3", "plain", []),
    ("fsdp2", "sync", SYNC),
    ("zero3", "sync", SYNC),
    ("fsdp2", "plain", PRECOMPUTE),
    ("zero3", "plain", PRECOMPUTE),
]
IDS = ["ddp", "zero2", "fsdp2", "zero3", "fsdp2-sync_ref", "zero3-sync_ref", "fsdp2-precompute", "zero3-precompute"]


@pytest.mark.parametrize("config,baseline,extra", CASES, ids=IDS)
def test_two_processes_match_one(config, baseline, extra, dataset, baselines, tmp_path):
    out = tmp_path / "run"
    result = distributed.launch(lambda port: [
        sys.executable, "-m", "fusedrl", "dpo", "--accelerate_config", config,
        "--num_processes", str(NUM_PROCESSES), "--main_process_port", str(port),
        *_common(dataset), *extra, "--per_device_train_batch_size", str(PAIRS_PER_STEP // NUM_PROCESSES),
        "--output_dir", str(out),
    ], timeout=RUN_TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(distributed.failure_report(result, config))
    assert_close(_losses(out), baselines[baseline], name=f"{config} {' '.join(extra)} losses")


# --- the launcher itself (no processes) ---------------------------------------------------------------------------


def test_bundled_configs_ship_with_the_package():
    assert launcher.bundled_configs() == ["ddp", "fsdp2", "zero2", "zero3"]
    for name in launcher.bundled_configs():
        text = (launcher.CONFIG_DIR / f"{name}.yaml").read_text()
        assert "use_cpu: false" in text  # written for GPU machines; the launcher adapts CPU runs
    assert "fsdp_version: 2" in (launcher.CONFIG_DIR / "fsdp2.yaml").read_text()


@pytest.mark.parametrize(
    "config,cuda,expected",
    [
        ("ddp", False, ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", "1234", "-m", "fusedrl",
                        "dpo", "--use_cpu", "True", "--model", "tiny"]),
        ("fsdp2", False, ["accelerate.commands.launch", "--config_file", "fsdp2.yaml", "--num_processes", "2",
                          "--main_process_port", "1234", "-m", "fusedrl", "dpo", "--ddp_backend", "gloo", "--model",
                          "tiny"]),
        ("zero3", True, ["accelerate.commands.launch", "--config_file", "zero3.yaml", "--num_processes", "4",
                         "--main_process_port", "1234", "-m", "fusedrl", "dpo", "--model", "tiny"]),
    ],
    ids=["ddp-cpu-torchrun", "fsdp2-cpu-gloo", "zero3-gpu"],
)
def test_launch_command(config, cuda, expected):
    argv = launcher.launch_argv("dpo", ["--model", "tiny"], accelerate_config=config, main_process_port=1234,
                                cuda=cuda, num_gpus=4)
    assert argv[0] == sys.executable and argv[1] == "-m"
    assert [Path(item).name if item.endswith(".yaml") else item for item in argv[2:]] == expected


def test_user_config_keeps_its_process_count_on_gpus(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("distributed_type: FSDP\nnum_processes: 3\n")
    argv = launcher.launch_argv("grpo", [], accelerate_config=str(user), cuda=True, num_gpus=8)
    assert "--num_processes" not in argv and argv[-3:] == ["-m", "fusedrl", "grpo"]


def test_launch_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="not a bundled config \\(ddp, fsdp2, zero2, zero3\\)"):
        launcher.launch_argv("dpo", [], accelerate_config="fsdp3", cuda=False)
    cpu_fsdp = tmp_path / "cpu.yaml"
    cpu_fsdp.write_text("distributed_type: FSDP\nuse_cpu: true\n")
    with pytest.raises(ValueError, match="use_cpu: true makes accelerate run FSDP as plain DDP"):
        launcher.launch_argv("dpo", [], accelerate_config=str(cpu_fsdp), cuda=False)
    with pytest.raises(ValueError, match="--num_processes and --main_process_port need --accelerate_config"):
        launcher.relaunch("dpo", ["--num_processes", "2", "--model", "tiny"])
    assert launcher.relaunch("dpo", ["--model", "tiny"]) is None  # nothing to launch: train in this process
