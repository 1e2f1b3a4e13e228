"""Diffusion trainer cases: optimizer steps of fusedrl's DDPOTrainer / AlignPropTrainer on the tiny Stable Diffusion
pipeline, per kernel selection and checkpointing setting, next to TRL 0.23's trainers (run in their own environment).

    python -m benchmarks.diffusion_trainers CASE PATH [--quick] --pipeline DIR --json FILE    (the worker)

Legend: B images per optimizer step, S DDIM steps per chain, R image side in pixels (latents R/2 x R/2: the tiny
VAE's scale factor is 2).

The runner (:func:`run_case`, called by ``run.py`` in its own process) saves the tiny pipeline once per case
(``fusedrl.cli.presets.diffusion.build_tiny_pipeline``, its UNet's ``sample_size`` set to R/2) and starts one worker
per path, one after another, each loading that directory as a user would: fusedrl's trainers from the path,
TRL's through ``DefaultDDPOStableDiffusionPipeline(path)``. A path with ``python`` set runs its worker with that
interpreter: TRL 0.23 (the last release with DDPO and AlignProp) needs transformers 4.x, so it lives in a separate
virtualenv (``benchmarks/README.md``, "Diffusion trainers"). The worker imports neither fusedrl nor TRL at module
level, and a TRL path never imports fusedrl: the reward and prompt functions are defined here, the same for all.

One step is one epoch configured to hold exactly one optimizer step (``case.config``): DDPO samples B chains
(guided, eta 1), scores them, and trains on all S steps of each (B x S backward passes accumulated into one AdamW
step); AlignProp samples B chains with gradients through all S steps (truncation start 0), scores them and takes
one AdamW step. Worker order: glibc set to unmap freed blocks >= 1 MiB (``measure.py``); step 1 untimed (the first
calls compile fusedrl's ops); step 2 untimed, measuring memory: after ``malloc_trim``, peak = VmHWM - VmRSS over the
step (activations, gradients, optimizer state; the weights and the interpreter excluded); then glibc's usual
large-block thresholds and the timed steps, ``time.perf_counter()`` around ``trainer.step(epoch, global_step)``.
The split times the trainer's ``_generate_samples`` (both packages name it so): sampling (for AlignProp, the
chain's forward with gradients and the decode) against the rest (rewards, backward, AdamW, logging).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import importlib.util
import itertools
import json
import os
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
from benchmarks import cases, measure, worker

NUM_THREADS = 2  # the reference machine's cores; workers never run concurrently
# The interpreter of TRL 0.23's environment (built as benchmarks/README.md says); its absence skips the trl paths.
TRL_PYTHON_ENV = "FUSEDRL_BENCH_TRL023_PYTHON"
TRL_PYTHON = os.environ.get(TRL_PYTHON_ENV, "/tmp/trl023-venv/bin/python")
# Every path gets these prompts in this order (a fixed cycle, so no path's RNG stream depends on them).
PROMPTS = ("cat", "dog", "horse", "monkey", "rabbit", "zebra", "owl", "fox")


@dataclass(frozen=True)
class DiffusionPath:
    """Which package's trainer runs (``fusedrl`` or ``trl``), with which fusedrl kernels and config overrides, and
    under which interpreter (``python``; None: the runner's own)."""

    package: str
    label: str
    kernels: str | None = None
    # Extra config fields of this path only (e.g. checkpointing off), as (name, value) pairs.
    config: tuple[tuple[str, object], ...] = ()
    python: str | None = None

    def unavailable(self) -> str | None:
        if self.python is not None:
            if not os.access(self.python, os.X_OK):
                return (f"no TRL 0.23 environment: {self.python} is not an executable (build it as "
                        f"benchmarks/README.md says, or point {TRL_PYTHON_ENV} at one)")
            return None
        missing = [name for name in (self.package, "diffusers") if importlib.util.find_spec(name) is None]
        return f"{', '.join(missing)} not installed" if missing else None


PATHS: dict[str, DiffusionPath] = {
    "fusedrl": DiffusionPath("fusedrl", "fusedrl, default kernels"),
    "fusedrl_reference": DiffusionPath("fusedrl", "fusedrl, kernels all=reference", kernels="all=reference"),
    "fusedrl_no_ckpt": DiffusionPath("fusedrl", "fusedrl, default kernels, gradient_checkpointing=False",
                                     config=(("gradient_checkpointing", False),)),
    "trl": DiffusionPath("trl", "TRL 0.23.1 in its own environment", python=TRL_PYTHON),
}
# trainer name -> (config class, trainer class); fusedrl exports them at the top level, TRL 0.23 did too.
TRAINERS = {"ddpo": ("DDPOConfig", "DDPOTrainer"), "alignprop": ("AlignPropConfig", "AlignPropTrainer")}


# ----------------------------------------------------------------------------------------------------------- worker


def brightness(images, prompts, prompt_metadata):
    """Mean pixel value per image ``[B]`` of ``images`` ``[B, 3, H, W]`` in [0, 1]; differentiable (AlignProp).
    fusedrl's ``brightness`` reward, written out so that a TRL worker does not import fusedrl."""
    return images.float().mean(dim=(1, 2, 3)), {}


def cycling_prompts() -> Callable[[], tuple[str, dict]]:
    prompts = itertools.cycle(PROMPTS)
    return lambda: (next(prompts), {})


def _settings(case: cases.TrainerCase, spec: DiffusionPath, shape, num_steps: int, out_dir: str) -> dict:
    """Config fields of one path: the shared ones, the case's, then the path's own (fusedrl's extra fields only
    for fusedrl paths)."""
    settings = {
        "num_epochs": num_steps, "sample_num_steps": shape["S"], "train_batch_size": shape["B"], "seed": 0,
        # fp32 everywhere: TRL's default fp16 needs CUDA; no tracker, no checkpoint within the run.
        "mixed_precision": "no", "log_with": None, "save_freq": num_steps + 1, **case.config,
    }
    if case.trainer == "ddpo":
        settings["sample_batch_size"] = shape["B"]
    if spec.package == "fusedrl":
        settings.update({"output_dir": out_dir, "log_image_freq": 0})
        if spec.kernels is not None:
            settings["kernels"] = spec.kernels
    else:
        settings["logdir"] = out_dir
    settings.update(spec.config)
    return settings


def _build_trainer(case: cases.TrainerCase, spec: DiffusionPath, settings: dict, pipeline_dir: str):
    module = importlib.import_module(spec.package)
    config_cls, trainer_cls = (getattr(module, name) for name in TRAINERS[case.trainer])
    config = config_cls(**settings)
    if spec.package == "fusedrl":
        return trainer_cls(config, brightness, cycling_prompts(), pipeline_dir)  # loads it (LoRA, use_lora=True)
    from accelerate import PartialState

    # TRL's pipeline warns through accelerate's logger that the directory has no LoRA weights yet, and that logger
    # raises RuntimeError ("You must initialize the accelerate state") unless the state exists: create it first.
    PartialState()
    pipeline = module.DefaultDDPOStableDiffusionPipeline(pipeline_dir, use_lora=True)
    trainer = trainer_cls(config, brightness, cycling_prompts(), pipeline)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)  # fusedrl's step() draws no bar either
    return trainer


