"""``fusedrl dpo|orpo|kto|cpo ...``: build a trainer from command-line flags, a YAML config and presets, then train.

    fusedrl dpo --model tiny --dataset arithmetic --config cfg.yaml --kernels linear_logprobs=compiled \
        --learning_rate 5e-4 --max_steps 100 --output_dir runs/dpo

``--model`` and ``--dataset`` take a preset name (``fusedrl.cli.presets``) or a local path: a model directory
saved with ``save_pretrained``; a dataset saved with ``save_to_disk`` or a ``.json``/``.jsonl``/``.parquet``/``.csv``
file. Every field of the trainer's config (TRL's names) is a flag; precedence: flags > ``--config`` YAML > defaults.
Several processes: ``--accelerate_config ddp|fsdp2|zero2|zero3|<yaml>`` (and ``--num_processes``) re-runs the
command under accelerate (``fusedrl.runtime.launcher``); ``accelerate launch -m fusedrl dpo ...`` works too.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Trainer name -> (module, trainer class, config class, preset dataset layout). Trainers are imported only when run.
TRAINERS = {
    "dpo": ("fusedrl.trainers.preference.dpo", "DPOTrainer", "DPOConfig", "paired"),
    "orpo": ("fusedrl.trainers.preference.orpo", "ORPOTrainer", "ORPOConfig", "paired"),
    "cpo": ("fusedrl.trainers.preference.cpo", "CPOTrainer", "CPOConfig", "paired"),
    "kto": ("fusedrl.trainers.preference.kto", "KTOTrainer", "KTOConfig", "unpaired"),
    # Sampling trainers: prompt-only data; rewards come from the config's reward_funcs (--reward_funcs accuracy ...).
    "grpo": ("fusedrl.trainers.online.grpo", "GRPOTrainer", "GRPOConfig", "prompts"),
    "rloo": ("fusedrl.trainers.online.rloo", "RLOOTrainer", "RLOOConfig", "prompts"),
    "ppo": ("fusedrl.trainers.online.ppo", "PPOTrainer", "PPOConfig", "prompts"),
    "online-dpo": ("fusedrl.trainers.online.online_dpo", "OnlineDPOTrainer", "OnlineDPOConfig", "prompts"),
}
# Dataset layout of a trainer -> the kind of rows a dataset preset generates for it (presets.load_preset_dataset).
PRESET_KINDS = {"paired": "preference", "unpaired": "unpaired", "prompts": "prompt"}
DATA_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Job:
    trainer_cls: type
    config: Any
    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any


def _trainer_classes(name: str) -> tuple[type, type, str]:
    module_name, trainer_name, config_name, layout = TRAINERS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise SystemExit(f"fusedrl {name}: this trainer is not available in this version ({error})") from error
    config_module = module if hasattr(module, config_name) else importlib.import_module(f"{module_name}_config")
    return getattr(module, trainer_name), getattr(config_module, config_name), layout


def yaml_to_argv(path: str | Path) -> list[str]:
    """A flat YAML mapping of config fields as ``--field value`` flags (lists become several values)."""
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: expected a mapping of config fields, got {type(values).__name__}")
    argv: list[str] = []
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(item) for item in items)]
    return argv


def load_model(spec: str, tokenizer, seed: int):
    from fusedrl.cli import presets

    if spec in presets.MODEL_PRESETS:
        return presets.load_preset_model(spec, seed=seed, tokenizer=tokenizer)
    if Path(spec).is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(spec)
    raise SystemExit(
        f"--model {spec!r}: not a preset ({', '.join(presets.MODEL_PRESETS)}) nor a local model directory"
    )


def load_tokenizer(model_spec: str):
    from fusedrl.cli import presets

    if Path(model_spec).is_dir() and (Path(model_spec) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_spec)
    return presets.build_tokenizer()


def load_datasets(spec: str, layout: str, *, num_rows: int | None = None, seed: int = 0):
    """(train, eval) datasets: a preset's train/test splits, or a local dataset (eval None unless it has splits)."""
    from fusedrl.cli import presets

    if spec in presets.DATASET_PRESETS:
        kind = PRESET_KINDS[layout]
        return (presets.load_preset_dataset(spec, "train", kind=kind, n=num_rows, seed=seed),
                presets.load_preset_dataset(spec, "test", kind=kind, seed=seed))
    import datasets

    path = Path(spec)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    elif path.suffix in DATA_FILE_TYPES:
        loaded = datasets.load_dataset(DATA_FILE_TYPES[path.suffix], data_files=str(path))
    else:
        raise SystemExit(
            f"--dataset {spec!r}: not a preset ({', '.join(presets.DATASET_PRESETS)}), a save_to_disk directory, "
            f"or a {'/'.join(DATA_FILE_TYPES)} file"
        )
    if isinstance(loaded, datasets.DatasetDict):
        return loaded["train"], loaded.get("test") or loaded.get("validation")
    return loaded, None


