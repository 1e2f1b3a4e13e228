"""Multi-adapter trainer case: K LoRA adapters trained together on one base (fusedrl's joint mode) next to K separate
single-adapter runs, DPO steps on the bench-head Llama.

    python -m benchmarks.multi_adapter CASE PATH [--quick] --json FILE    (the worker; run.py starts one per path)

Legend: K adapters trained by a path, B pairs per adapter per optimizer step, P prompt tokens per row, S timed
steps per adapter.

Every path trains adapters ``a0 .. a{K-1}`` of one PEFT model on the same saved checkpoint, each on its own dataset
(the benchmark pairs drawn with seed i for adapter ``ai``) with the same config; ``ref`` (an untrained adapter of the
same model, ``ref_adapter_name``) is every path's reference, so all paths run the same reference forwards. Adapter
``ai`` starts from the same LoRA weights in every path (seeded by its index), so ``ai``'s logged values must agree
wherever it trains: the contract of joint mode (``fusedrl/trainers/adapters/joint.py``), checked on every run.

- ``joint_kK``: one trainer with ``model_adapter_name=["a0", ...]`` (a single name for K=1) and
  ``train_dataset={"a0": ds0, ...}``: each step takes B pairs from every adapter's dataset and runs all K*B pairs in
  one forward and backward, rows routed per adapter by ``fusedrl.multi_lora_linear``.
- ``sequential_kK``: K trainers one after another in the worker, each a plain PEFT run of one adapter
  (``model_adapter_name="ai"``, ``train_dataset=ds_i``), each loading the checkpoint afresh.

Time: each run's steps are timed as ``benchmarks/trainers.py`` times them (wall time between step ends; the first
``warmup_steps`` untimed). Round j is step j of every adapter: one step of ``joint_kK``, the sum of step j over the K
runs of ``sequential_kK``. The reported time unit is the *adapter-step* (one adapter's step of B pairs): a round's
time over K, so every path's steps/s and ratios compare equal work; samples/s (pairs per second) is B over the median
adapter-step time, i.e. K*B*S / time with the median round for time.

Peak: as ``benchmarks/trainers.py``, per run: VmHWM after resetting it just before the model is loaded (interpreter
and imports, base model, adapters, optimizer state, activations). The freed heap of a previous run is trimmed
(``malloc_trim``) before the reset. ``peak_mb`` is a path's largest run peak (what the process needed);
``peak_sum_mb`` the sum of its runs' peaks (what K separate runs side by side need: the issue's "summed peak", the
``peak_sum_ratio_max`` target); ``peak_over_start_mb`` / ``peak_over_start_sum_mb`` the same above the RSS before the
path's first run (the model, optimizer and activations without the interpreter, imports and data).
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
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import cases, measure, trainers, worker
from benchmarks.trainer_data import long_prompt_dataset

# Every linear projection of the Llama trunk (the usual LoRA recipe); r 16 gives 0.3M parameters per adapter on
# the bench-head trunk against its 19.6M (embedding and head 8.2M each), so the base dominates each run's weights.
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
REF_ADAPTER = "ref"
# Adapter ai's LoRA A is drawn from this seed plus i (B starts at zero), the same in every path.
ADAPTER_SEED = 1000


@dataclass(frozen=True)
class AdapterPath:
    """``num_adapters`` adapters, trained together in one run (``joint``) or in as many single-adapter runs."""

    num_adapters: int
    joint: bool
    label: str

    def unavailable(self) -> str | None:
        return None if importlib.util.find_spec("peft") is not None else "peft is not installed"


PATHS: dict[str, AdapterPath] = {
    "joint_k1": AdapterPath(1, True, "fusedrl, adapter a0 alone (model_adapter_name='a0')"),
    "joint_k2": AdapterPath(2, True, "fusedrl, a0-a1 trained together (joint mode)"),
    "joint_k4": AdapterPath(4, True, "fusedrl, a0-a3 trained together (joint mode)"),
    "sequential_k2": AdapterPath(2, False, "fusedrl, 2 single-adapter PEFT runs one after another"),
    "sequential_k4": AdapterPath(4, False, "fusedrl, 4 single-adapter PEFT runs one after another"),
}


def adapter_names(num_adapters: int) -> list[str]:
    return [f"a{i}" for i in range(num_adapters)]


# ----------------------------------------------------------------------------------------------------------- worker


def _peft_model(model_dir: str, names: list[str]):
    """The checkpoint with LoRA adapters ``names`` (each seeded by its index) and the reference adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = None
    for name in names:
        torch.manual_seed(ADAPTER_SEED + int(name.removeprefix("a")))  # adapter_names: "a<index>"
        if model is None:
            model = get_peft_model(base, LoraConfig(**LORA), adapter_name=name)
        else:
            model.add_adapter(name, LoraConfig(**LORA))
    # LoRA B starts at zero, so the reference adapter is the base model whatever its A.
    model.add_adapter(REF_ADAPTER, LoraConfig(**LORA))
    return model  # the trainer activates and unfreezes the adapters its model_adapter_name lists