def _record_trl_logs(trainer) -> list[dict]:
    """TRL's trainers log only to accelerate trackers: returns a list that receives every scalar they pass to
    ``accelerator.log`` from now on (fusedrl's trainers keep ``log_history``)."""
    logged: list[dict] = []
    log = trainer.accelerator.log

    def record(values, step=None, log_kwargs=None):
        # Scalars only: TRL's DDPO also logs the whole reward array.
        entry = {key: float(value) for key, value in values.items()
                 if isinstance(value, (int, float)) or (hasattr(value, "reshape") and value.reshape(-1).shape[0] == 1)}
        logged.append({**entry, "step": step})
        return log(values, step=step, log_kwargs=log_kwargs or {})

    trainer.accelerator.log = record
    return logged


def _timed_sampling(trainer) -> list[float]:
    """A list that receives the seconds of each call of the trainer's ``_generate_samples`` (wrapped on the
    instance)."""
    spent: list[float] = []
    generate = trainer._generate_samples

    @functools.wraps(generate)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    trainer._generate_samples = timed
    return spent


def _kernel_backends(trainer) -> dict | None:
    with trainer.kernel_context():
        from fusedrl.ops.dispatch import kernel_backends

        return kernel_backends("cpu")


def _environment(package: str) -> dict:
    from importlib import metadata

    names = ("torch", "transformers", "diffusers", "peft", "accelerate", package)
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": sys.executable, "versions": versions}


