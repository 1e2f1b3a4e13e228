"""GRPO and RLOO with a streamed (``IterableDataset``) eval set, as TRL 1.16 takes one (issue 14): alone, as an
``IterableDatasetDict`` or a dict of streams, given at construction or to ``evaluate()``. The stream is shuffled
with ``args.seed`` and each prompt repeated ``num_generations_eval`` times in a row; given the same rows in the same
visiting order map-style, an evaluation logs the same metrics. Also TRL's ``dispatch_batches`` refusal and its
worker rule (one worker for a streamed loader only), and online DPO on streamed train and eval sets (TRL 1.16 takes
them, and trains on them once ``dispatch_batches=False`` is set by hand; fusedrl sets it)."""

from __future__ import annotations

import math
import warnings

import pytest
from datasets import Dataset, IterableDatasetDict

import fusedrl
from fusedrl.cli import presets
from fusedrl.trainers.online.sampling import RepeatSampler
from tests.helpers.online import char_reward, digit_count, train_quietly

SEED = 5
_TIMING_KEYS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")


def _trainer(method: str, tmp_path, train_dataset, eval_dataset=None, **overrides):
    """``method`` (GRPO or RLOO) on the ``tiny`` preset, row-seeded sampling (a completion depends on its prompt,
    batch and row, not on the global RNG), 2 completions per prompt of 4 tokens."""
    settings = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "num_generations": 2,
                "max_completion_length": 4, "max_steps": 1, "report_to": [], "bf16": False, "use_cpu": True,
                "save_strategy": "no", "disable_tqdm": True, "seed": SEED, "rank_invariant_sampling": True,
                "dataloader_pin_memory": False, "kernels": "all=reference"}
    settings.update(overrides)
    tokenizer = presets.build_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(fusedrl, f"{method}Trainer")(
            presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer), reward_funcs=[char_reward],
            args=getattr(fusedrl, f"{method}Config")(str(tmp_path), **settings), train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=tokenizer)


def _in_stream_order(prompts: Dataset) -> Dataset:
    """``prompts`` rearranged so that the map-style eval sampler (a permutation seeded with ``SEED``) visits them in
    the order the stream shuffled with ``SEED`` yields them: both evaluations then sample the same batches."""
    position = {row["prompt"]: i for i, row in enumerate(prompts)}
    assert len(position) == len(prompts), "the prompts must be distinct to be located in the stream"
    streamed = [position[row["prompt"]] for row in prompts.to_iterable_dataset().shuffle(seed=SEED)]
    visited = list(RepeatSampler(prompts, 1, seed=SEED))  # visited[j]: the index the sampler reads j-th
    assert streamed != sorted(streamed), "the stream must be shuffled for the rearrangement to mean something"
    order = [0] * len(prompts)
    for j, index in enumerate(visited):
        order[index] = streamed[j]
    return prompts.select(order)


def _shaped(shape: str, dataset):
    if shape == "single":
        return dataset
    if shape == "iterable_dict":
        return IterableDatasetDict({"data1": dataset, "data2": dataset})
    return {"data1": dataset, "data2": dataset}


def _evaluate(trainer, dataset, at_init: bool) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = trainer.evaluate() if at_init else trainer.evaluate(eval_dataset=dataset)
    return {key: value for key, value in metrics.items() if not key.endswith(_TIMING_KEYS)}


@pytest.mark.parametrize(("method", "shape", "at_init"), [
    ("GRPO", "single", False), ("GRPO", "iterable_dict", True), ("GRPO", "dict", False), ("RLOO", "single", True),
], ids=["grpo-single-to-evaluate", "grpo-iterable-dict-at-init", "grpo-dict-to-evaluate", "rloo-single-at-init"])
def test_a_streamed_eval_set_logs_what_the_same_rows_log_map_style(method, shape, at_init, tmp_path):
    train = presets.load_preset_dataset("arithmetic", kind="prompt", n=8)
    # 8 prompts, a multiple of the eval batch of 4 rows: accelerate cuts a map-style set's last gathered batch to
    # len(dataset) % batch rows (it takes the dataset's rows for the sampler's), which would reweigh its eval_loss.
    prompts = presets.load_preset_dataset("arithmetic", "test", kind="prompt", n=8)
    results = []
    for name, eval_set in (("map", _in_stream_order(prompts)), ("stream", prompts.to_iterable_dataset())):
        eval_set = _shaped(shape, eval_set)
        trainer = _trainer(method, tmp_path / name, train, eval_set if at_init else None)
        results.append(_evaluate(trainer, eval_set, at_init))
    map_style, streamed = results
    # As TRL: one loss per eval set (Trainer prefixes it with the set's name); the sampling metrics are logged as
    # eval_* after each set, so a dict's result holds its last set's.
    losses = ["eval_loss"] if shape == "single" else ["eval_data1_loss", "eval_data2_loss"]
    for key in (*losses, "eval_reward", "eval_reward_std", "eval_completions/mean_length",
                "eval_rewards/char_reward/mean"):
        assert math.isfinite(streamed[key]), key
    assert streamed["eval_reward_std"] > 0  # completions really sampled, with spread
    assert streamed == map_style


