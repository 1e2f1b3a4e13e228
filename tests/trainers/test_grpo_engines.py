"""GRPO's generation-engine fields (fusedrl/trainers/online/engine_config.py): transformers' continuous batching
samples what TRL's does (the same engine, RNG stream and scoring, so every logged metric matches), TRL's vLLM and
Hub fields exist and are refused with the fix, and ``log_unique_prompts`` thins the printed table."""

from __future__ import annotations

import pytest
import trl

from fusedrl import GRPOConfig, GRPOTrainer, RLOOConfig
from fusedrl.trainers.online.sampling import completion_table
from tests.helpers.grpo_parity import GRPO_BASE, TOKENIZER, assert_grpo_logs_match, run_grpo


def test_continuous_batching_samples_and_logs_what_trl_does(preset_model_dir, tmp_path):
    fields = {"use_transformers_continuous_batching": True, "beta": 0.04, "max_completion_length": 8}
    ours, our_logs, moved, trainable = run_grpo(GRPOTrainer, GRPOConfig, preset_model_dir, tmp_path, **fields)
    _, their_logs, _, _ = run_grpo(trl.GRPOTrainer, trl.GRPOConfig, preset_model_dir, tmp_path, **fields)
    assert ours.continuous_batching_config is not None
    assert ours.continuous_batching_config.max_memory_percent == 0.5  # TRL's training-aware default
    assert moved == trainable
    assert_grpo_logs_match(our_logs, their_logs)


def _config(tmp_path, **fields):
    return GRPOConfig(str(tmp_path), **{**GRPO_BASE, **fields})


def test_engine_fields_are_trls_and_vllm_is_refused_with_the_fix(preset_model_dir, tmp_path):
    with pytest.warns(FutureWarning, match="use_transformers_paged"):
        assert _config(tmp_path, use_transformers_paged=True).use_transformers_continuous_batching
    parsed = _config(tmp_path, transformers_continuous_batching_config='{"max_memory_percent": 0.2}')
    assert parsed.transformers_continuous_batching_config == {"max_memory_percent": 0.2}
    with pytest.raises(ValueError, match="vllm_mode must be one of"):
        _config(tmp_path, vllm_mode="remote")
    for fields, message in (({"use_vllm": True}, ("use_vllm=True is not supported .* set "
                                                  "use_transformers_continuous_batching=True")),
                            ({"log_completions_hub_repo": "me/table"}, "log_completions_hub_repo is not supported"),
                            ({"use_transformers_continuous_batching": True, "rank_invariant_sampling": True},
                             "rank_invariant_sampling=False")):
        with pytest.raises(ValueError, match=message):
            GRPOTrainer(preset_model_dir, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                        args=_config(tmp_path, **fields), train_dataset=_prompts(), processing_class=TOKENIZER)
    assert RLOOConfig(str(tmp_path), **{**GRPO_BASE, "use_vllm": False}).vllm_gpu_memory_utilization == 0.3


def test_continuous_batching_refuses_a_vision_processor_in_trls_words(tmp_path):
    from tests.helpers.vision import image_prompts, tiny_vlm

    model, processor = tiny_vlm("llava")
    with pytest.raises(ValueError, match="`use_transformers_continuous_batching` does not support multimodal"):
        GRPOTrainer(model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                    args=_config(tmp_path, use_transformers_continuous_batching=True),
                    train_dataset=image_prompts(2), processing_class=processor)


def test_log_unique_prompts_keeps_the_first_row_of_each_prompt():
    logs = {"prompt": ["a", "a", "b", "b"], "completion": ["1", "2", "3", "4"], "rewards": {"r": [0.1, 0.2, 0.3, 0.4]},
            "advantages": [1.0, -1.0, 1.0, -1.0], "extra": {}}
    header, rows = completion_table(logs, unique_prompts=True)
    assert header == ["prompt", "completion", "r", "advantage"]
    assert [row[:2] for row in rows] == [["a", "1"], ["b", "3"]]
    assert len(completion_table(logs)[1]) == 4 and len(completion_table(logs, 1, unique_prompts=True)[1]) == 1


def _prompts():
    from fusedrl.cli import presets

    return presets.load_preset_dataset("arithmetic", kind="prompt", n=8, seed=1)


@pytest.mark.parametrize("config_cls", [GRPOConfig, RLOOConfig])
def test_dict_fields_take_json_from_the_command_line_as_trls_do(tmp_path, config_cls):
    """TRL lists these in ``_VALID_DICT_FIELDS``: a JSON string (``--generation_kwargs '{"top_k": 5}'``) becomes a
    dict; before, it reached the sampling config as a string and failed there."""
    config = config_cls(str(tmp_path), generation_kwargs='{"top_k": 5}', chat_template_kwargs='{"enable_thinking": false}',
                        transformers_continuous_batching_config='{"max_batch_tokens": 64}', use_cpu=True, bf16=False)
    assert config.generation_kwargs == {"top_k": 5} and config.chat_template_kwargs == {"enable_thinking": False}
    assert config.transformers_continuous_batching_config == {"max_batch_tokens": 64}
    assert set(trl.GRPOConfig._VALID_DICT_FIELDS) <= set(config_cls._VALID_DICT_FIELDS)
