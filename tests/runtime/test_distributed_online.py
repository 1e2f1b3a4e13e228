"""Distributed online trainers on CPU: 2 gloo processes log the metrics of 1 process with the same global batch, and
TR-DPO's synced reference survives a save and a resume under every sharding.

Each accelerate config (``ddp``, ``zero2``, ``fsdp2``, ``zero3``) gets one 2-process launch through the command
line's launcher (tests/helpers/distributed.py: the launch costs more than the runs, so one launch trains every case
in turn, each built from the same flags as ``fusedrl <trainer>``). The single-process baselines run in this process
with twice the per-process batch.

Online trainers (GRPO, RLOO, PPO, online DPO; 3 steps each, a reward function and a reward model; GRPO once more with
``top_entropy_quantile=0.5``, whose quantile must span both processes as TRL's does): sampling draws
each completion from its own seeded stream (``--rank_invariant_sampling True``), so both runs sample the same
completions, and every logged metric must agree to fp32 precision: the loss and grad norm, rewards gathered across
processes, advantages normalised over the global batch (GRPO/RLOO groups, PPO's whitening), token means over the
global batch although the processes hold completions of different lengths (GRPO's KL and clip ratios).
PPO samples one prompt per process and stops at token 62, which ends the first process's completion at 3 tokens and
the second's at 8: its whitening and loss weighting see ragged widths, and its generation must keep the processes
stepping together under FSDP2. Reward models are prepared like the reference: partitioned under ZeRO-3, sharded
under FSDP2, a whole copy otherwise.

TR-DPO (``sync_ref_model``, alpha 0.5 after every step): run A trains 4 steps with a full checkpoint at step 2; run
B resumes from it. A matches the single-process run; B's steps 3-4 match A's (before the fix, DeepSpeed resumes never
loaded the synced reference, and a ZeRO-3 save wrote its empty partitions); A's saved reference equals the
single-process one, every tensor whole.

GRPO with a tool (tests/helpers/tool_turns.py), one step: the rows of the first half of the global batch call it,
so on two processes only process 0 runs a tool turn. Under FSDP2 and ZeRO-3 process 1 joins that turn's forwards
with a dummy row (agents/lockstep.py; before, this was refused, and without it process 0 would wait forever), under
DDP and ZeRO-2 it skips it; the metrics equal one process's either way. A second step would not: its continuations
draw from the global RNG, which the first round's row shuffle (``randperm`` of 8 rows on one process, of 4 on two)
moved differently (checked by hand with two steps: step 2 differs from one process's under DDP and FSDP2 alike,
and FSDP2's equals DDP's, the dummy's draws being undone).

Each launch takes 20-40 s on 2 cores; the baselines ~15 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fusedrl.runtime import checkpoint
from fusedrl.trainers.rewards import unregister_reward
from tests.helpers import distributed
from tests.utils import assert_close

pytestmark = pytest.mark.slow

NUM_PROCESSES = 2
RUN_TIMEOUT_S = 600
ONLINE = ("grpo", "rloo", "ppo", "online-dpo")
# Wall-clock, throughput and memory differ between any two runs; FLOP counts depend on how parameters are held.
_UNCOMPARED = ("runtime", "per_second", "step_time", "memory/", "total_flos")
# How each config holds a reward model (distributed.placement).
REWARD_PLACEMENT = {"ddp": "whole:LlamaForSequenceClassification", "zero2": "whole:LlamaForSequenceClassification",
                    "fsdp2": "fsdp2:FSDPLlamaForSequenceClassification", "zero3": "zero3:DeepSpeedEngine"}


def _online_argv(trainer: str, data: Path, per_process: int, output_dir: Path) -> list[str]:
    """Flags of one online run; ``per_process`` scales the batch (2 for one process, 1 for each of two)."""
    argv = ["--model", "tiny", "--dataset", str(data / "prompts"), "--kernels", "all=reference", "--bf16", "False",
            "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-2", "--report_to", "none",
            "--save_strategy", "no", "--seed", "0", "--disable_tqdm", "True", "--rank_invariant_sampling", "True",
            "--reward_funcs", distributed.REWARD_NAME, str(data / "reward_model"), "--output_dir", str(output_dir)]
    if trainer == "rloo":
        # The plain layout: with shared prefixes the 2-process run (one prompt group per process) and the 1-process
        # run (both groups in one layout) drift apart by fp32 rounding that 2 steps at lr 1e-2 (step 2 fully clipped)
        # amplify to 1.7e-5 in step 3's grad_norm and 7.8e-5 in its k1 KL mean (measured; SDPA itself is batch
        # invariant, checked). GRPO, PPO and online DPO keep the default shared layout and stay within 1e-5.
        argv = [*argv, "--shared_prefix", "False"]
    if trainer in ("grpo", "rloo"):
        # 2 prompts x 4 completions per step, each round used twice (old log-probs, clipping); 20 tokens: some end
        # early, so the processes hold different token counts; beta != 0: a (sharded) reference too.
        return argv + ["--per_device_train_batch_size", str(4 * per_process), "--num_generations", "4",
                       "--max_completion_length", "20", "--num_iterations", "2", "--beta", "0.04"]
    if trainer == "ppo":  # 2 prompts per rollout; token 62 ends one completion early (module docstring)
        return argv + ["--per_device_train_batch_size", str(per_process), "--response_length", "8",
                       "--stop_token_id", "62"]
    return argv + ["--per_device_train_batch_size", str(2 * per_process), "--max_new_tokens", "6"]  # online DPO


def _tools_argv(data: Path, per_process: int, output_dir: Path) -> list[str]:
    """GRPO with a tool, 1 step of 2 prompts x 4 completions, no reference: the scripted call (75 tokens) and its
    result (~14) fit ``max_completion_length`` 100, which leaves each continuation ~10 tokens."""
    return ["--model", "tiny", "--dataset", str(data / "chat_prompts"), "--kernels", "all=reference", "--bf16", "False",
            "--max_steps", "1", "--logging_steps", "1", "--learning_rate", "1e-2", "--report_to", "none",
            "--save_strategy", "no", "--seed", "0", "--disable_tqdm", "True", "--rank_invariant_sampling", "True",
            "--reward_funcs", distributed.REWARD_NAME, "--output_dir", str(output_dir),
            "--per_device_train_batch_size", str(4 * per_process), "--num_generations", "4",
            "--max_completion_length", "100"]


def _trdpo_argv(data: Path, per_process: int, output_dir: Path) -> list[str]:
    """TR-DPO: 8 pairs per step, the reference moved halfway to the policy after every step, checkpoints at 2, 4."""
    return ["--model", "tiny", "--dataset", str(data / "pairs"), "--kernels", "all=reference", "--bf16", "False",
            "--max_steps", "4", "--logging_steps", "1", "--learning_rate", "1e-3", "--report_to", "none",
            "--save_strategy", "steps", "--save_steps", "2", "--seed", "0", "--disable_tqdm", "True",
            "--sync_ref_model", "True", "--ref_model_sync_steps", "1", "--ref_model_mixup_alpha", "0.5",
            "--per_device_train_batch_size", str(4 * per_process), "--output_dir", str(output_dir)]


def _runs(data: Path, root: Path, per_process: int, *, resume: bool) -> list[dict]:
    """The online runs and TR-DPO run A, then (``resume``) run B from A's checkpoint-2 (module docstring)."""
    runs = [{"trainer": name, "argv": _online_argv(name, data, per_process, root / name)} for name in ONLINE]
    # The top-entropy mask's quantile over both processes' tokens (TRL's), as one process takes it over its batch.
    runs.append({"trainer": "grpo", "argv": [*_online_argv("grpo", data, per_process, root / "grpo-entropy"),
                                             "--top_entropy_quantile", "0.5"]})
    runs.append({"trainer": "grpo", "argv": _tools_argv(data, per_process, root / "grpo-tools"), "tools": True})
    runs.append({"trainer": "dpo", "argv": _trdpo_argv(data, per_process, root / "trdpo")})
    if resume:
        runs.append({"trainer": "dpo", "argv": _trdpo_argv(data, per_process, root / "trdpo-resumed"),
                     "resume": str(root / "trdpo" / "checkpoint-2")})
    return runs


