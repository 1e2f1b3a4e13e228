"""Several LoRA adapters trained together on one base (joint mode, fusedrl/trainers/adapters/joint.py): each adapter
ends where its own run ends, the step is one trunk forward per pass with rows routed through multi_lora_linear, the
metrics come per adapter plus their mean, and what would couple adapters is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

import fusedrl
from fusedrl.cli.presets import build_tokenizer
from fusedrl.trainers.adapters import routing
from tests.helpers.adapters import adapter_state, lora_adapters
from tests.helpers.data import CHOSEN, EVAL_PAIRS, LORA, PROMPTS, REJECTED, standard_pairs
from tests.helpers.models import tiny_llama

NAMES4 = ("p0", "p1", "p2", "p3")
NAMES2 = NAMES4[:2]
REF = "frozen"  # PEFT warns about adapter names found inside "lora_" (a, r...)


def adapters_model(names=NAMES2, **lora) -> torch.nn.Module:
    """The tiny Llama with LoRA adapters ``names`` plus the reference adapter ``REF``; lora_B drawn non-zero so that
    every adapter (and the reference) computes something different from the base."""
    return lora_adapters(tiny_llama(), (*names, REF), LoraConfig(**{**LORA, **lora}))


def pair_datasets(names) -> dict[str, Dataset]:
    """A different order (and preference) of the 8 pairs per adapter."""
    datasets = {}
    for k, name in enumerate(names):
        order = [(i * (2 * k + 1) + k) % 8 for i in range(8)]
        chosen, rejected = (CHOSEN, REJECTED) if k % 2 == 0 else (REJECTED, CHOSEN)
        datasets[name] = Dataset.from_dict({"prompt": [PROMPTS[i] for i in order],
                                            "chosen": [chosen[i] for i in order],
                                            "rejected": [rejected[i] for i in order]})
    return datasets


def unpaired(dataset: Dataset) -> Dataset:
    return Dataset.from_dict({"prompt": list(dataset["prompt"]) * 2,
                              "completion": list(dataset["chosen"]) + list(dataset["rejected"]),
                              "label": [True] * len(dataset) + [False] * len(dataset)})


def run(method: str, model, names, datasets, tmp_path, *, steps: int = 3, **overrides):
    config_cls, trainer_cls = getattr(fusedrl, f"{method}Config"), getattr(fusedrl, f"{method}Trainer")
    reference = {} if method in ("ORPO", "CPO") else {"ref_adapter_name": REF}
    fields = {"per_device_train_batch_size": 2, "max_steps": steps, "learning_rate": 1e-2, "logging_steps": 1,
              "report_to": [], "bf16": False, "use_cpu": True, "save_strategy": "no", "max_grad_norm": 0.05,
              "model_adapter_name": names, **reference, **overrides}
    args = config_cls(str(tmp_path / "-".join(names if isinstance(names, list) else [names])), **fields)
    trainer = trainer_cls(model, args=args, train_dataset=datasets, processing_class=build_tokenizer())
    trainer.train()
    return trainer


def assert_matches_separate_runs(method, names, datasets, tmp_path, metric: str) -> None:
    start = adapters_model(names)
    initial = {name: adapter_state(start, name) for name in names}
    joint = run(method, copy.deepcopy(start), list(names), datasets, tmp_path)
    for name in names:
        alone = run(method, copy.deepcopy(start), name, datasets[name], tmp_path)
        for key, weight in adapter_state(alone.model, name).items():
            assert not torch.equal(weight, initial[name][key]) or "lora_B" not in key  # the adapter trained
            torch.testing.assert_close(adapter_state(joint.model, name)[key], weight, rtol=0, atol=5e-6)
        steps = [log for log in alone.state.log_history if "loss" in log]
        joint_steps = [log for log in joint.state.log_history if "loss" in log]
        assert len(steps) == len(joint_steps) == 3
        for own, together in zip(steps, joint_steps):
            assert together[f"{name}/grad_norm"] == pytest.approx(own["grad_norm"], rel=1e-5)
            assert together[f"{name}/{metric}"] == pytest.approx(own[metric], rel=1e-5, abs=1e-6)
    # The reference adapter never trains.
    torch.testing.assert_close(adapter_state(joint.model, REF), adapter_state(start, REF), rtol=0, atol=0)


@pytest.mark.parametrize(("method", "metric"), [("DPO", "rewards/margins"), ("ORPO", "log_odds_ratio"),
                                                 ("CPO", "rewards/margins"), ("KTO", "kl")])
def test_two_adapters_end_where_their_own_runs_end(method, metric, tmp_path):
    datasets = pair_datasets(NAMES2)
    if method == "KTO":
        datasets = {name: unpaired(dataset) for name, dataset in datasets.items()}
    assert_matches_separate_runs(method, NAMES2, datasets, tmp_path, metric)


def test_four_adapters_end_where_their_own_runs_end(tmp_path):
    assert_matches_separate_runs("DPO", NAMES4, pair_datasets(NAMES4), tmp_path, "rewards/accuracies")


def test_one_trunk_forward_per_pass_with_rows_routed_per_adapter(tmp_path, monkeypatch):
    """A joint DPO step runs the trunk twice (policy, reference) whatever K, and every routed LoRA layer sees all
    four adapters' rows in one multi_lora_linear call."""
    model = adapters_model(NAMES4)
    trunk_calls = []
    trunk = model.get_base_model().model
    monkeypatch.setattr(trunk, "forward", _counting(trunk.forward, trunk_calls))
    adapter_sets = []
    original = routing.multi_lora_linear

    def spy(x, weight, bias, lora_A, lora_B, scaling, adapter_ids):
        adapter_sets.append((lora_A.shape[0], tuple(adapter_ids.unique().tolist())))
        return original(x, weight, bias, lora_A, lora_B, scaling, adapter_ids)

    monkeypatch.setattr(routing, "multi_lora_linear", spy)
    run("DPO", model, list(NAMES4), pair_datasets(NAMES4), tmp_path, steps=2)
    assert len(trunk_calls) == 2 * 2
    assert (4, (0, 1, 2, 3)) in adapter_sets  # the policy forward (and its checkpoint recompute)
    assert (1, (0,)) in adapter_sets  # the reference adapter on every row
    assert {shape for shape, _ in adapter_sets} == {1, 4}