def measure_path(case: cases.TrainerCase, path: str, *, quick: bool, pipeline_dir: str) -> dict:
    torch.set_num_threads(NUM_THREADS)
    os.environ["HF_HUB_OFFLINE"] = "1"  # the pipeline is a local directory; nothing may be downloaded
    load_start = os.getloadavg()
    libc = measure._glibc()
    measure._exact_allocator(libc)
    spec = PATHS[path]
    shape = case.quick_shape if quick else case.shape
    num_steps = case.quick_steps if quick else case.steps
    warmup = case.quick_warmup_steps if quick else case.warmup_steps
    with tempfile.TemporaryDirectory() as out_dir:
        settings = _settings(case, spec, shape, num_steps, out_dir)
        measure._reset_peak_rss()  # process_peak_mb: loading, trainer construction and every step
        setup_start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = _build_trainer(case, spec, settings, pipeline_dir)
        setup_s = time.perf_counter() - setup_start
        # VmHWM read after setup and after every step: the memory step resets it, and so does fusedrl's AlignProp
        # at each epoch's start (its logged memory/peak_rss_mb), so the process peak is the largest reading.
        hwm_kb = [measure._status_kb("VmHWM")]
        history = _record_trl_logs(trainer) if spec.package == "trl" else trainer.log_history
        sampling_calls_s = _timed_sampling(trainer)

        step_s, sampling_s, step_peaks_mb, global_step = [], [], [], 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for epoch in range(num_steps):
                memory_step = epoch == warmup - 1
                if memory_step:
                    measure._exact_allocator(libc)  # gc + malloc_trim: RSS holds live memory only
                    measure._reset_peak_rss()
                    baseline_kb = measure._status_kb("VmRSS")
                elif epoch == warmup:
                    measure._timing_allocator(libc)
                num_calls, start = len(sampling_calls_s), time.perf_counter()
                global_step = trainer.step(epoch, global_step)
                step_s.append(time.perf_counter() - start)
                sampling_s.append(sum(sampling_calls_s[num_calls:]))
                hwm_kb.append(measure._status_kb("VmHWM"))
                if memory_step:
                    step_peaks_mb.append((hwm_kb[-1] - baseline_kb) / 1024)
        process_peak_mb = max(hwm_kb) / 1024
        logs = [entry for entry in history if case.agreement_metric in entry]
        backends = _kernel_backends(trainer) if spec.package == "fusedrl" else None
        del trainer
        gc.collect()

    timed = slice(warmup, None)
    split = {"sampling_s": sampling_s, "rest_s": [s - g for s, g in zip(step_s, sampling_s)]}
    values = [entry[case.agreement_metric] for entry in logs]
    return {
        "times_s": step_s[timed],
        "warmup_s": sum(step_s[:warmup]),
        "step_times_s": step_s,
        "split_median_s": {key: statistics.median(v[timed]) for key, v in split.items()},
        "losses": values[: case.num_losses],
        "all_losses": values,
        "peak_mb": max(step_peaks_mb),
        "process_peak_mb": process_peak_mb,
        "setup_s": setup_s,
        "num_steps": num_steps,
        "warmup_steps": warmup,
        "kernel_backends": backends,
        "environment": _environment(spec.package) if spec.python is not None else None,
        "num_threads": torch.get_num_threads(),
        "loadavg_1min": [load_start[0], os.getloadavg()[0]],
    }


# ----------------------------------------------------------------------------------------------------------- runner