def _machine_defaults() -> list[str]:
    """Defaults for a machine without CUDA, placed first so a YAML file or a flag still overrides them: TRL's
    ``bf16=True`` default fails there (transformers refuses bf16 without a GPU unless ``use_cpu``), and pinned host
    memory only matters for copies to a GPU."""
    import torch

    if torch.cuda.is_available():
        return []
    return ["--bf16", "False", "--dataloader_pin_memory", "False"]


def build_job(name: str, argv: list[str]) -> Job:
    from transformers import HfArgumentParser

    trainer_cls, config_cls, layout = _trainer_classes(name)
    ours = argparse.ArgumentParser(prog=f"fusedrl {name}", add_help=False)
    ours.add_argument("--model", required=True, help="preset name or local model directory")
    ours.add_argument("--dataset", required=True, help="preset name, save_to_disk directory or data file")
    ours.add_argument("--config", help="YAML file of config fields")
    ours.add_argument("--num_rows", type=int, help="rows of a preset dataset to generate")
    known, rest = ours.parse_known_args(argv)
    if "--output_dir" not in rest:
        rest += ["--output_dir", f"runs/{name}"]
    config_argv = _machine_defaults() + (yaml_to_argv(known.config) if known.config else []) + rest
    (config,) = HfArgumentParser(config_cls).parse_args_into_dataclasses(args=config_argv)
    tokenizer = load_tokenizer(known.model)
    model = load_model(known.model, tokenizer, seed=config.seed)
    train, evaluation = load_datasets(known.dataset, layout, num_rows=known.num_rows, seed=config.seed)
    return Job(trainer_cls, config, model, tokenizer, train, evaluation)


def resume_target(value: str | None) -> str | bool | None:
    """``--resume_from_checkpoint``: ``true``/``last`` resumes from the last complete checkpoint of ``output_dir``,
    a path from that checkpoint; unset or ``false`` starts fresh."""
    if value is None or value.lower() in ("false", "no", ""):
        return None
    if value.lower() in ("true", "yes", "last"):
        return True
    if not Path(value).is_dir():
        raise SystemExit(f"--resume_from_checkpoint {value!r}: not a checkpoint directory; pass one, or 'last' for "
                         "the last complete checkpoint of --output_dir")
    return value


def run(name: str, argv: list[str]) -> int:
    from fusedrl.runtime import launcher

    code = launcher.relaunch(name, argv)  # --accelerate_config: train in several processes started from here
    if code is not None:
        return code
    job = build_job(name, argv)
    launcher.adopt_cpu_fsdp()  # FSDP on a machine without CUDA (tests): see its docstring
    trainer = job.trainer_cls(
        model=job.model, args=job.config, train_dataset=job.train_dataset, eval_dataset=job.eval_dataset,
        processing_class=job.tokenizer,
    )
    trainer.train(resume_from_checkpoint=resume_target(job.config.resume_from_checkpoint))
    trainer.save_model(job.config.output_dir)
    if job.eval_dataset is not None:
        print(trainer.evaluate())
    # Every rank reaches this line, then the process group is torn down before the interpreter exits: a gloo group
    # left to interpreter shutdown can abort a rank (SIGABRT, seen on the 2-process CPU runs) while its peer still
    # holds a connection, and torchrun then reports the run as failed after it finished.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return 0