def _counting(forward, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)
    return counted


def test_metrics_come_per_adapter_and_as_their_mean(tmp_path):
    trainer = run("DPO", adapters_model(), list(NAMES2), pair_datasets(NAMES2), tmp_path, steps=2)
    for log in [log for log in trainer.state.log_history if "loss" in log]:
        for metric in ("rewards/accuracies", "rewards/margins", "logps/chosen", "entropy"):
            assert log[metric] == pytest.approx((log[f"p0/{metric}"] + log[f"p1/{metric}"]) / 2)
        assert log["grad_norm"] == pytest.approx((log["p0/grad_norm"] ** 2 + log["p1/grad_norm"] ** 2) ** 0.5)


def test_evaluation_runs_each_adapter_on_its_own_dataset(tmp_path):
    start = adapters_model()
    eval_sets = {"p0": Dataset.from_dict(EVAL_PAIRS), "p1": standard_pairs(4)}
    joint = run("DPO", copy.deepcopy(start), list(NAMES2), pair_datasets(NAMES2), tmp_path, steps=1)
    joint.eval_dataset = {name: joint._prepare(ds, joint.processing_class, joint.args, name)
                          for name, ds in eval_sets.items()}
    metrics = joint.evaluate()
    for name in NAMES2:
        alone = run("DPO", copy.deepcopy(start), name, pair_datasets(NAMES2)[name], tmp_path, steps=1)
        own = alone.evaluate(eval_sets[name])
        assert metrics[f"eval_{name}_loss"] == pytest.approx(own["eval_loss"], rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx((metrics["eval_p0_loss"] + metrics["eval_p1_loss"]) / 2)
    logged = [log for log in joint.state.log_history if "eval_p0/rewards/accuracies" in log]
    assert logged, "per-adapter eval metrics are logged under eval_<adapter>/..."


def test_the_hook_is_installed_only_while_training(tmp_path):
    model = adapters_model()
    layers = routing.lora_linear_layers(model)
    seen = []
    trainer = run("DPO", model, list(NAMES2), pair_datasets(NAMES2), tmp_path, steps=1)
    trainer.add_callback(_HookProbe(layers, seen))
    trainer.args.max_steps = 2
    trainer.train()
    assert seen and all(seen)  # routed during training
    assert all("forward" not in layer.__dict__ for layer in layers)  # PEFT's own forward afterwards
    assert not hasattr(model, routing.ROUTER_ATTRIBUTE)
    model.set_adapter("p1")
    inputs = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        model(input_ids=inputs)  # an ordinary PEFT forward works again


class _HookProbe(TrainerCallback):
    """Records at each step whether every LoRA layer runs the routed forward."""

    def __init__(self, layers, seen: list) -> None:
        self.layers, self.seen = layers, seen

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(all("forward" in layer.__dict__ for layer in self.layers))


def test_bad_joint_inputs_are_refused(tmp_path):
    pairs = pair_datasets(NAMES2)
    with pytest.raises(ValueError, match=r"train_dataset must be a dict .*\['p0', 'p1'\]"):
        run("DPO", adapters_model(), list(NAMES2), pairs["p0"], tmp_path)
    with pytest.raises(ValueError, match=r"train_dataset must be a dict .*got \['p0', 'p9'\]"):
        run("DPO", adapters_model(), list(NAMES2), {"p0": pairs["p0"], "p9": pairs["p1"]}, tmp_path)
    with pytest.raises(ValueError, match="lora_dropout=0.1"):  # disable_dropout=True (the default) zeroes it
        run("DPO", adapters_model(lora_dropout=0.1), list(NAMES2), pairs, tmp_path, disable_dropout=False)
    with pytest.raises(ValueError, match="sync_ref_model=True cannot be combined"):
        run("DPO", adapters_model(), list(NAMES2), pairs, tmp_path, sync_ref_model=True)


def test_resume_mid_epoch_restores_every_adapter_exactly(tmp_path):
    """6 joint steps straight vs resuming from the step-3 checkpoint (8 pairs at batch 2 per adapter: the resume
    skips into the first epoch and crosses into the second): the same logged steps and adapters, bitwise."""
    start = adapters_model()
    fields = {"steps": 6, "save_strategy": "steps", "save_steps": 3, "kernels": "all=reference"}
    straight = run("DPO", copy.deepcopy(start), list(NAMES2), pair_datasets(NAMES2), tmp_path / "straight", **fields)
    checkpoint = next((tmp_path / "straight").rglob("checkpoint-3"))
    assert {"p0", "p1"} <= {path.name for path in checkpoint.iterdir()}
    config_cls, trainer_cls = fusedrl.DPOConfig, fusedrl.DPOTrainer
    resumed = trainer_cls(copy.deepcopy(start), args=config_cls(
        str(tmp_path / "resumed"), per_device_train_batch_size=2, max_steps=6, learning_rate=1e-2, logging_steps=1,
        report_to=[], bf16=False, use_cpu=True, save_strategy="steps", save_steps=3, max_grad_norm=0.05,
        model_adapter_name=list(NAMES2), ref_adapter_name=REF, kernels="all=reference"),
        train_dataset=pair_datasets(NAMES2), processing_class=build_tokenizer())
    resumed.train(resume_from_checkpoint=str(checkpoint))

    def steps_after_3(trainer):
        return [{k: v for k, v in log.items() if not k.startswith("memory/") and k != "epoch"}
                for log in trainer.state.log_history if "loss" in log and log["step"] > 3]

    assert len(steps_after_3(straight)) == 3 and steps_after_3(resumed) == steps_after_3(straight)
    for name in NAMES2:
        for key, weight in adapter_state(straight.model, name).items():
            assert torch.equal(adapter_state(resumed.model, name)[key], weight), key