def save_pipeline(path: str | Path, image_size: int, seed: int = 0) -> Path:
    """The tiny pipeline (``seed``) with its UNet's native size set for ``image_size`` x ``image_size`` images,
    saved with ``save_pretrained``. The UNet is convolutional, so ``sample_size`` only sets the latents' size.

    Written so that TRL 0.23's transformers 4.57 loads the same weights and tokens as transformers 5 (both checked
    by the paths' first ``reward_mean`` agreeing):
    - the tokenizer directory also gets the vocabulary files: transformers 5 saves only ``tokenizer.json``, and
      4.57's slow ``CLIPTokenizer`` reads ``vocab.json`` / ``merges.txt`` (``TypeError: expected str, bytes or
      os.PathLike object, not NoneType`` without them);
    - the text encoder's weights are renamed to ``text_model.<name>``: transformers 5's ``CLIPTextModel`` saves
      them without that prefix, which 4.57 ignores ("newly initialized": a random encoder); transformers 5 loads
      the prefixed names (every Stable Diffusion checkpoint has them) to the same tensors."""
    import safetensors.torch

    from fusedrl.cli.presets.diffusion import build_tiny_pipeline, write_clip_tokenizer_files

    pipeline = build_tiny_pipeline(seed)
    scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    if image_size % (2 * scale):
        raise ValueError(f"image size R={image_size} must be a multiple of {2 * scale} (latents R/{scale}, halved "
                         "once by the UNet's down block)")
    pipeline.unet.register_to_config(sample_size=image_size // scale)
    pipeline.save_pretrained(path)
    write_clip_tokenizer_files(Path(path) / "tokenizer")
    weights = Path(path) / "text_encoder" / "model.safetensors"
    state = safetensors.torch.load_file(weights)
    safetensors.torch.save_file({name if name.startswith("text_model.") else f"text_model.{name}": tensor
                                 for name, tensor in state.items()}, weights, metadata={"format": "pt"})
    return Path(path)


def method_text(case: cases.TrainerCase, quick: bool) -> str:
    """How a diffusion case was measured, for the report (its trainer table's method paragraph)."""
    steps = case.quick_steps if quick else case.steps
    warmup = case.quick_warmup_steps if quick else case.warmup_steps
    return (f"{steps} optimizer steps per path (one epoch each), the first {warmup} untimed: step 1 compiles, "
            f"step {warmup} measures memory. s/step: wall time of `trainer.step(epoch, global_step)` (sampling, "
            "rewards, backward, AdamW, logging), median and min-max over the rest. `split`: median seconds in "
            "`_generate_samples` (sampling; AlignProp: the chain's forward with gradients and the decode) / the "
            "rest. Peak RSS MB: resident memory of the memory step above its start, after `malloc_trim` (glibc "
            "unmapping freed blocks >= 1 MiB), i.e. activations, gradients and optimizer state without the "
            "weights and the interpreter (the whole process's peak is `process_peak_mb` in the JSON). "
            f"`{case.agreement_metric}`: the first logged values, from the same seed, pipeline and prompts")


def run_case(case: cases.TrainerCase, *, quick: bool, run_worker: Callable[..., dict], log=print,
             only_paths: frozenset[str] | None = None) -> dict:
    """Every path of ``case`` through ``run_worker`` (run.py's fresh-process runner), all on one saved pipeline;
    the table and targets as the other trainer cases (``trainers.run_case``)."""
    from benchmarks import trainers

    shape = case.quick_shape if quick else case.shape
    with tempfile.TemporaryDirectory(prefix="fusedrl-bench-sd-") as pipeline_dir:
        save_pipeline(pipeline_dir, shape["R"])
        worker = functools.partial(run_worker, extra_args=("--pipeline", pipeline_dir))
        result = trainers.run_case(case, quick=quick, run_worker=worker, log=log, only_paths=only_paths,
                                   paths=PATHS)
    return {**result, "method": method_text(case, quick)}


def main(argv: list[str] | None = None) -> int:
    parser = worker.parser(__doc__)
    parser.add_argument("--pipeline", required=True, help="the saved tiny pipeline (run_case writes it)")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # trainers' prints must not mix with anything on stdout
        result = measure_path(cases.by_name(args.case), args.path, quick=args.quick, pipeline_dir=args.pipeline)
    Path(args.json).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
