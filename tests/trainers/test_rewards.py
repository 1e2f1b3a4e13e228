"""fusedrl.trainers.rewards: the built-in rewards (hand-derived values), the name registry, validation of what a
reward function returns (errors name the function; reward_failure="skip"), reward models, and the trainer's use
of all of it."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import LlamaForSequenceClassification

from fusedrl.cli import presets
from fusedrl.trainers import GRPOConfig, GRPOTrainer
from fusedrl.trainers.rewards import (
    accuracy_reward,
    format_reward,
    get_reward,
    length_penalty,
    overlong_penalty,
    regex_format_reward,
    register_reward,
    registered_rewards,
    resolve_rewards,
    reward_weights_tensor,
    score_completions,
    unregister_reward,
)
from tests.helpers.models import tiny_llama

TOKENIZER = presets.build_tokenizer()


def _score(funcs, completions, on_error="raise", **columns):
    rewards = resolve_rewards(funcs)
    return score_completions(rewards, prompts=["1+1="] * len(completions), completions=completions,
                             completion_ids=[[0] * len(c) for c in completions], columns=columns, on_error=on_error)


# --- built-ins --------------------------------------------------------------------------------------------------


def test_accuracy_is_an_exact_stripped_match():
    completions = ["31", " 31\n", "31.", "3 1", [{"role": "assistant", "content": "31 "}], "7"]
    assert accuracy_reward(completions, answer=["31"] * 5 + [None]) == [1.0, 1.0, 0.0, 0.0, 1.0, None]
    # The same rule as the bundled task's own reward.
    assert accuracy_reward(completions[:5], answer=["31"] * 5) == presets.answer_reward(completions[:5],
                                                                                          answer=["31"] * 5)
    with pytest.raises(ValueError, match="needs an 'answer' column"):
        accuracy_reward(["1"])


def test_format_and_length_rewards():
    assert format_reward(["12", " -3 ", "1 2", "x", ""]) == [1.0, 1.0, 0.0, 0.0, 0.0]
    think = regex_format_reward(r"<think>.*</think>\d+", name="think")
    assert think.__name__ == "think" and think(["<think>a\nb</think>4", "4"]) == [1.0, 0.0]
    # -0.01 per token: 3 and 1 completion tokens.
    assert length_penalty(["abc", "d"], completion_ids=[[1, 2, 3], [4]]) == pytest.approx([-0.03, -0.01])
    # DAPO soft overlong punishment, max 10, cache 4: free up to 6 tokens, then -(n - 6) / 4, -1 from 10 on.
    penalty = overlong_penalty(10, 4)
    assert penalty(["x"] * 4, completion_ids=[[0] * 6, [0] * 7, [0] * 9, [0] * 10]) == [0.0, -0.25, -0.75, -1.0]
    with pytest.raises(ValueError, match="soft_punish_cache must lie in"):
        overlong_penalty(10, 10)


# --- registry ---------------------------------------------------------------------------------------------------


def test_register_and_look_up_by_name():
    def brevity(completions, **kwargs):
        return [1.0 / (1 + len(c)) for c in completions]

    register_reward("brevity_test", brevity)
    try:
        assert get_reward("brevity_test") is brevity
        assert {"accuracy", "format", "length_penalty", "brevity_test"} <= set(registered_rewards())
        (reward,) = resolve_rewards(["brevity_test"])
        assert reward.name == "brevity_test" and not reward.is_model
        with pytest.raises(ValueError, match="already registered"):
            register_reward("brevity_test", brevity)
        register_reward("brevity_test", length_penalty, replace=True)
        assert get_reward("brevity_test") is length_penalty
    finally:
        unregister_reward("brevity_test")
    with pytest.raises(ValueError, match="built-in reward and cannot be replaced"):
        register_reward("accuracy", brevity, replace=True)
    with pytest.raises(ValueError, match=r"unknown reward 'acuracy'; registered: \['accuracy'"):
        resolve_rewards(["acuracy"])
    with pytest.raises(ValueError, match="fn must be callable"):
        register_reward("x", 3)


def test_resolve_names_callables_and_weights():
    rewards = resolve_rewards(["accuracy", format_reward])
    assert [r.name for r in rewards] == ["accuracy", "format_reward"]
    with pytest.raises(ValueError, match="reward_funcs is required"):
        resolve_rewards(None)
    with pytest.raises(ValueError, match="reward_weights has 1 entries for 2 reward functions"):
        reward_weights_tensor([1.0], 2)
    assert reward_weights_tensor(None, 3).tolist() == [1.0, 1.0, 1.0]


# --- validation -------------------------------------------------------------------------------------------------


def raises(completions, **kwargs):
    raise KeyError("solution")


def too_short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def gives_nan(completions, **kwargs):
    return [0.0, math.nan]


def gives_inf(completions, **kwargs):
    return [0.0, math.inf]


def gives_text(completions, **kwargs):
    return ["good", 1.0]


def gives_scalar(completions, **kwargs):
    return 1.0


@pytest.mark.parametrize(("func", "match"), [
    (raises, r"reward function 'raises' raised KeyError: 'solution'"),
    (too_short, r"reward function 'too_short' returned 1 rewards for 2 completions"),
    (gives_nan, r"reward function 'gives_nan' returned nan for completion 1"),
    (gives_inf, r"reward function 'gives_inf' returned inf for completion 1"),
    (gives_text, r"reward function 'gives_text' returned 'good' for completion 0"),
    (gives_scalar, r"reward function 'gives_scalar' returned a float"),
], ids=["raises", "wrong_length", "nan", "inf", "not_a_number", "not_a_list"])
def test_bad_reward_outputs_name_the_function(func, match):
    with pytest.raises(ValueError, match=match):
        _score([func], ["1", "2"])


def test_skip_mode_treats_a_failing_function_as_none(caplog):
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        scores = _score([raises, "accuracy"], ["2", "3"], on_error="skip", answer=["2", "2"])
    assert torch.isnan(scores.rewards_per_func[:, 0]).all()
    assert scores.rewards_per_func[:, 1].tolist() == [1.0, 0.0]
    assert "raises" in scores.failures and "reward function 'raises' raised KeyError" in caplog.text


def test_none_rewards_become_nan_and_columns_arrive():
    def per_task(completions, task, **kwargs):
        return [1.0 if t == "math" else None for t in task]

    scores = _score([per_task], ["a", "b"], task=["math", "code"])
    assert scores.rewards_per_func[0, 0] == 1.0 and math.isnan(scores.rewards_per_func[1, 0])


def test_reward_model_scores_prompt_plus_completion():
    # 1 layer, hidden 32, 2 attention and KV heads, LlamaConfig's default 2048 positions.
    model = tiny_llama(0, model_cls=LlamaForSequenceClassification, isolate_rng=False, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       num_labels=1, max_position_embeddings=2048)
    (reward,) = resolve_rewards([model], [TOKENIZER])
    assert reward.is_model
    out = score_completions([reward], prompts=["1+1=", "12+3="], completions=["2", "15"],
                            completion_ids=[[0], [0, 0]])
    with torch.no_grad():
        for row, text in enumerate(["1+1=2", "12+3=15"]):
            inputs = TOKENIZER(text, return_tensors="pt", add_special_tokens=False)
            assert out.rewards_per_func[row, 0] == pytest.approx(model(**inputs).logits[0, 0].item(), abs=1e-5)


# --- in the trainer ---------------------------------------------------------------------------------------------


def _trainer(tmp_path, funcs, **fields):
    config = GRPOConfig(str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=3,
                        max_steps=2, logging_steps=1, bf16=False, activation_checkpointing=False, report_to="none",
                        save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, kernels="all=reference",
                        **fields)
    model = presets.load_preset_model("tiny", tokenizer=TOKENIZER)
    data = presets.load_preset_dataset("arithmetic", kind="prompt", n=16)
    return GRPOTrainer(model, reward_funcs=funcs, args=config, train_dataset=data, processing_class=TOKENIZER)


def test_trainer_reports_the_failing_function(tmp_path):
    trainer = _trainer(tmp_path, ["accuracy", raises])
    with pytest.raises(ValueError, match="reward function 'raises' raised KeyError"):
        trainer.train()


def test_trainer_skips_a_failing_function_when_configured(tmp_path):
    trainer = _trainer(tmp_path, ["accuracy", raises], reward_failure="skip")
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(entry["rewards/raises/failures"] == 1.0 for entry in logs)
    # The skipped function has no value in the window: logged as None, as TRL logs an all-None reward.
    assert all(entry["rewards/accuracy/mean"] == 0.0 and entry["rewards/raises/mean"] is None for entry in logs)


def test_trainer_takes_reward_names_from_the_config(tmp_path):
    trainer = _trainer(tmp_path, None, reward_funcs=["accuracy", "format"], reward_weights=[1.0, 0.5])
    assert trainer.reward_func_names == ["accuracy", "format"]
    assert trainer.reward_weights.tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="reward_weights has 1 entries for 2 reward functions"):
        _trainer(tmp_path, ["accuracy", "format"], reward_weights=[1.0])