def _release_memory(libc) -> None:
    """Return what a finished run freed to the OS, so the next run's peak starts from live memory."""
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)


def _train_run(case: cases.TrainerCase, names: list[str], datasets: dict, tokenizer, model_dir: str, out_dir: str,
               shape, num_steps: int, libc) -> dict:
    """One trainer run of adapters ``names`` (together when several); its step times, logs and peaks."""
    from fusedrl import DPOConfig, DPOTrainer

    settings = {
        "output_dir": out_dir, "per_device_train_batch_size": shape["B"], "max_steps": num_steps,
        "logging_steps": 1, "bf16": False, "report_to": "none", "save_strategy": "no", "seed": 0,
        "disable_tqdm": True, "model_adapter_name": names[0] if len(names) == 1 else names,
        "ref_adapter_name": REF_ADAPTER,
        # Peaks are the process's RSS: the run stays on the CPU whatever the machine has.
        "use_cpu": True, **case.config,
    }
    train_dataset = datasets[names[0]] if len(names) == 1 else {name: datasets[name] for name in names}
    _release_memory(libc)
    measure._reset_peak_rss()
    rss_start_mb = measure._status_kb("VmRSS") / 1024
    setup_start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(_peft_model(model_dir, names), args=DPOConfig(**settings), train_dataset=train_dataset,
                             processing_class=tokenizer)
    setup_s = time.perf_counter() - setup_start
    timer = trainers._step_timer()
    trainer.add_callback(timer)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    peak_mb = measure._status_kb("VmHWM") / 1024
    ends = [timer.train_begin, *timer.marks["end"]]
    marks = timer.marks
    run = {
        "adapters": names,
        "step_s": [b - a for a, b in itertools.pairwise(ends)],
        "training_step_s": [p - b for b, p in zip(marks["begin"], marks["pre_optimizer"])],
        "optimizer_s": [e - p for p, e in zip(marks["pre_optimizer"], marks["end"])],
        "log_history": [entry for entry in trainer.state.log_history if "loss" in entry],
        "peak_mb": peak_mb,
        "rss_start_mb": rss_start_mb,
        "rss_train_begin_mb": timer.rss_train_begin_mb,
        "setup_s": setup_s,
        "kernel_backends": trainers._kernel_backends(trainer),
    }
    del trainer
    _release_memory(libc)
    return run


def _adapter_values(run: dict, metric: str) -> dict[str, list[float]]:
    """Each adapter's logged ``metric`` per step: ``<adapter>/<metric>`` in a joint run, ``<metric>`` alone."""
    names = run["adapters"]
    keys = {name: metric if len(names) == 1 else f"{name}/{metric}" for name in names}
    return {name: [entry[key] for entry in run["log_history"] if key in entry] for name, key in keys.items()}


def measure_path(case: cases.TrainerCase, path: str, *, quick: bool) -> dict:
    torch.set_num_threads(trainers.NUM_THREADS)
    load_start = os.getloadavg()
    spec = PATHS[path]
    shape = case.quick_shape if quick else case.shape
    num_steps = case.quick_steps if quick else case.steps
    warmup = case.quick_warmup_steps if quick else case.warmup_steps
    names = adapter_names(spec.num_adapters)
    libc = measure._glibc()

    from fusedrl.cli.presets.models import build_model
    from fusedrl.cli.presets.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    datasets = {name: long_prompt_dataset(shape["B"] * num_steps, shape["P"], tokenizer, seed=i,
                                          completion_tokens=shape.get("C"))
                for i, name in enumerate(names)}
    with tempfile.TemporaryDirectory() as tmp:
        build_model(case.model, tokenizer, seed=0).save_pretrained(f"{tmp}/model")
        groups = [names] if spec.joint else [[name] for name in names]
        runs = [_train_run(case, group, datasets, tokenizer, f"{tmp}/model", f"{tmp}/out{i}", shape, num_steps,
                           libc) for i, group in enumerate(groups)]

    k = spec.num_adapters
    # Round j: step j of every adapter; per adapter-step (B pairs) = the round's time over K.
    per_adapter_step = {key: [sum(values) / k for values in zip(*(run[key] for run in runs))]
                        for key in ("step_s", "training_step_s", "optimizer_s")}
    per_adapter_step["other_s"] = [s - t - o for s, t, o in zip(*per_adapter_step.values())]
    adapter_values: dict[str, list[float]] = {}
    for run in runs:
        adapter_values.update(_adapter_values(run, case.agreement_metric))
    peaks = [run["peak_mb"] for run in runs]
    # Above the RSS before the first run, not each run's own start: a later run starts above the first one's by
    # what the first left resident (measured ~95 MB at the quick size, with the first run's model freed), which a
    # separate run would allocate itself.
    over_start = [peak - runs[0]["rss_start_mb"] for peak in peaks]
    times = per_adapter_step["step_s"][warmup:]
    fusedrl_package = importlib.import_module("fusedrl")
    return {
        "times_s": times,
        "warmup_s": sum(per_adapter_step["step_s"][:warmup]) * k,
        "step_times_s": [run["step_s"] for run in runs],
        "split_median_s": {key: statistics.median(per_adapter_step[key][warmup:])
                           for key in ("training_step_s", "optimizer_s", "other_s")},
        "samples_per_s": shape["B"] / statistics.median(times),
        "num_adapters": k,
        "losses": adapter_values[names[0]][: case.num_losses],
        "all_losses": adapter_values[names[0]],
        "adapter_losses": adapter_values,
        "peak_mb": max(peaks),
        "peak_sum_mb": sum(peaks),
        "run_peaks_mb": peaks,
        "peak_over_start_mb": max(over_start),
        "peak_over_start_sum_mb": sum(over_start),
        "rss_start_mb": [run["rss_start_mb"] for run in runs],
        "rss_train_begin_mb": [run["rss_train_begin_mb"] for run in runs],
        "setup_s": sum(run["setup_s"] for run in runs),
        "num_steps": num_steps,
        "warmup_steps": warmup,
        "model_dtype": "float32",
        "kernel_backends": runs[0]["kernel_backends"],
        "fusedrl_source": str(Path(fusedrl_package.__file__).resolve().parent),
        "num_threads": torch.get_num_threads(),
        "loadavg_1min": [load_start[0], os.getloadavg()[0]],
    }


