"""``fusedrl ddpo|alignprop ...``: train a diffusers Stable Diffusion pipeline with DDPO or AlignProp from flags, a
YAML config and presets, then save it.

    fusedrl ddpo --pipeline tiny --reward brightness --prompts animals --num_epochs 2 --output_dir runs/ddpo
    fusedrl alignprop --pipeline ./my-sd --reward aesthetic --reward_kwargs '{"path": "./aesthetic"}' \
        --config alignprop.yaml --truncated_backprop_timestep 10

``--pipeline``: ``tiny`` (the tiny pipeline built from configs, ``fusedrl.cli.presets.diffusion``) or a local
directory saved with ``save_pretrained`` (never a hub id: nothing is downloaded). ``--reward`` / ``--prompts``: a name
of the diffusion reward / prompt-function registry (``fusedrl.trainers.diffusion.rewards`` / ``.prompts``), with
their keyword arguments as a JSON object (``--reward_kwargs``, ``--prompt_kwargs``). Every field of the trainer's
config (TRL's names: ``sample_num_steps``, ``train_learning_rate``, ...) is a flag; precedence: flags > ``--config``
YAML > defaults. The run trains ``num_epochs`` epochs (or resumes with ``--resume_from``), saves the trained weights
to ``output_dir/final`` (LoRA weights as safetensors, or the whole UNet) and writes ``output_dir/log_history.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
from pathlib import Path

from fusedrl.cli.launch import yaml_to_argv

# Command -> (module, trainer class, config class).
TRAINERS = {
    "ddpo": ("fusedrl.trainers.diffusion.ddpo", "DDPOTrainer", "fusedrl.trainers.diffusion.ddpo_config", "DDPOConfig"),
    "alignprop": ("fusedrl.trainers.diffusion.alignprop", "AlignPropTrainer",
                  "fusedrl.trainers.diffusion.alignprop_config", "AlignPropConfig"),
}
PIPELINE_PRESETS = ("tiny",)


def _json_object(flag: str, text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"{flag}: not valid JSON ({error}); pass an object such as '{{\"color\": [0, 0, 1]}}'") \
            from error
    if not isinstance(value, dict):
        raise SystemExit(f"{flag}: expected a JSON object of keyword arguments, got {type(value).__name__}")
    return value


def _pipeline_path(spec: str, seed: int, scratch: Path) -> str:
    """A local pipeline directory for ``spec``: the tiny preset is built from configs and saved once into
    ``scratch``; anything else must be a directory with a ``model_index.json``."""
    if spec in PIPELINE_PRESETS:
        from fusedrl.cli.presets.diffusion import save_tiny_pipeline

        return str(save_tiny_pipeline(scratch / spec, seed=seed))
    path = Path(spec)
    if not (path / "model_index.json").is_file():
        raise SystemExit(f"--pipeline {spec!r}: not a preset ({', '.join(PIPELINE_PRESETS)}) nor a local diffusers "
                         "pipeline directory (no model_index.json there); fusedrl never downloads a model")
    return str(path)


def _tuple_fields_take_several_values(parser) -> None:
    """A tuple field (AlignProp's ``truncated_rand_backprop_minmax``) as ``--field 0 10`` or a YAML list:
    HfArgumentParser would read one string into it."""
    for action in parser._actions:
        if isinstance(action.default, tuple) and action.default:
            action.nargs = len(action.default)
            action.type = type(action.default[0])


def build_parser(name: str) -> argparse.ArgumentParser:
    ours = argparse.ArgumentParser(prog=f"fusedrl {name}", add_help=False)
    ours.add_argument("--pipeline", required=True, help="'tiny' or a local diffusers pipeline directory")
    ours.add_argument("--reward", required=True, help="a registered diffusion reward (brightness, aesthetic, ...)")
    ours.add_argument("--reward_kwargs", help="JSON object of the reward's keyword arguments")
    ours.add_argument("--prompts", default="animals", help="a registered prompt function (default: animals)")
    ours.add_argument("--prompt_kwargs", help="JSON object of the prompt function's keyword arguments")
    ours.add_argument("--config", help="YAML file of config fields")
    return ours


def run(name: str, argv: list[str]) -> int:
    from transformers import HfArgumentParser

    from fusedrl.trainers.diffusion.prompts import get_prompt_function
    from fusedrl.trainers.diffusion.rewards import get_diffusion_reward

    module_name, trainer_name, config_module, config_name = TRAINERS[name]
    trainer_cls = getattr(importlib.import_module(module_name), trainer_name)
    config_cls = getattr(importlib.import_module(config_module), config_name)
    known, rest = build_parser(name).parse_known_args(argv)
    if "--output_dir" not in rest:
        rest += ["--output_dir", f"runs/{name}"]
    config_argv = (yaml_to_argv(known.config) if known.config else []) + rest
    parser = HfArgumentParser(config_cls)
    _tuple_fields_take_several_values(parser)
    try:
        (config,) = parser.parse_args_into_dataclasses(args=config_argv)
    except ValueError as error:  # the config's own checks: name the field and the fix
        raise SystemExit(f"fusedrl {name}: {error}") from error
    reward = get_diffusion_reward(known.reward, **_json_object("--reward_kwargs", known.reward_kwargs))
    prompts = get_prompt_function(known.prompts, **_json_object("--prompt_kwargs", known.prompt_kwargs))
    with tempfile.TemporaryDirectory(prefix="fusedrl-pipeline-") as scratch:
        pipeline = _pipeline_path(known.pipeline, config.seed, Path(scratch))
        trainer = trainer_cls(config, reward, prompts, pipeline)
        history = trainer.train()
        final = trainer.save_pretrained(Path(config.output_dir) / "final")
    (Path(config.output_dir) / "log_history.json").write_text(json.dumps(history, indent=2, default=float))
    print(f"fusedrl {name}: {len(history)} logged steps; weights in {final}")
    return 0
