"""``make demo`` / ``fusedrl demo``: DPO, then GRPO, on the embedded default, no network.

A tiny Llama (preset ``demo``) built from a config, the generated character-level tokenizer and the bundled
arithmetic preference task (chosen = the right answer, rejected = a typical mistake). It trains with
``fusedrl.DPOTrainer`` on the CPU, then prints held-out reward accuracy, margins, losses, the kernel backends and
peak memory, and writes ``metrics.json`` and ``curves.png`` to the output directory.

Stage 2 (``--skip_grpo`` leaves it out): ``fusedrl.GRPOTrainer`` continues from the DPO-trained policy on prompts of
the same task that this policy answers right now and then (:func:`grpo_prompts`), rewarded for exact answers
(``presets.recipes.GRPO_DEMO_RECIPE``); it prints the reward curve (mean reward and exact-answer accuracy per window
of steps) and writes ``grpo_curve.json`` and ``grpo_curve.png``.

Stage 3 (``--skip_diffusion`` leaves it out): the tiny Stable Diffusion pipeline trained with AlignProp and with
DDPO towards one colour (``fusedrl/cli/demo_diffusion.py``); writes ``diffusion_curve.json``,
``diffusion_curve.png`` and ``diffusion_samples.png`` (before / after image grid).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from fusedrl.cli import presets
from fusedrl.cli.presets.recipes import GRPO_DEMO_RECIPE
from fusedrl.ops.dispatch import config_kernels, kernel_backends, parse_kernel_spec
from fusedrl.ops.logprobs import token_logprobs
from fusedrl.trainers.callbacks import use_rich_progress
from fusedrl.trainers.online.grpo import GRPOTrainer
from fusedrl.trainers.online.grpo_config import GRPOConfig
from fusedrl.trainers.online.rollout import generate_completions
from fusedrl.trainers.preference.dpo import DPOTrainer
from fusedrl.trainers.preference.dpo_config import DPOConfig

ACCURACY_TARGET = presets.DEMO_RECIPE["target_heldout_reward_accuracy"]


def build_demo_trainer(output_dir: str | Path, *, max_steps: int | None = None, kernels: str | None = None,
                       logging_steps: int | None = None, callbacks=None) -> DPOTrainer:
    """The demo's trainer: ``presets.DEMO_RECIPE`` (model, data sizes, hyper-parameters), fp32 on CPU."""
    recipe = presets.DEMO_RECIPE
    fields = dict(recipe["config"])
    fields.pop("eval_steps", None)  # the demo evaluates before and after training, not during
    if max_steps is not None:
        fields["max_steps"] = max_steps
    if logging_steps is not None:
        fields["logging_steps"] = logging_steps
    tokenizer = presets.build_tokenizer()
    config = DPOConfig(
        output_dir=str(output_dir), kernels=kernels, report_to="none", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(), **fields,
    )
    data = {split: presets.load_preset_dataset(recipe["dataset"], split, seed=config.seed) for split in ("train", "test")}
    return DPOTrainer(
        model=presets.load_preset_model(recipe["model"], seed=recipe["model_seed"], tokenizer=tokenizer),
        args=config,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def _curves(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [entry for entry in log_history if "loss" in entry and "step" in entry]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot([e["step"] for e in train], [e["loss"] for e in train], marker=".")
    loss_ax.set(xlabel="step", ylabel="DPO loss", title="training loss")
    steps = [e["step"] for e in train]
    acc_ax.plot(steps, [e.get("rewards/accuracies", float("nan")) for e in train], marker=".", label="batch accuracy")
    acc_ax.axhline(ACCURACY_TARGET, linestyle="--", color="grey", label=f"held-out target {ACCURACY_TARGET}")
    acc_ax.set(xlabel="step", ylabel="reward accuracy", ylim=(0, 1.05), title="reward accuracy and margin")
    margin_ax = acc_ax.twinx()
    margin_ax.plot(steps, [e.get("rewards/margins", float("nan")) for e in train], color="tab:orange", marker=".",
                   label="batch margin")
    margin_ax.set(ylabel="reward margin")
    lines = acc_ax.get_legend_handles_labels()
    more = margin_ax.get_legend_handles_labels()
    acc_ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fusedrl demo: DPO on the bundled arithmetic task (held-out pairs)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in ("rewards/accuracies", "rewards/margins", "loss", "logps/chosen", "logps/rejected"):
        table.add_row(f"eval {key}", f"{metrics['before'][key]:.4f}", f"{metrics['after'][key]:.4f}")
    table.add_row("train loss (first / last logged)", f"{metrics['train_loss_first']:.4f}",
                  f"{metrics['train_loss_last']:.4f}")
    console = Console()
    console.print(table)
    console.print(f"kernel backends: {metrics['kernel_backends']}")
    console.print(f"steps: {metrics['steps']}, train time {metrics['train_seconds']:.1f} s, "
                  f"peak RSS {metrics['peak_rss_mb']:.0f} MB")
    verdict = "met" if metrics["target_met"] else "MISSED"
    console.print(f"held-out reward accuracy {metrics['after']['rewards/accuracies']:.3f} "
                  f"(target > {ACCURACY_TARGET}): {verdict}")


def _eval(trainer: DPOTrainer) -> dict[str, float]:
    return {key.removeprefix("eval_"): value for key, value in trainer.evaluate().items()}


def answer_probabilities(model, dataset, *, temperature: float) -> torch.Tensor:
    """``[N]`` fp32: the probability that one completion sampled from ``model`` at ``temperature`` is row n's
    ``answer`` followed by EOS (teacher-forced product of those tokens' probabilities; ``dataset`` has string
    ``prompt`` and ``answer`` columns). The character-level tokenizer makes the prompt's ids a prefix of
    prompt + answer's."""
    tokenizer = presets.build_tokenizer()
    rows = [(len(tokenizer(prompt)["input_ids"]), tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id])
            for prompt, answer in zip(dataset["prompt"], dataset["answer"], strict=True)]
    width = max(len(ids) for _, ids in rows)
    input_ids_NT = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels_NT = torch.full_like(input_ids_NT, -100)
    attention_NT = torch.zeros_like(input_ids_NT)
    for n, (num_prompt, ids) in enumerate(rows):
        input_ids_NT[n, :len(ids)] = torch.tensor(ids)
        attention_NT[n, :len(ids)] = 1
        labels_NT[n, num_prompt - 1:len(ids) - 1] = torch.tensor(ids[num_prompt:])  # position t predicts t + 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits_NTV = model(input_ids=input_ids_NT.to(device), attention_mask=attention_NT.to(device)).logits
    model.train(was_training)
    return token_logprobs(logits_NTV.float(), labels_NT.to(device), temperature=temperature).sum(-1).exp()


def grpo_prompts(model, *, seed: int):
    """The GRPO stage's ``num_prompts`` training problems: the train split in the seed's shuffled order, keeping
    those whose exact answer ``model`` samples with a probability inside the recipe's ``answer_prob_range`` at the
    sampling temperature (all of them when the range is None); if too few qualify, the most probable of the rest
    fill up the pool."""
    recipe = GRPO_DEMO_RECIPE
    if recipe.get("answer_prob_range") is None:
        return presets.load_preset_dataset(recipe["dataset"], "train", kind="prompt", n=recipe["num_prompts"],
                                           seed=seed)
    everything = presets.load_preset_dataset(recipe["dataset"], "train", kind="prompt", seed=seed,
                                             n=len(presets.DATASET_PRESETS[recipe["dataset"]].problems("train")))
    probs_N = answer_probabilities(model, everything, temperature=recipe["config"]["temperature"]).tolist()
    low, high = recipe["answer_prob_range"]
    chosen = [n for n, p in enumerate(probs_N) if low <= p <= high][: recipe["num_prompts"]]
    rest = sorted((n for n in range(len(probs_N)) if n not in chosen), key=lambda n: -probs_N[n])
    return everything.select(chosen + rest[: recipe["num_prompts"] - len(chosen)])


def build_grpo_trainer(model, output_dir: str | Path, *, max_steps: int | None = None, kernels: str | None = None,
                       callbacks=None) -> GRPOTrainer:
    """The demo's GRPO stage: ``GRPO_DEMO_RECIPE`` on ``model`` (the DPO-trained policy), fp32 on CPU."""
    recipe = GRPO_DEMO_RECIPE
    fields = dict(recipe["config"])
    if max_steps is not None:
        fields["max_steps"] = max_steps
    config = GRPOConfig(output_dir=str(output_dir), kernels=kernels, report_to="none", save_strategy="no",
                        disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(), **fields)
    with config_kernels(parse_kernel_spec(kernels or "")):  # the log-probs of the pool's filter, as the trainer's
        prompts = grpo_prompts(model, seed=config.seed)
    return GRPOTrainer(model, reward_funcs=recipe["reward_funcs"], args=config, train_dataset=prompts,
                       processing_class=presets.build_tokenizer(), callbacks=callbacks)


def reward_curve(log_history: list[dict], window: int) -> list[dict]:
    """Mean reward and exact-answer accuracy per ``window`` steps, from the logged GRPO metrics."""
    rows: dict[int, list[dict]] = {}
    for entry in log_history:
        if "reward" in entry and "step" in entry:
            rows.setdefault((entry["step"] - 1) // window, []).append(entry)
    return [{"steps": f"{k * window + 1}-{(k + 1) * window}",
             "reward": sum(e["reward"] for e in group) / len(group),
             "accuracy": sum(e["rewards/accuracy/mean"] for e in group) / len(group)}
            for k, group in sorted(rows.items())]


def _greedy_accuracy(model, dataset) -> float:
    rollout = generate_completions(model, presets.build_tokenizer(), dataset["prompt"], max_completion_length=4,
                                   do_sample=False)
    return sum(c.strip() == a for c, a in zip(rollout.completions_text, dataset["answer"], strict=True)) / len(dataset)


def _grpo_stage(model, output_dir: Path, *, max_steps: int | None, kernels: str | None) -> dict:
    trainer = build_grpo_trainer(model, output_dir / "grpo", max_steps=max_steps, kernels=kernels)
    use_rich_progress(trainer)
    before = _greedy_accuracy(trainer.model, trainer.train_dataset)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    curve = reward_curve(trainer.state.log_history, GRPO_DEMO_RECIPE["curve_window"])
    first = curve[0]["accuracy"]
    tail = curve[-2:] if len(curve) > 2 else curve[-1:]
    last = sum(row["accuracy"] for row in tail) / len(tail)
    result = {
        "curve": curve, "train_seconds": seconds, "steps": trainer.state.global_step,
        "accuracy_first_window": first, "accuracy_last_windows": last,
        "greedy_accuracy_before": before, "greedy_accuracy_after": _greedy_accuracy(trainer.model,
                                                                                   trainer.train_dataset),
        "target_met": last - first >= GRPO_DEMO_RECIPE["target_accuracy_rise"],
    }
    (output_dir / "grpo_curve.json").write_text(json.dumps(result, indent=2))
    _grpo_plot(curve, output_dir / "grpo_curve.png")
    return result


def _grpo_plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(curve)), [row["reward"] for row in curve], marker=".", label="mean reward")
    ax.plot(range(len(curve)), [row["accuracy"] for row in curve], marker=".", label="exact-answer accuracy")
    ax.set_xticks(range(len(curve)), [row["steps"] for row in curve], rotation=45, fontsize=7)
    ax.set(xlabel="GRPO steps", ylim=(0, max(1.0, *(row["reward"] for row in curve))), title="GRPO reward curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grpo_table(grpo: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fusedrl demo: GRPO from the DPO policy (sampled completions, "
                        f"T = {GRPO_DEMO_RECIPE['config']['temperature']})")
    for column in ("steps", "mean reward", "exact-answer accuracy"):
        table.add_column(column, justify="right")
    for row in grpo["curve"]:
        table.add_row(row["steps"], f"{row['reward']:.3f}", f"{row['accuracy']:.3f}")
    console = Console()
    console.print(table)
    verdict = "met" if grpo["target_met"] else "MISSED"
    console.print(f"GRPO: {grpo['steps']} steps in {grpo['train_seconds']:.1f} s; accuracy "
                  f"{grpo['accuracy_first_window']:.3f} -> {grpo['accuracy_last_windows']:.3f} (target rise >= "
                  f"{GRPO_DEMO_RECIPE['target_accuracy_rise']}): {verdict}; greedy accuracy on its prompts "
                  f"{grpo['greedy_accuracy_before']:.3f} -> {grpo['greedy_accuracy_after']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedrl demo", description=__doc__)
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--max_steps", type=int, help="override the recipe's step count")
    parser.add_argument("--kernels", help="backend selection, e.g. linear_logprobs=compiled")
    parser.add_argument("--grpo_steps", type=int, help="override the GRPO stage's step count")
    parser.add_argument("--skip_grpo", action="store_true", help="leave out the GRPO stage")
    parser.add_argument("--skip_diffusion", action="store_true", help="leave out the diffusion stage")
    args = parser.parse_args(argv)
    # The recipe's thread count: a model this small is dominated by per-op overhead, where a second OpenMP thread
    # mostly waits at barriers (measured in presets/recipes.py).
    torch.set_num_threads(presets.DEMO_RECIPE.get("torch_num_threads", torch.get_num_threads()))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_demo_trainer(output_dir, max_steps=args.max_steps, kernels=args.kernels)
    use_rich_progress(trainer)
    before = _eval(trainer)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    after = _eval(trainer)
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    with config_kernels(parse_kernel_spec(args.kernels or "")):
        backends = kernel_backends()
    metrics = {
        "before": before,
        "after": after,
        "train_loss_first": train_logs[0]["loss"],
        "train_loss_last": train_logs[-1]["loss"],
        "steps": trainer.state.global_step,
        "train_seconds": train_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kernel_backends": backends,
        "target_met": after["rewards/accuracies"] > ACCURACY_TARGET,
        "log_history": trainer.state.log_history,
    }
    _curves(trainer.state.log_history, output_dir / "curves.png")
    _table(metrics)
    if not args.skip_grpo:
        metrics["grpo"] = _grpo_stage(trainer.model, output_dir, max_steps=args.grpo_steps, kernels=args.kernels)
        _grpo_table(metrics["grpo"])
    if not args.skip_diffusion:
        from fusedrl.cli.demo_diffusion import run_stage  # imports diffusers: only when the stage runs

        metrics["diffusion"] = run_stage(output_dir, kernels=args.kernels)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    written = [output_dir / "metrics.json", output_dir / "curves.png"]
    if not args.skip_grpo:
        written += [output_dir / "grpo_curve.json", output_dir / "grpo_curve.png"]
    if not args.skip_diffusion:
        written += [output_dir / name for name in ("diffusion_curve.json", "diffusion_curve.png",
                                                   "diffusion_samples.png")]
    print("wrote " + ", ".join(map(str, written)))
    stages_met = [metrics["target_met"]] + [metrics[stage]["target_met"] for stage in ("grpo", "diffusion")
                                            if stage in metrics]
    return 0 if all(stages_met) else 1
