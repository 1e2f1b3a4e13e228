"""Trainer cases: optimizer steps/s, peak RSS and the first logged losses of a fusedrl trainer next to TRL's.

    python -m benchmarks.trainers CASE PATH [--quick] --json FILE    (the worker; run.py starts one per path)

Legend: B pairs per device, P prompt tokens per row.

Each (case, path) runs in a fresh process, one after another: build the preset model (seeded) and save it, reset the
peak-RSS counter, construct the trainer from the checkpoint path as a TRL user would (each trainer loads or copies its
own reference model), then train ``steps`` optimizer steps, logging every step.

- Time: wall time between consecutive ``on_step_end`` callbacks, i.e. a whole optimizer step as the user waits for
  it: batch fetch and collation, policy and reference forward, backward, clipping, AdamW, logging. The first
  ``warmup_steps`` are not timed: step 1 compiles the fused op, and step 2 is still slower (measured for fusedrl at
  the full size, quiet machine: 5.0 s, 1.08 s, then 0.82-0.85 s; no recompile is logged). Each step's split is
  recorded too: ``training_step`` (forward, backward, gradient clipping), the AdamW step, the rest (batch fetch and
  collation, logging).
- Peak: the process's VmHWM at the end, after a reset just before the trainer was constructed: interpreter, imports,
  model, reference model, optimizer state and activations, everything ``/usr/bin/time -v`` would count except the
  benchmark's own model build. The allocator is left at glibc's defaults, as in a user's training script.
- Losses: the first ``num_losses`` logged losses; every path must agree with the base within ``loss_atol``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import cases, report

NUM_THREADS = 2  # the reference machine's cores; workers never run concurrently
_CONTEXT_HEADER = "Answer with the result only, in digits. Worked examples:\n"


# ------------------------------------------------------------------------------------------------------------ data


def long_prompt_dataset(num_pairs: int, prompt_tokens: int, tokenizer, seed: int = 0):
    """The preset arithmetic pairs with every prompt padded to exactly ``prompt_tokens`` tokens (BOS included) by a
    few-shot context in front of the question: a header, then ``a op b=c`` lines drawn from the train split with a
    per-row seeded RNG (so rows differ, and the same arguments give the same dataset), cut on the left to fit (the
    first line may be partial, as in a sliding window over a document). Completions are unchanged."""
    from datasets import Dataset

    from fusedrl.cli.presets.datasets import ARITHMETIC, preference_dataset

    pairs = preference_dataset(num_pairs, seed=seed)
    problems = ARITHMETIC.problems("train")
    prompts = []
    for row, question in enumerate(pairs["prompt"]):
        rng = random.Random(f"bench-context/{seed}/{row}")
        # Character-level tokenizer: one token per character, plus BOS.
        num_chars = prompt_tokens - 1 - len(_CONTEXT_HEADER) - len(question)
        examples = ""
        while len(examples) < num_chars:
            a, op, b = rng.choice(problems)
            examples += f"{a}{op}{b}={a + b if op == '+' else a - b}\n"
        prompt = _CONTEXT_HEADER + examples[len(examples) - num_chars:] + question
        if len(tokenizer(text=prompt)["input_ids"]) != prompt_tokens:
            raise AssertionError(f"row {row}: prompt is not {prompt_tokens} tokens")
        prompts.append(prompt)
    return Dataset.from_dict({"prompt": prompts, "chosen": pairs["chosen"], "rejected": pairs["rejected"]})


# ----------------------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class TrainerPath:
    """Which package's trainer runs (``fusedrl.trainers`` or ``trl``), with which fusedrl kernel selection."""

    module: str
    label: str
    kernels: str | None = None
    # Extra config fields of this path only (e.g. compile on), as (name, value) pairs.
    config: tuple[tuple[str, object], ...] = ()

    def unavailable(self) -> str | None:
        if importlib.util.find_spec(self.module.split(".")[0]) is None:
            return f"{self.module} is not installed"
        return None


