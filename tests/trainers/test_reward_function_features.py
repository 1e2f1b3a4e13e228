"""What reward functions can do besides returning rewards, as in TRL 1.16's GRPO/RLOO trainers: be async (run
together on the trainer's event loop), log extra table columns (``log_extra``) and scalar metrics (``log_metric``),
return None for every function on a row (TRL's warning); the trainers' ``reward_funcs`` /
``reward_processing_classes`` attributes; and beam search through ``generation_kwargs`` with the shared prompt
prefill."""

from __future__ import annotations

import asyncio
import functools
import logging

import pytest
import torch
from transformers import LlamaForSequenceClassification

from fusedrl.cli import presets
from fusedrl.trainers import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from fusedrl.trainers.online.grpo_scoring import completion_logs, completion_logs_state, restore_completion_logs
from fusedrl.trainers.online.rollout import generate_completions
from fusedrl.trainers.online.sampling import completion_table
from fusedrl.trainers.rewards import (
    BackgroundEventLoop,
    RewardLogBuffer,
    is_async_callable,
    resolve_rewards,
    score_completions,
)
from tests.helpers.models import tiny_llama
from tests.helpers.online import char_reward, make_ppo_trainer, train_quietly

TOKENIZER = presets.build_tokenizer()
UNSCORED = "All reward functions returned None for the following kwargs:"


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


async def async_length_reward(completions, **kwargs):
    await asyncio.sleep(0)  # a real suspension point: the function must be awaited, not just called
    return [float(len(c)) for c in completions]


async def async_char_reward(completions, **kwargs):
    await asyncio.sleep(0)
    return char_reward(completions)


class AsyncCallableReward:
    """An object whose ``__call__`` is async (TRL's ``is_async_callable`` case an ``iscoroutinefunction`` misses)."""

    __name__ = "async_callable_reward"

    async def __call__(self, completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(set(c))) for c in completions]


def _score(funcs, completions, **kwargs):
    return score_completions(resolve_rewards(funcs), prompts=["1+1="] * len(completions), completions=completions,
                             completion_ids=[[0] * len(c) for c in completions], **kwargs)


def _config(config_cls, tmp_path, **fields):
    settings = {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 3, "max_steps": 2,
                "logging_steps": 1, "learning_rate": 1e-2, "bf16": False, "activation_checkpointing": False,
                "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "dataloader_pin_memory": False,
                "kernels": "all=reference", "seed": 4}
    return config_cls(str(tmp_path), **{**settings, **fields})


def _trainer(trainer_cls, tmp_path, funcs, reward_processing_classes=None, **fields):
    config_cls = RLOOConfig if trainer_cls is RLOOTrainer else GRPOConfig
    return trainer_cls(presets.load_preset_model("tiny", seed=0, tokenizer=TOKENIZER), reward_funcs=funcs,
                       args=_config(config_cls, tmp_path, **fields),
                       train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=16, seed=1),
                       processing_class=TOKENIZER, reward_processing_classes=reward_processing_classes)


def _reward_model():
    # 1 layer, hidden 32, 2 attention and KV heads, as tests/trainers/test_rewards.py's reward model.
    return tiny_llama(0, model_cls=LlamaForSequenceClassification, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                      max_position_embeddings=2048)


# --- async reward functions --------------------------------------------------------------------------------------


def test_async_callables_are_recognised():
    assert is_async_callable(async_length_reward)
    assert is_async_callable(functools.partial(async_length_reward, extra=1))
    assert is_async_callable(AsyncCallableReward())
    assert not is_async_callable(length_reward)
    assert not is_async_callable(functools.partial(length_reward))


@pytest.mark.parametrize("use_trainer_loop", [True, False], ids=["background_loop", "no_loop"])
def test_async_rewards_equal_their_sync_twins(use_trainer_loop):
    owner = BackgroundEventLoop() if use_trainer_loop else None
    completions = ["ab", "abcab", ""]
    try:
        mixed = _score([length_reward, async_length_reward, AsyncCallableReward()], completions,
                       async_loop=owner.loop if owner else None)
    finally:
        if owner:
            owner.close()
    assert mixed.rewards_per_func[:, 0].tolist() == mixed.rewards_per_func[:, 1].tolist() == [2.0, 5.0, 0.0]
    assert mixed.rewards_per_func[:, 2].tolist() == [2.0, 3.0, 0.0]