def _result(root: Path, name: str) -> dict:
    return json.loads((root / name / distributed.RESULT_FILE).read_text())


def _steps(result: dict) -> list[dict]:
    return [entry for entry in result["logs"] if "loss" in entry]


def _assert_logs_match(actual: list[dict], expected: list[dict], name: str) -> None:
    assert len(actual) == len(expected) > 0, f"{name}: {len(actual)} logged steps, expected {len(expected)}"
    for ours, theirs in zip(actual, expected, strict=True):
        compared = {key for key, value in theirs.items()
                    if isinstance(value, (int, float)) and not any(part in key for part in _UNCOMPARED)}
        assert compared <= ours.keys(), f"{name} step {theirs['step']}: missing {compared - ours.keys()}"
        for key in sorted(compared):
            assert_close(torch.tensor(float(ours[key])), torch.tensor(float(theirs[key])),
                         name=f"{name} step {theirs['step']} {key}")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 arithmetic prompts, 32 preference pairs (saved without a test split: no evaluation pass) and a randomly
    initialised tiny reward model saved with the preset tokenizer."""
    from transformers import LlamaForSequenceClassification

    from fusedrl.cli import presets

    root = tmp_path_factory.mktemp("data")
    presets.load_preset_dataset("arithmetic", "train", kind="prompt", n=16).save_to_disk(str(root / "prompts"))
    presets.load_preset_dataset("arithmetic", "train", kind="prompt", n=16,
                                conversational=True).save_to_disk(str(root / "chat_prompts"))
    presets.load_preset_dataset("arithmetic", "train", n=32).save_to_disk(str(root / "pairs"))
    tokenizer = presets.build_tokenizer()
    config = presets.load_preset_model("tiny", tokenizer=tokenizer).config
    config.num_labels, config.architectures = 1, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reward_model = LlamaForSequenceClassification(config)
    reward_model.save_pretrained(root / "reward_model")
    tokenizer.save_pretrained(root / "reward_model")
    return root


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    """The runs of :func:`_runs` but the resumed one, in this process with twice the per-process batch; returns
    their root directory."""
    root = tmp_path_factory.mktemp("single")
    distributed.register_test_rewards()
    try:
        for spec in _runs(data, root, per_process=2, resume=False):
            distributed.run(spec["trainer"], spec["argv"], spec.get("resume"), tools=spec.get("tools", False))
    finally:
        unregister_reward(distributed.REWARD_NAME)
    return root


@pytest.fixture(scope="module", params=["ddp", "zero2", "fsdp2", "zero3"])
def launched(request, data, tmp_path_factory) -> tuple[str, Path]:
    """``(config, root)``: every run of :func:`_runs` in one 2-process launch under ``config``."""
    config = request.param
    root = tmp_path_factory.mktemp(config)
    runs_file = root / "runs.json"
    runs_file.write_text(json.dumps(_runs(data, root, per_process=1, resume=True)))
    result = distributed.launch(lambda port: distributed.launch_argv(config, runs_file, num_processes=NUM_PROCESSES,
                                                                     port=port), timeout=RUN_TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(distributed.failure_report(result, config))
    return config, root


@pytest.mark.parametrize("trainer", ONLINE)
def test_online_trainer_matches_one_process(trainer, launched, single):
    config, root = launched
    _assert_logs_match(_steps(_result(root, trainer)), _steps(_result(single, trainer)), f"{config} {trainer}")
    assert _result(root, trainer)["reward_models"] == [REWARD_PLACEMENT[config]]


def test_grpo_top_entropy_mask_is_taken_over_every_process(launched, single):
    """Each process holds half the batch: with a per-process quantile the masks (and every metric after step 1's
    loss) would differ from one process's; the gathered threshold (grpo_loss.py) makes them TRL's."""
    config, root = launched
    _assert_logs_match(_steps(_result(root, "grpo-entropy")), _steps(_result(single, "grpo-entropy")),
                       f"{config} GRPO top_entropy_quantile=0.5")


def test_grpo_tool_turns_run_in_step_under_sharding(launched, single):
    """One generation round: a first turn, then one tool turn for the 4 rows that called the tool (all on process
    0); their continuations call nothing. 4 calls in 8 rows: call_frequency 0.5."""
    config, root = launched
    result, expected = _result(root, "grpo-tools"), _result(single, "grpo-tools")
    assert [entry["tools/call_frequency"] for entry in _steps(result)] == [0.5]
    _assert_logs_match(_steps(result), _steps(expected), f"{config} GRPO with tools")
    assert expected["generate_calls"] == [2]
    # Sharded: process 1 samples a dummy row in every tool turn; a whole model per process: it samples nothing.
    assert result["generate_calls"] == [2, 2 if config in ("fsdp2", "zero3") else 1]


def test_trdpo_saves_and_resumes(launched, single):
    config, root = launched
    uninterrupted = _steps(_result(root, "trdpo"))
    _assert_logs_match(uninterrupted, _steps(_result(single, "trdpo")), f"{config} TR-DPO")
    resumed = _steps(_result(root, "trdpo-resumed"))  # the log history of steps 1-2 comes from the checkpoint
    assert [entry["step"] for entry in resumed] == [1, 2, 3, 4]
    _assert_logs_match(resumed[2:], uninterrupted[2:], f"{config} TR-DPO resumed at step 2")
    # The saved reference is the whole model (a ZeRO-3 partition would be empty tensors), as one process saved it.
    name = f"checkpoint-2/{checkpoint.REF_MODEL_FILE}"
    saved = safetensors.torch.load_file(root / "trdpo" / name)
    expected = safetensors.torch.load_file(single / "trdpo" / name)
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        assert_close(saved[key], tensor, name=f"{config} reference {key}")
