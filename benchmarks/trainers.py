"""Trainer cases: optimizer steps/s, peak RSS and the first logged losses of a fusedrl trainer next to TRL's.

    python -m benchmarks.trainers CASE PATH [--quick] --json FILE    (the worker; run.py starts one per path)

Legend: B pairs per device, P prompt tokens per row, C completion tokens per preference row.

Each (case, path) runs in a fresh process, one after another: build the preset model (seeded) and save it, reset the
peak-RSS counter, construct the trainer from the checkpoint path as a TRL user would (each trainer loads or copies its
own reference model, in the case's dtype), then train ``steps`` optimizer steps, logging every step. The worker uses
public APIs only (trainer classes, configs, ``fusedrl.*`` functions), so it runs unchanged against fusedrl at an
older commit (a path with ``commit``: run.py starts its worker in a snapshot of that commit's ``fusedrl/``).

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

import contextlib
import gc
import importlib.util
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import cases, report, worker
from benchmarks.trainer_data import grpo_inputs, long_prompt_dataset

NUM_THREADS = 2  # the reference machine's cores; workers never run concurrently
REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class TrainerPath:
    """Which package's trainer runs (``fusedrl.trainers`` or ``trl``), with which fusedrl kernel selection.

    ``commit``: fusedrl as of that git commit instead of the working tree (run.py extracts the commit's ``fusedrl/``
    into a temporary directory and starts the worker there). ``trl_compact``: TRL with its fused LM head scoring only
    the labelled positions, as it does on CUDA/XPU (see :func:`_trl_compact_lm_head`).
    """

    module: str
    label: str
    kernels: str | None = None
    # Extra config fields of this path only (e.g. compile on), as (name, value) pairs.
    config: tuple[tuple[str, object], ...] = ()
    commit: str | None = None
    trl_compact: bool = False

    def unavailable(self) -> str | None:
        if importlib.util.find_spec(self.module.split(".")[0]) is None:
            return f"{self.module} is not installed"
        if self.commit is not None:
            done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{self.commit}^{{commit}}"],
                                  cwd=REPO_ROOT, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                return f"commit {self.commit} is not in this clone"
        return None


PATHS: dict[str, TrainerPath] = {
    "fusedrl": TrainerPath("fusedrl.trainers", "fusedrl, default kernels"),
    "fusedrl_reference": TrainerPath("fusedrl.trainers", "fusedrl, linear_logprobs=reference",
                                     kernels="linear_logprobs=reference"),
    "fusedrl_compiled": TrainerPath("fusedrl.trainers", "fusedrl, compile=True, compile_blocks=True",
                                    config=(("compile", True), ("compile_blocks", True))),
    f"fusedrl@{cases.START_COMMIT}": TrainerPath("fusedrl.trainers", f"fusedrl at {cases.START_COMMIT}, where "
                                                 "issue 10 starts; default kernels", commit=cases.START_COMMIT),
    "fusedrl_plain": TrainerPath("fusedrl.trainers", "fusedrl, shared_prefix=False (every row whole)",
                                 config=(("shared_prefix", False),)),
    f"fusedrl@{cases.ISSUE15_START}": TrainerPath("fusedrl.trainers", f"fusedrl at {cases.ISSUE15_START}, where "
                                                  "issue 15 (shared prefixes) starts", commit=cases.ISSUE15_START),
    "trl": TrainerPath("trl", "trl, the same trainer"),
    "trl_compact": TrainerPath("trl", "trl, LM head forced to score completion tokens only (as on GPU)",
                               trl_compact=True),
}
# trainer name -> (config class, trainer class) attribute names in a path's module.
TRAINERS = {"dpo": ("DPOConfig", "DPOTrainer"), "grpo": ("GRPOConfig", "GRPOTrainer")}


@contextlib.contextmanager
def _trl_compact_lm_head() -> Iterator[list[str]]:
    """TRL's fused LM head scoring only the labelled positions on this CPU, as it does on a Triton device.

    TRL 1.16's fused LM-head forward (``add_fused_lm_head`` in ``trl/trainer/utils.py``) decides
    ``compact = _use_triton(hidden_states.device)``: on CUDA/XPU it keeps the labelled rows (``hidden[mask]``), on
    CPU it scores every position, prompt and padding included, and masks afterwards. ``_use_triton`` is imported into
    that module by name and used there for this decision only, so replacing the module attribute (with
    ``unittest.mock.patch.object``, undone on exit, in this worker process only) changes nothing else: the chunked
    kernel keeps its own ``_use_triton`` (``trl.kernels.chunked_logprob``) and stays on its torch tiles. Yields the
    device types of the calls: none means this TRL no longer asks, and the caller fails instead of silently
    measuring the uncompacted path.
    """
    from trl.trainer import utils

    calls: list[str] = []

    def compact_on_every_device(device: torch.device) -> bool:
        calls.append(device.type)
        return True

    with mock.patch.object(utils, "_use_triton", compact_on_every_device):
        yield calls


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


def _count_trunk_positions(trainer) -> dict[str, int]:
    """A forward pre-hook on the decoder trunk of the policy and the reference model: positions each trunk forward
    runs (rows x length of its input; a KV-cached decoding step counts its new tokens only), summed. The same count
    for every path, TRL's included."""
    counts = {"positions": 0}

    def count(module, args, kwargs):
        tensor = kwargs.get("input_ids")
        if tensor is None:
            tensor = kwargs.get("inputs_embeds")
        if tensor is None and args:
            tensor = args[0]
        if tensor is not None:
            counts["positions"] += int(tensor.shape[0] * tensor.shape[1])

    models = {id(m): m for m in (trainer.model, getattr(trainer, "ref_model", None)) if m is not None}
    for model in models.values():
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.get_decoder().register_forward_pre_hook(count, with_kwargs=True)
    return counts


