"""The demo's diffusion stage: the tiny Stable Diffusion pipeline (``presets.diffusion``, built from configs) trained
towards one colour with ``fusedrl.AlignPropTrainer`` (the reward's gradient through the sampling chain), then, from
the same untrained pipeline, with ``fusedrl.DDPOTrainer`` (policy gradient over the chain's log-probs), on the
default kernels. The recipe and why: ``presets.diffusion.DIFFUSION_DEMO_RECIPE``.

Before and after each run, the same prompts from the same starting noise are sampled and scored (the evaluation
batch); the stage prints the per-epoch reward of both trainers and the evaluation rewards, and writes
``diffusion_curve.json``, ``diffusion_curve.png`` (reward per epoch) and ``diffusion_samples.png`` (rows: the
untrained pipeline, after AlignProp, after DDPO; columns: the evaluation prompts).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fusedrl.cli.presets.diffusion import DIFFUSION_DEMO_RECIPE, build_tiny_pipeline
from fusedrl.trainers.diffusion.alignprop import AlignPropTrainer
from fusedrl.trainers.diffusion.alignprop_config import AlignPropConfig
from fusedrl.trainers.diffusion.common import save_image_grid
from fusedrl.trainers.diffusion.ddpo import DDPOTrainer
from fusedrl.trainers.diffusion.ddpo_config import DDPOConfig
from fusedrl.trainers.diffusion.pipeline import DiffusionPipeline
from fusedrl.trainers.diffusion.prompts import ANIMALS, get_prompt_function
from fusedrl.trainers.diffusion.rewards import get_diffusion_reward

TRAINERS = {"alignprop": (AlignPropTrainer, AlignPropConfig), "ddpo": (DDPOTrainer, DDPOConfig)}


def _evaluate(pipeline: DiffusionPipeline, reward_fn, negative_embeds: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean reward and images ``[E, 3, H, W]`` of the evaluation batch: the first E animals, the recipe's noise."""
    recipe = DIFFUSION_DEMO_RECIPE
    prompts = list(ANIMALS[:recipe["eval_images"]])
    generator = torch.Generator().manual_seed(recipe["eval_seed"])
    out = pipeline.sample(pipeline.encode_prompts(prompts), negative_embeds, generator=generator,
                          **recipe["eval_sampling"])
    rewards, _ = reward_fn(out.images, prompts, [{} for _ in prompts])
    return float(torch.as_tensor(rewards, dtype=torch.float32).mean()), out.images


def _train(name: str, output_dir: Path, kernels: str | None) -> dict:
    recipe = DIFFUSION_DEMO_RECIPE
    trainer_cls, config_cls = TRAINERS[name]
    pipeline = DiffusionPipeline(build_tiny_pipeline(recipe["pipeline_seed"]), use_lora=False)
    reward_fn = get_diffusion_reward(recipe["reward"], **recipe["reward_kwargs"])
    config = config_cls(output_dir=str(output_dir / name), kernels=kernels, log_image_freq=0, save_freq=10**6,
                        **recipe[name])
    trainer = trainer_cls(config, reward_fn, get_prompt_function(recipe["prompts"]), pipeline)
    before, images_before = _evaluate(pipeline, reward_fn, trainer.neg_prompt_embed)
    start = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - start
    after, images_after = _evaluate(pipeline, reward_fn, trainer.neg_prompt_embed)
    curve = [entry["reward_mean"] for entry in history if "reward_mean" in entry]
    return {"curve": curve, "eval_before": before, "eval_after": after, "train_seconds": seconds,
            "target_met": after - before >= recipe["target_eval_rise"][name],
            "images_before": images_before, "images_after": images_after}


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        ax.plot(range(1, len(result["curve"]) + 1), result["curve"], marker=".", label=f"{name} (sampled, per epoch)")
    ax.set(xlabel="epoch", ylabel=f"reward ({DIFFUSION_DEMO_RECIPE['reward']})",
           title="Diffusion stage: tiny Stable Diffusion pipeline")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    recipe = DIFFUSION_DEMO_RECIPE
    table = Table(title=f"fusedrl demo: diffusion ({recipe['reward']} {recipe['reward_kwargs']}), full fine-tuning")
    for column in ("trainer", "epochs", "reward per epoch: first -> last", "eval batch: before -> after",
                   "target rise", "train s"):
        table.add_column(column, justify="right")
    for name, result in results.items():
        curve = result["curve"]
        table.add_row(name, str(len(curve)), f"{curve[0]:.3f} -> {curve[-1]:.3f}",
                      f"{result['eval_before']:.3f} -> {result['eval_after']:.3f}",
                      f">= {recipe['target_eval_rise'][name]}: {'met' if result['target_met'] else 'MISSED'}",
                      f"{result['train_seconds']:.1f}")
    Console().print(table)


def run_stage(output_dir: Path, *, kernels: str | None = None) -> dict:
    """Train both, write the curve, the image grid and ``diffusion_curve.json``; returns the JSON-able results with
    ``target_met`` (both trainers raised the evaluation reward by their recipe's margin)."""
    results = {name: _train(name, output_dir, kernels) for name in TRAINERS}
    first = next(iter(results.values()))
    grid = torch.cat([first["images_before"]] + [result["images_after"] for result in results.values()])
    save_image_grid(grid, output_dir / "diffusion_samples.png", num_columns=first["images_before"].shape[0])
    _plot(results, output_dir / "diffusion_curve.png")
    _print_table(results)
    summary = {name: {k: v for k, v in result.items() if not k.startswith("images")}
               for name, result in results.items()}
    summary["target_met"] = all(result["target_met"] for result in results.values())
    (output_dir / "diffusion_curve.json").write_text(json.dumps(summary, indent=2))
    return summary
