"""GRPO and RLOO on a streamed (``IterableDataset``) prompt set, as TRL 1.16 takes one (issue 14, cause 8): the stream
carries the repeat sampler's order, so an unshuffled stream trains exactly as the same prompts map-style."""

from __future__ import annotations

import pytest
from datasets import Dataset

import fusedrl
from fusedrl.cli import presets
from fusedrl.trainers.online.sampling import RepeatSampler, repeated_stream
from tests.helpers.online import char_reward


def test_the_stream_repeats_rows_as_the_sampler_orders_indices():
    rows = Dataset.from_dict({"prompt": [f"p{i}" for i in range(7)]})
    stream = repeated_stream(rows.to_iterable_dataset(), 3, 2, 2, shuffle=False, seed=0)
    order = list(RepeatSampler(rows, 3, batch_size=2, repeat_count=2, shuffle=False))
    assert [row["prompt"] for row in stream] == [f"p{i}" for i in order]  # 6 prompts: the 7th chunk is incomplete


@pytest.mark.parametrize("method", ["GRPO", "RLOO"])
def test_a_stream_trains_as_the_same_prompts_map_style(method, tmp_path):
    prompts = presets.load_preset_dataset("arithmetic", kind="prompt", n=8)
    logs = []
    for dataset in (prompts, prompts.to_iterable_dataset()):
        tokenizer = presets.build_tokenizer()
        args = getattr(fusedrl, f"{method}Config")(
            str(tmp_path / type(dataset).__name__), per_device_train_batch_size=4, num_generations=2,
            max_completion_length=4, max_steps=3, logging_steps=1, report_to=[], bf16=False, use_cpu=True,
            shuffle_dataset=False, save_strategy="no")
        trainer = getattr(fusedrl, f"{method}Trainer")(
            presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer), reward_funcs=[char_reward], args=args,
            train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        logs.append([{k: v for k, v in log.items() if not k.startswith("memory/") and k not in ("step_time", "epoch")}
                     for log in trainer.state.log_history if "loss" in log])
    assert len(logs[0]) == 3 and logs[1] == logs[0]


def test_a_stream_without_prompts_is_refused(tmp_path):
    stream = Dataset.from_dict({"text": ["a", "b"]}).to_iterable_dataset()
    args = fusedrl.GRPOConfig(str(tmp_path), num_generations=2, per_device_train_batch_size=2, max_steps=1,
                              report_to=[], bf16=False, use_cpu=True)
    with pytest.raises(ValueError, match=r"train_dataset needs a 'prompt' column .*\['text'\]"):
        fusedrl.GRPOTrainer(presets.load_preset_model("tiny", seed=0, tokenizer=presets.build_tokenizer()),
                            reward_funcs=[char_reward], args=args, train_dataset=stream,
                            processing_class=presets.build_tokenizer())