PATHS: dict[str, TrainerPath] = {
    "fusedrl": TrainerPath("fusedrl.trainers", "fusedrl, default kernels"),
    "fusedrl_reference": TrainerPath("fusedrl.trainers", "fusedrl, linear_logprobs=reference",
                                     kernels="linear_logprobs=reference"),
    "fusedrl_compiled": TrainerPath("fusedrl.trainers", "fusedrl, compile=True, compile_blocks=True",
                                    config=(("compile", True), ("compile_blocks", True))),
    "trl": TrainerPath("trl", "trl, the same trainer"),
}
# trainer name -> (config class, trainer class) attribute names in a path's module.
TRAINERS = {"dpo": ("DPOConfig", "DPOTrainer"), "grpo": ("GRPOConfig", "GRPOTrainer")}


def char_code_reward(completions, **kwargs):
    """Mean ``ord(c) % 7 / 7`` over a completion's characters: meaningless, but it differs between completions of
    a random model (the exact answer never comes up), so advantages and losses are nonzero and comparable."""
    return [sum(ord(ch) % 7 for ch in text) / (7 * max(len(text), 1)) for text in completions]


def grpo_inputs(pairs):
    """GRPO's view of the benchmark pairs: prompt-only rows (``answer`` keeps the chosen completion), and the
    trainer's ``reward_funcs``: exact answer plus :func:`char_code_reward`, the same functions for every path."""
    from fusedrl.cli.presets import answer_reward

    rewards = [answer_reward, char_code_reward]
    return pairs.remove_columns("rejected").rename_column("chosen", "answer"), {"reward_funcs": rewards}