def test_async_rewards_run_concurrently_on_the_loop():
    """Each function waits for the other to have started: run one after the other they would time out."""
    started = {}

    def waits_for(me: str, other: str):
        async def reward(completions, **kwargs):
            started[me] = True
            for _ in range(200):  # up to 2 s
                if started.get(other):
                    return [1.0] * len(completions)
                await asyncio.sleep(0.01)
            raise TimeoutError(f"{other} never started while {me} was waiting")

        reward.__name__ = me
        return reward

    owner = BackgroundEventLoop()
    try:
        scores = _score([waits_for("a", "b"), waits_for("b", "a")], ["x", "y"], async_loop=owner.loop)
    finally:
        owner.close()
    assert scores.rewards_per_func.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert not owner.thread.is_alive() and owner.loop.is_closed()


def test_async_rewards_work_inside_a_running_event_loop():
    """A notebook cell runs inside an event loop: asyncio.run would raise there; the rewards' own loop does not."""
    owner = BackgroundEventLoop()

    async def cell():
        with_loop = _score([async_length_reward], ["abc"], async_loop=owner.loop)
        without = _score([async_length_reward], ["abcd"])
        return with_loop.rewards_per_func.item(), without.rewards_per_func.item()

    try:
        assert asyncio.run(cell()) == (3.0, 4.0)
    finally:
        owner.close()


async def async_fails(completions, **kwargs):
    raise KeyError("answer")


def test_async_failures_name_the_function_and_skip_keeps_the_others(caplog):
    with pytest.raises(ValueError, match="reward function 'async_fails' raised KeyError: 'answer'"):
        _score([async_length_reward, async_fails], ["ab"])
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        scores = _score([async_length_reward, async_fails], ["ab", "c"], on_error="skip")
    assert scores.rewards_per_func[:, 0].tolist() == [2.0, 1.0]
    assert torch.isnan(scores.rewards_per_func[:, 1]).all() and set(scores.failures) == {"async_fails"}
    assert "reward_failure='skip'" in caplog.text


