"""``fusedrl dpo|orpo|kto|cpo ...``: build a trainer from command-line flags, a YAML config and presets, then train.

    fusedrl dpo --model tiny --dataset arithmetic --config cfg.yaml --kernels linear_logprobs=compiled \
        --learning_rate 5e-4 --max_steps 100 --output_dir runs/dpo

``--model`` and ``--dataset`` take a preset name (``fusedrl.cli.presets``) or a local path: a model directory
saved with ``save_pretrained``; a dataset saved with ``save_to_disk`` or a ``.json``/``.jsonl``/``.parquet``/``.csv``
file. Every field of the trainer's config (TRL's names) is a flag; precedence: flags > ``--config`` YAML > defaults.

Model loading: a model directory is handed to the trainer as a path, so ``model_init_kwargs`` (a JSON object) and
``trust_remote_code`` reach ``from_pretrained`` whole; ``--dtype`` and ``--attn_implementation`` (TRL's
``ModelConfig`` names) are entries of ``model_init_kwargs``. A preset is built in code: ``dtype`` and
``attn_implementation`` are applied to it, any other entry is refused. The tokenizer is ``--tokenizer PATH``, else
the one saved in the model directory (an error names the path when there is none: training a real checkpoint on
the presets' character tokenizer would feed it mismatched ids), else, for a preset, the character tokenizer.
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


# Files one of which every saved tokenizer has (fast: tokenizer.json; slow: a vocabulary or a SentencePiece model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
# model_init_kwargs entries a preset (built in code, never loaded) can honour.
PRESET_MODEL_KWARGS = ("dtype", "attn_implementation")


def _is_preset(spec: str) -> bool:
    from fusedrl.cli import presets

    if spec in presets.MODEL_PRESETS:
        return True
    if Path(spec).is_dir():
        return False
    raise SystemExit(
        f"--model {spec!r}: not a preset ({', '.join(presets.MODEL_PRESETS)}) nor a local model directory"
    )


def merge_model_flags(config, *, dtype: str | None, attn_implementation: str | None) -> None:
    """``--dtype`` / ``--attn_implementation`` as ``config.model_init_kwargs`` entries; a flag that contradicts an
    entry of ``model_init_kwargs`` is refused rather than one of them silently winning."""
    kwargs = dict(config.model_init_kwargs or {})
    for key, value in (("dtype", dtype), ("attn_implementation", attn_implementation)):
        if value is None:
            continue
        if key in kwargs and str(kwargs[key]).removeprefix("torch.") != value:
            raise SystemExit(f"--{key} {value} contradicts model_init_kwargs {{{key!r}: {kwargs[key]!r}}}; give it once")
        kwargs[key] = value
    if kwargs:
        config.model_init_kwargs = kwargs


def load_model(spec: str, tokenizer, config):
    """A preset built in code (seeded by ``config.seed``; ``dtype`` / ``attn_implementation`` of
    ``model_init_kwargs`` applied), or the directory ``spec`` itself: the trainer loads it with ``model_init_kwargs``
    and ``trust_remote_code`` (``fusedrl.trainers.models.load_causal_lm``)."""
    import torch

    from fusedrl.cli import presets
    from fusedrl.trainers.models import pretrained_kwargs

    if not _is_preset(spec):
        return spec
    model = presets.load_preset_model(spec, seed=config.seed, tokenizer=tokenizer)
    if config.model_init_kwargs:
        unused = sorted(set(config.model_init_kwargs) - set(PRESET_MODEL_KWARGS))
        if unused:
            raise SystemExit(f"--model {spec}: model_init_kwargs {unused} only apply to a model loaded from a "
                             f"directory; a preset is built in code and takes only {list(PRESET_MODEL_KWARGS)}")
        kwargs = pretrained_kwargs(config.model_init_kwargs, config.trust_remote_code, default_dtype=None)
        if isinstance(kwargs.get("dtype"), torch.dtype):
            model.to(kwargs["dtype"])
        if "attn_implementation" in kwargs:
            model.set_attn_implementation(kwargs["attn_implementation"])
        config.model_init_kwargs = None  # applied: the trainer would otherwise warn that it ignores them
    return model


def load_tokenizer(model_spec: str, tokenizer_spec: str | None, config):
    """``--tokenizer``, else the tokenizer saved in the model directory, else (a preset) the character tokenizer.
    A model directory without tokenizer files is an error naming the path and the fix."""
    from fusedrl.cli import presets

    if tokenizer_spec is None and _is_preset(model_spec):
        return presets.build_tokenizer()
    path = Path(tokenizer_spec or model_spec)
    flag = "--tokenizer" if tokenizer_spec else "--model"
    if not path.is_dir():
        raise SystemExit(f"--tokenizer {tokenizer_spec!r}: not a local tokenizer directory (one saved with "
                         "tokenizer.save_pretrained)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise SystemExit(f"{flag} {str(path)!r}: the directory has no tokenizer files ({', '.join(TOKENIZER_FILES)}). "
                         "fusedrl will not guess one (the presets' character tokenizer would feed a real checkpoint "
                         "mismatched ids): pass the model's tokenizer with --tokenizer PATH, or save it beside the "
                         "model (tokenizer.save_pretrained(PATH))")
    from fusedrl.trainers.models import load_tokenizer as load_saved_tokenizer

    try:
        return load_saved_tokenizer(str(path), config)
    except ValueError as error:
        raise SystemExit(f"{flag} {str(path)!r}: {error}") from error


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
    """Defaults for a machine without CUDA, placed first so a YAML file or a flag still overrides them: pinned host
    memory only matters for copies to a GPU. (Precision needs none: an unset ``bf16`` is chosen by the config,
    ``fusedrl.trainers.config``.)"""
    import torch

    if torch.cuda.is_available():
        return []
    return ["--dataloader_pin_memory", "False"]


def build_job(name: str, argv: list[str]) -> Job:
    from transformers import HfArgumentParser

    trainer_cls, config_cls, layout = _trainer_classes(name)
    ours = argparse.ArgumentParser(prog=f"fusedrl {name}", add_help=False)
    ours.add_argument("--model", required=True, help="preset name or local model directory")
    ours.add_argument("--tokenizer", help="local tokenizer directory (default: the model directory's tokenizer)")
    ours.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"),
                      help="dtype the model loads in (model_init_kwargs['dtype']; default float32)")
    ours.add_argument("--attn_implementation", help="eager, sdpa, flash_attention_2, ... "
                                                    "(model_init_kwargs['attn_implementation'])")
    ours.add_argument("--dataset", required=True, help="preset name, save_to_disk directory or data file")
    ours.add_argument("--config", help="YAML file of config fields")
    ours.add_argument("--num_rows", type=int, help="rows of a preset dataset to generate")
    # The YAML file's entries go first, so flags win; our own fields (model, tokenizer, dtype, ...) may be in it too.
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--config")
    config_file = first.parse_known_args(argv)[0].config
    known, rest = ours.parse_known_args((yaml_to_argv(config_file) if config_file else []) + argv)
    if "--output_dir" not in rest:
        rest += ["--output_dir", f"runs/{name}"]
    config_argv = _machine_defaults() + rest
    (config,) = HfArgumentParser(config_cls).parse_args_into_dataclasses(args=config_argv)
    merge_model_flags(config, dtype=known.dtype, attn_implementation=known.attn_implementation)
    tokenizer = load_tokenizer(known.model, known.tokenizer, config)
    model = load_model(known.model, tokenizer, config)
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