def _settings(case: cases.TrainerCase, spec: TrainerPath, shape, steps: int, out_dir: str) -> dict:
    """The config fields of one path: the shared ones, the case's, the case's dtype, then the path's own."""
    settings = {
        "output_dir": out_dir, "per_device_train_batch_size": shape["B"], "max_steps": steps,
        "logging_steps": 1, "bf16": False, "report_to": "none", "save_strategy": "no", "seed": 0,
        "disable_tqdm": True, **case.config,
    }
    if case.dtype != "float32":
        # The model (and the reference model, loaded the same way) in the case's dtype, for every path alike;
        # bf16 also turns on the trainers' autocast, as TRL's own bf16 default does.
        settings["model_init_kwargs"] = {"dtype": case.dtype}
        settings["bf16"] = case.dtype == "bfloat16"
        # transformers refuses bf16=True without a bf16 GPU unless the run is declared CPU-only ("Your setup
        # doesn't support bf16/gpu"); on a CUDA machine the trainers keep the GPU.
        settings["use_cpu"] = not torch.cuda.is_available()
    if spec.kernels is not None:
        settings["kernels"] = spec.kernels
    settings.update(spec.config)
    return settings


def _kernel_backends(trainer) -> dict | None:
    """The kernel each fusedrl op ran on under this trainer's selection; None where this fusedrl (another commit)
    has no such record. Informational only, so it never fails a measurement."""
    try:
        from fusedrl.ops.dispatch import kernel_backends, use_kernels

        with use_kernels(**getattr(trainer, "_kernel_selection", {})):
            return kernel_backends("cpu")
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


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
    dataset = long_prompt_dataset(shape["B"] * steps, shape["P"], tokenizer, completion_tokens=shape.get("C"))
    trainer_kwargs = {}
    if case.trainer == "grpo":
        dataset, trainer_kwargs = grpo_inputs(dataset)
    compact = _trl_compact_lm_head() if spec.trl_compact else contextlib.nullcontext([])
    with tempfile.TemporaryDirectory() as tmp, compact as compact_calls:
        build_model(case.model, tokenizer, seed=0).save_pretrained(f"{tmp}/model")
        gc.collect()
        settings = _settings(case, spec, shape, steps, f"{tmp}/out")
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
        trunk = _count_trunk_positions(trainer)
        # Trainer prints every log line when tqdm is off; the logs themselves are in state.log_history.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        peak_mb = _status_mb("VmHWM")
    if spec.trl_compact and not compact_calls:
        raise RuntimeError("trl_compact: TRL never called trl.trainer.utils._use_triton, so the compact switch this "
                           "path forces is not where it was (TRL 1.16); the measurement would be plain TRL")

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
    fusedrl_package = importlib.import_module("fusedrl")
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
        "model_dtype": str(trainer.model.dtype).removeprefix("torch."),
        "kernel_backends": _kernel_backends(trainer) if spec.module.startswith("fusedrl") else None,
        # Where `import fusedrl` resolved (the trainers of fusedrl paths; presets and data for every path).
        "fusedrl_source": str(Path(fusedrl_package.__file__).resolve().parent),
        "trl_compact_calls": len(compact_calls) if spec.trl_compact else None,
        # Trunk positions per optimizer step (generation included), and fusedrl's own count of its training
        # forwards: what ran and what the plain layout would have run (None where this fusedrl has no record).
        "trunk_positions_per_step": trunk["positions"] / steps,
        "shared_prefix_counts": dict(trainer.prefix_sharing.counts) if hasattr(trainer, "prefix_sharing") else None,
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


def run_case(case: cases.TrainerCase, *, quick: bool, run_worker: Callable[..., dict], log=print,
             only_paths: frozenset[str] | None = None, paths: dict | None = None) -> dict:
    """Every path of ``case`` (those in ``only_paths`` when given) through ``run_worker(case, path, quick)``
    (run.py's fresh-process runner). ``paths``: the path registry of the case's worker (default :data:`PATHS`;
    ``diffusion_trainers.PATHS`` for the diffusion cases)."""
    paths = PATHS if paths is None else paths
    shape = case.quick_shape if quick else case.shape
    log(f"[{case.name}] {case.model} {' '.join(f'{k}={v}' for k, v in shape.items())} {case.dtype}")
    results: dict[str, dict] = {}
    for path in case.paths:
        reason = "not selected (--paths)" if only_paths is not None and path not in only_paths else None
        reason = reason or paths[path].unavailable()
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
        "labels": {p: paths[p].label for p in case.paths},
        "paths": results,
        "targets": [report.evaluate(t, results) for t in case.targets],
    }


def main(argv: list[str] | None = None) -> int:
    parser = worker.parser(__doc__)
    args = parser.parse_args(argv)
    result = measure(cases.by_name(args.case), args.path, quick=args.quick)
    Path(args.json).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