def test_the_streamed_eval_loader_groups_each_prompt_and_keeps_the_train_workers(tmp_path):
    train = presets.load_preset_dataset("arithmetic", kind="prompt", n=8)
    prompts = presets.load_preset_dataset("arithmetic", "test", kind="prompt", n=5)
    trainer = _trainer("GRPO", tmp_path, train, prompts.to_iterable_dataset(), num_generations_eval=3,
                       per_device_eval_batch_size=3, dataloader_num_workers=2, dataloader_persistent_workers=True)
    assert trainer.args.dataloader_num_workers == 2  # a streamed eval set leaves a map-style train set's workers
    assert trainer.args.accelerator_config.dispatch_batches is False
    assert trainer.get_train_dataloader().num_workers == 2
    eval_loader = trainer.get_eval_dataloader()
    assert eval_loader.num_workers == 0
    assert trainer.args.dataloader_num_workers == 2 and trainer.args.dataloader_persistent_workers  # restored
    batches = [[row["prompt"] for row in batch] for batch in eval_loader]
    assert all(len(set(batch)) == 1 and len(batch) == 3 for batch in batches)  # one prompt's whole group per batch
    assert sorted(batch[0] for batch in batches) == sorted(prompts["prompt"])  # every prompt once


def test_a_streamed_train_set_takes_one_worker(tmp_path):
    stream = presets.load_preset_dataset("arithmetic", kind="prompt", n=8).to_iterable_dataset()
    trainer = _trainer("RLOO", tmp_path, stream, dataloader_num_workers=2)
    assert trainer.args.dataloader_num_workers == 0
    assert trainer.args.accelerator_config.dispatch_batches is False


_DISPATCH_ERROR = r"^Iterable datasets require `dispatch_batches=False`.*accelerator_config=\{'dispatch_batches': False\}"


@pytest.mark.parametrize("where", ["train", "eval"])
def test_a_stream_with_dispatched_batches_is_refused_before_any_other_check(where, tmp_path):
    prompts = presets.load_preset_dataset("arithmetic", kind="prompt", n=8)
    train, eval_set = (prompts.to_iterable_dataset(), None) if where == "train" else (prompts, {
        "map": prompts, "stream": prompts.to_iterable_dataset()})
    # max_steps=-1: a stream has no length, so Trainer would refuse a missing max_steps; TRL's refusal comes first.
    with pytest.raises(ValueError, match=_DISPATCH_ERROR):
        _trainer("GRPO", tmp_path, train, eval_set, max_steps=-1, accelerator_config={"dispatch_batches": True})


def test_a_stream_given_to_evaluate_with_dispatched_batches_is_refused(tmp_path):
    prompts = presets.load_preset_dataset("arithmetic", "test", kind="prompt", n=4)
    trainer = _trainer("GRPO", tmp_path, presets.load_preset_dataset("arithmetic", kind="prompt", n=8),
                       accelerator_config={"dispatch_batches": True})
    with pytest.raises(ValueError, match=_DISPATCH_ERROR):
        trainer.evaluate(eval_dataset=prompts.to_iterable_dataset())


def test_a_streamed_eval_set_without_prompts_is_refused_by_name(tmp_path):
    prompts = presets.load_preset_dataset("arithmetic", "test", kind="prompt", n=4)
    eval_set = IterableDatasetDict({"good": prompts.to_iterable_dataset(),
                                    "bad": Dataset.from_dict({"text": ["a", "b"]}).to_iterable_dataset()})
    with pytest.raises(ValueError, match=r"eval_dataset\['bad'\] needs a 'prompt' column .*\['text'\]"):
        _trainer("GRPO", tmp_path, presets.load_preset_dataset("arithmetic", kind="prompt", n=8), eval_set)


def _online_dpo(tmp_path, train_dataset, **overrides):
    settings = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "max_steps": 2,
                "max_new_tokens": 4, "learning_rate": 1e-3, "logging_steps": 1, "report_to": [], "bf16": False,
                "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "seed": SEED,
                "rank_invariant_sampling": True, "dataloader_pin_memory": False, "kernels": "all=reference"}
    settings.update(overrides)
    tokenizer = presets.build_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fusedrl.OnlineDPOTrainer(presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer),
                                        reward_funcs=[digit_count, char_reward], train_dataset=train_dataset,
                                        args=fusedrl.OnlineDPOConfig(str(tmp_path), **settings),
                                        processing_class=tokenizer)


def test_online_dpo_trains_on_a_stream(tmp_path):
    stream = presets.load_preset_dataset("arithmetic", kind="prompt", n=8).to_iterable_dataset()
    trainer = _online_dpo(tmp_path, stream)
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    logs = train_quietly(trainer)
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    assert any(not param.equal(before[name]) for name, param in trainer.model.named_parameters())


def test_online_dpo_evaluates_a_stream_as_the_same_rows_map_style(tmp_path):
    train = presets.load_preset_dataset("arithmetic", kind="prompt", n=8)
    prompts = presets.load_preset_dataset("arithmetic", "test", kind="prompt", n=8)  # Trainer reads both in order
    results = [_evaluate(_online_dpo(tmp_path / name, train), eval_set, at_init=False)
               for name, eval_set in (("map", prompts), ("stream", prompts.to_iterable_dataset()))]
    assert math.isfinite(results[1]["eval_loss"]) and math.isfinite(results[1]["eval_rewards/margins"])
    assert results[1] == results[0]


def test_online_dpo_refuses_a_stream_with_dispatched_batches(tmp_path):
    stream = presets.load_preset_dataset("arithmetic", kind="prompt", n=8).to_iterable_dataset()
    with pytest.raises(ValueError, match=_DISPATCH_ERROR):
        _online_dpo(tmp_path, stream, max_steps=-1, accelerator_config={"dispatch_batches": True})