# ---------------------------------------------------------------------------------------------------------- worker


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """``perf_counter`` at train begin and at each step's begin, optimizer step start and end."""

        def __init__(self) -> None:
            self.marks: dict[str, list[float]] = {"begin": [], "pre_optimizer": [], "end": []}
            self.train_begin = 0.0
            self.rss_train_begin_mb = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_train_begin_mb = _status_mb("VmRSS")
            self.train_begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.marks["begin"].append(time.perf_counter())

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.marks["pre_optimizer"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks["end"].append(time.perf_counter())

    return StepTimer()


def measure(case: cases.TrainerCase, path: str, *, quick: bool) -> dict:
    torch.set_num_threads(NUM_THREADS)
    load_start = os.getloadavg()
    spec = PATHS[path]
    shape = case.quick_shape if quick else case.shape
    steps = case.quick_steps if quick else case.steps
    warmup = case.quick_warmup_steps if quick else case.warmup_steps
    module = importlib.import_module(spec.module)
    config_cls, trainer_cls = (getattr(module, name) for name in TRAINERS[case.trainer])

    from fusedrl.cli.presets.models import build_model
    from fusedrl.cli.presets.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    dataset = long_prompt_dataset(shape["B"] * steps, shape["P"], tokenizer)
    trainer_kwargs = {}
    if case.trainer == "grpo":
        dataset, trainer_kwargs = grpo_inputs(dataset)
    with tempfile.TemporaryDirectory() as tmp:
        build_model(case.model, tokenizer, seed=0).save_pretrained(f"{tmp}/model")
        gc.collect()
        settings = {
            "output_dir": f"{tmp}/out", "per_device_train_batch_size": shape["B"], "max_steps": steps,
            "logging_steps": 1, "bf16": False, "report_to": "none", "save_strategy": "no", "seed": 0,
            "disable_tqdm": True, **case.config,
        }
        if spec.kernels is not None:
            settings["kernels"] = spec.kernels
        settings.update(spec.config)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS: the peak below excludes building and saving the model
        rss_start_mb = _status_mb("VmRSS")
        setup_start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = trainer_cls(model=f"{tmp}/model", args=config_cls(**settings), train_dataset=dataset,
                                  processing_class=tokenizer, **trainer_kwargs)
        setup_s = time.perf_counter() - setup_start
        timer = _step_timer()
        trainer.add_callback(timer)
        # Trainer prints every log line when tqdm is off; the logs themselves are in state.log_history.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        peak_mb = _status_mb("VmHWM")

    marks = timer.marks
    ends = [timer.train_begin, *marks["end"]]
    step_s = [b - a for a, b in itertools.pairwise(ends)]
    split = {
        "training_step_s": [p - b for b, p in zip(marks["begin"], marks["pre_optimizer"])],
        "optimizer_s": [e - p for p, e in zip(marks["pre_optimizer"], marks["end"])],
    }
    split["other_s"] = [s - t - o for s, t, o in zip(step_s, split["training_step_s"], split["optimizer_s"])]
    metric = case.agreement_metric
    losses = [entry[metric] for entry in trainer.state.log_history if "loss" in entry and metric in entry]
    backends = None
    if spec.module.startswith("fusedrl"):
        from fusedrl.ops.dispatch import kernel_backends, use_kernels

        with use_kernels(**trainer._kernel_selection):
            backends = kernel_backends("cpu")
    return {
        "times_s": step_s[warmup:],
        "warmup_s": sum(step_s[:warmup]),
        "step_times_s": step_s,
        "split_median_s": {k: statistics.median(v[warmup:]) for k, v in split.items()},
        "losses": losses[: case.num_losses],
        "all_losses": losses,
        "peak_mb": peak_mb,
        "rss_start_mb": rss_start_mb,
        "rss_train_begin_mb": timer.rss_train_begin_mb,
        "setup_s": setup_s,
        "num_steps": steps,
        "warmup_steps": warmup,
        "kernel_backends": backends,
        "num_threads": torch.get_num_threads(),
        # 1-minute load averages at the start and end (2 cores: above ~2.5 other work shares the machine).
        "loadavg_1min": [load_start[0], os.getloadavg()[0]],
    }


# ---------------------------------------------------------------------------------------------------------- runner


def _summarise(raw: dict) -> dict:
    times = sorted(raw["times_s"])
    median = statistics.median(times)
    return {"time_median_s": median, "steps_per_s": 1.0 / median, "time_min_s": times[0], "time_max_s": times[-1],
            "timed_steps": len(times), **raw}


def run_case(case: cases.TrainerCase, *, quick: bool, run_worker: Callable[..., dict], log=print) -> dict:
    """Every path of ``case`` through ``run_worker(case, path, quick)`` (run.py's fresh-process runner)."""
    shape = case.quick_shape if quick else case.shape
    log(f"[{case.name}] {case.model} {' '.join(f'{k}={v}' for k, v in shape.items())} {case.dtype}")
    results: dict[str, dict] = {}
    for path in case.paths:
        reason = PATHS[path].unavailable()
        if reason:
            results[path] = {"skipped": reason}
            log(f"  {path:<18} skipped: {reason}")
            continue
        raw = run_worker(case, path, quick)
        if "error" in raw:
            results[path] = raw
            log(f"  {path:<18} FAILED: {raw['error']}")
            continue
        r = results[path] = _summarise(raw)
        log(f"  {path:<18} {r['steps_per_s']:.3f} steps/s  peak RSS {r['peak_mb']:8.0f} MB  losses "
            f"{', '.join(f'{v:.6f}' for v in r['losses'])}  (other processes {r['other_cpu_cores']:.2f} cores)")

    base = results.get(case.base, {})
    for path, r in results.items():
        if "time_median_s" not in r or "time_median_s" not in base:
            continue
        r["time_vs_base"] = r["time_median_s"] / base["time_median_s"]
        r["peak_vs_base"] = r["peak_mb"] / base["peak_mb"]
        pairs = list(zip(r["losses"], base["losses"]))
        r["loss_max_abs_diff_vs_base"] = max(abs(a - b) for a, b in pairs) if pairs else None
        r["losses_match_base"] = len(pairs) == case.num_losses and r["loss_max_abs_diff_vs_base"] <= case.loss_atol
    return {
        "kind": "trainer",
        "name": case.name,
        "op": case.op,
        "description": case.description,
        "model": case.model,
        "shape": dict(shape),
        "dtype": case.dtype,
        "base": case.base,
        "config": dict(case.config),
        "loss_atol": case.loss_atol,
        "agreement_metric": case.agreement_metric,
        "labels": {p: PATHS[p].label for p in case.paths},
        "paths": results,
        "targets": [report.evaluate(t, results) for t in case.targets],
    }


def _measured_text(target: dict) -> str:
    return f"not measured ({target['why']})" if target["measured"] is None else f"{target['measured']:.2f}x"


def case_markdown(case: dict, mode: str) -> list[str]:
    base = case["base"]
    metric = case.get("agreement_metric", "loss")
    shape = " ".join(f"{k}={v}" for k, v in case["shape"].items())
    measured = [r for r in case["paths"].values() if "time_median_s" in r]
    steps = measured[0]["num_steps"] if measured else "?"
    warmup = measured[0]["warmup_steps"] if measured else "?"
    lines = [
        f"### {case['name']}: {case['model']} {shape} {case['dtype']}",
        "",
        case["description"] + ".",
        "",
        (f"{steps} optimizer steps per path, the first {warmup} untimed (compiles); time per step is the wall time "
         "between consecutive steps' ends (data, forward, backward, optimizer, logging), median and min-max. "
         "Peak RSS: the whole worker process's VmHWM from trainer construction to the end of training. "
         "`split`: median seconds in forward + backward + clipping / AdamW / the rest (batch fetch, logging). "
         f"`{metric}`: the first logged values; `diff` is the max abs difference from {base}'s "
         f"(agreement: <= {case['loss_atol']:g}). `load`: 1-minute load average at the path's start and end."),
        "",
        (f"| path | steps/s | s/step (min-max) | time / {base} | peak RSS MB | peak / {base} | split s "
         f"| {metric} | diff | other CPU | load |"),
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for path, r in case["paths"].items():
        label = f"{path} ({case['labels'][path]})"
        if "time_median_s" not in r:
            reason = r.get("skipped") or f"FAILED: {r.get('error')}"
            lines.append(f"| {label} | - | - | - | - | - | - | {reason} | - | - | - |")
            continue
        split = " / ".join(f"{v:.2f}" for v in r["split_median_s"].values())
        diff = r.get("loss_max_abs_diff_vs_base")
        diff = "-" if diff is None else f"{diff:.1e}" + ("" if r["losses_match_base"] else " NO")
        lines.append(
            f"| {label} | {r['steps_per_s']:.3f} | {r['time_median_s']:.2f} ({r['time_min_s']:.2f}-"
            f"{r['time_max_s']:.2f}) | {r['time_vs_base']:.2f}x | {r['peak_mb']:,.0f} | {r['peak_vs_base']:.2f}x "
            f"| {split} | {', '.join(f'{v:.6f}' for v in r['losses'])} | {diff} | {r['other_cpu_cores']:.2f} "
            f"| {' / '.join(f'{v:.1f}' for v in r.get('loadavg_1min', []))} |"
        )
    if case["targets"]:
        lines += ["", "Targets" + (" (set for the full sizes; quick sizes only indicate)" if mode == "quick" else "")
                  + ":", ""]
        lines += [f"- **{t['status']}**: {t['text']}: measured {_measured_text(t)}" for t in case["targets"]]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case")
    parser.add_argument("path")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", required=True, help="file to write the result to")
    args = parser.parse_args(argv)
    result = measure(cases.by_name(args.case), args.path, quick=args.quick)
    Path(args.json).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