# ----------------------------------------------------------------------------------------------------------- runner


def method_text(case: cases.TrainerCase, quick: bool, results: dict[str, dict]) -> str:
    """How the case was measured, for the report (its trainer table's method paragraph), with each path's
    samples/s and summed peaks (the table's own columns are per adapter-step and per process)."""
    steps = case.quick_steps if quick else case.steps
    warmup = case.quick_warmup_steps if quick else case.warmup_steps
    measured = {path: r for path, r in results.items() if "samples_per_s" in r}
    samples = ", ".join(f"{path} {r['samples_per_s']:.2f}" for path, r in measured.items())
    sums = ", ".join(f"{path} {r['peak_sum_mb']:,.0f} MB ({r['peak_over_start_sum_mb']:,.0f} MB above the "
                     "interpreter and imports)" for path, r in measured.items() if not PATHS[path].joint)
    return (f"{steps} optimizer steps per run, the first {warmup} untimed (compiles). Unit of time: one "
            "adapter-step (one adapter's optimizer step of B pairs): a joint_kK step counts K, a sequential_kK "
            "round (step j of each of its K runs) counts K, so steps/s, s/step and the ratios compare equal work; "
            "median and min-max over the timed rounds. `split`: median seconds per adapter-step in forward + "
            "backward + clipping / AdamW / the rest. Samples/s (pairs per second, B / median s per adapter-step): "
            f"{samples or 'none measured'}. Peak RSS: the largest VmHWM of a path's runs, each reset just before "
            "its model is loaded (interpreter, imports, base, adapters, optimizer, activations); the summed peaks "
            "of the sequential runs (the issue's memory baseline: K separate runs side by side): "
            f"{sums or 'none measured'}. `{case.agreement_metric}`: adapter a0's first logged values (every "
            "adapter a path trains is compared with the same adapter in the base)")


def run_case(case: cases.TrainerCase, *, quick: bool, run_worker, log=print,
             only_paths: frozenset[str] | None = None) -> dict:
    """Every path of ``case`` through ``run_worker`` (run.py's fresh-process runner), tabled as the other trainer
    cases (``trainers.run_case``); the agreement covers every adapter a path shares with the base."""
    result = trainers.run_case(case, quick=quick, run_worker=run_worker, log=log, only_paths=only_paths,
                               paths=PATHS)
    results = result["paths"]
    base = results.get(case.base, {})
    for path, r in results.items():
        if "samples_per_s" not in r:
            continue
        log(f"  {path:<18} {r['samples_per_s']:.2f} samples/s  summed peaks {r['peak_sum_mb']:8.0f} MB")
        if "adapter_losses" not in base:
            continue
        diffs = [abs(a - b) for name, values in r["adapter_losses"].items()
                 for a, b in zip(values[: case.num_losses], base["adapter_losses"].get(name, []))]
        r["loss_max_abs_diff_vs_base"] = max(diffs) if diffs else None
        r["losses_match_base"] = bool(diffs) and max(diffs) <= case.loss_atol
    return {**result, "method": method_text(case, quick, results)}


def main(argv: list[str] | None = None) -> int:
    parser = worker.parser(__doc__)
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # trainers' prints must not mix with anything on stdout
        result = measure_path(cases.by_name(args.case), args.path, quick=args.quick)
    Path(args.json).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