def test_rloo_trains_with_sync_and_async_rewards_that_agree(tmp_path):
    trainer = _trainer(RLOOTrainer, tmp_path, [length_reward, async_length_reward, async_char_reward])
    assert trainer.async_loop is not None and trainer.async_loop.is_running()
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    logs = train_quietly(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert entry["rewards/length_reward/mean"] == entry["rewards/async_length_reward/mean"]
        assert entry["rewards/async_char_reward/mean"] is not None
    assert any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    assert _trainer(GRPOTrainer, tmp_path / "sync", [length_reward]).async_loop is None


# --- log_extra, log_metric ---------------------------------------------------------------------------------------


def logging_reward(completions, log_extra, log_metric, **kwargs):
    log_extra("first_char", [c[:1] for c in completions])
    log_extra("length", [len(c) for c in completions])
    log_metric("custom/quarter", 0.25)
    log_metric("custom/rows", float(len(completions)))
    return [float(len(c)) for c in completions]


def test_log_extra_and_log_metric_reach_the_logs_and_the_table(tmp_path):
    trainer = _trainer(GRPOTrainer, tmp_path, [logging_reward], log_completions=True)
    logs = train_quietly(trainer)
    rows = trainer.args.generation_batch_size
    extra = trainer._logs["extra"]
    assert list(extra) == ["first_char", "length"] and len(extra["first_char"]) == rows
    completions = list(trainer._logs["completion"])
    assert list(extra["first_char"]) == [c[:1] for c in completions]
    assert list(extra["length"]) == [len(c) for c in completions]
    assert list(trainer._logs["rewards"]["logging_reward"]) == [float(len(c)) for c in completions]
    assert len(trainer._logs["prompt"]) == len(trainer._logs["advantages"]) == rows
    # One metric entry per batch, the mean of that batch's values: 0.25, and the batch's completion count.
    assert all(entry["custom/quarter"] == 0.25 and entry["custom/rows"] == rows for entry in logs)

    header, table = completion_table(trainer._logs, num_samples=3)
    assert header == ["prompt", "completion", "logging_reward", "advantage", "first_char", "length"]
    assert len(table) == 3 and [row[4] for row in table] == [c[:1] for c in completions[:3]]


def test_log_extra_checks_its_values():
    buffer = RewardLogBuffer()
    buffer.start_batch(2)
    with pytest.raises(ValueError, match=r"log_extra\('col', values\) got 3 values for 2 completions"):
        buffer.log_extra("col", [1, 2, 3])
    with pytest.raises(TypeError, match="values must be a list"):
        buffer.log_extra("col", "ab")
    buffer.log_extra("col", [1, 2])
    with pytest.raises(ValueError, match="log_extra column 'col' was already logged"):
        buffer.log_extra("col", [3, 4])
    with pytest.raises(TypeError, match=r"log_metric\('m', value\): value must be a number"):
        buffer.log_metric("m", "high")


def test_completion_logs_survive_a_checkpoint():
    logs = completion_logs(3)
    for i in range(4):  # bounded: the oldest row falls out
        logs["prompt"].append(f"p{i}")
        logs["completion"].append([{"role": "assistant", "content": f"c{i}"}])
        logs["rewards"]["r"].append(float("nan") if i == 2 else float(i))
        logs["advantages"].append(-float(i))
        logs["extra"]["obj"].append(object() if i == 3 else i)
    restored = completion_logs(3)
    restore_completion_logs(restored, completion_logs_state(logs))
    assert list(restored["prompt"]) == ["p1", "p2", "p3"] and list(restored["advantages"]) == [-1.0, -2.0, -3.0]
    assert restored["completion"][0] == [{"role": "assistant", "content": "c1"}]
    assert restored["rewards"]["r"][0] == 1.0 and restored["rewards"]["r"][1] != restored["rewards"]["r"][1]  # NaN
    assert list(restored["extra"]["obj"])[:2] == [1, 2] and restored["extra"]["obj"][2].startswith("<object object")


# --- every reward None -------------------------------------------------------------------------------------------


def never_applies(completions, **kwargs):
    return [None] * len(completions)


def test_all_none_rewards_warn_with_the_row(caplog):
    with caplog.at_level(logging.WARNING):
        score_completions(resolve_rewards([never_applies]), prompts=["1+1=", "2+2="], completions=["2", "5"],
                          completion_ids=[[0], [0]], columns={"task": ["code", "math"]},
                          extra_kwargs={"trainer_state": None, "log_extra": print, "log_metric": print})
    warnings_ = [r.getMessage() for r in caplog.records if UNSCORED in r.getMessage()]
    expected = (f"{UNSCORED}\n{{'task': 'code', 'prompt': '1+1=', 'completion': '2'}}\n"
                "Please ensure that at least one reward function returns a valid reward.")
    assert warnings_ == [expected]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _score([never_applies, length_reward], ["ab"])
    assert UNSCORED not in caplog.text


def test_trainer_warns_once_per_round_when_every_reward_is_none(tmp_path, caplog):
    trainer = _trainer(RLOOTrainer, tmp_path, [never_applies])
    with caplog.at_level(logging.WARNING):
        train_quietly(trainer)
    assert sum(UNSCORED in r.getMessage() for r in caplog.records) == 2  # 2 steps, one round each
    assert "trainer_state" not in caplog.text and "log_extra" not in caplog.text


# --- reward attributes -------------------------------------------------------------------------------------------


def test_reward_attributes_of_grpo_rloo_and_ppo(tmp_path):
    reward_model = _reward_model()
    trainer = _trainer(RLOOTrainer, tmp_path, reward_model, reward_processing_classes=TOKENIZER)
    assert trainer.reward_funcs == [reward_model] and trainer.reward_processing_classes == [TOKENIZER]

    trainer = _trainer(GRPOTrainer, tmp_path, [length_reward, reward_model],
                       reward_processing_classes=[None, TOKENIZER])
    assert trainer.reward_funcs == [length_reward, reward_model]
    assert trainer.reward_processing_classes == [None, TOKENIZER]
    with pytest.raises(ValueError, match=r"number of reward processing classes \(1\) must match"):
        _trainer(GRPOTrainer, tmp_path, [length_reward, reward_model], reward_processing_classes=[TOKENIZER])

    ppo = make_ppo_trainer(tmp_path / "ppo", reward_funcs=(length_reward,))
    assert ppo.reward_funcs == [length_reward] and ppo.reward_processing_classes == [None]


# --- beam search -------------------------------------------------------------------------------------------------


def test_beam_search_with_shared_prompt_prefill_matches_the_plain_prefill():
    model = presets.load_preset_model("tiny", seed=0, tokenizer=TOKENIZER)
    prompts = ["12+3=", "7+8=", "12+3=", "7+8="]
    kwargs = {"max_completion_length": 6, "generation_kwargs": {"do_sample": False, "num_beams": 2,
                                                                "length_penalty": -0.1}}
    shared = generate_completions(model, TOKENIZER, prompts, share_prompt_prefill=True, **kwargs)
    plain = generate_completions(model, TOKENIZER, prompts, **kwargs)
    assert shared.completion_ids.shape[0] == 4
    assert torch.equal(shared.completion_ids, plain.completion_ids)


def test_rloo_trains_with_beam_sampling_generation_kwargs(tmp_path):
    trainer = _trainer(RLOOTrainer, tmp_path, [length_reward, char_reward],
                       generation_kwargs={"do_sample": True, "top_k": 50, "num_beams": 2, "length_penalty": -0.1})
    assert trainer.prefix_sharing.enabled  # the shared prompt prefill is what beam search used to break
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    logs = train_quietly(trainer)
    assert len(logs) == 2 and all(entry["loss"] is not None for entry in logs)
    assert any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
