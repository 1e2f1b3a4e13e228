"""GRPO's agentic rollouts (issue 14; TRL 1.16's ``tools``, ``environment_factory``, ``rollout_func`` and
``max_tool_calling_iterations``): the tool loop, the tool mask in the loss, environments (routing, pooled
instances, reset observations, owned rewards, owned data), a user rollout function, and the refusals.

``model.generate`` is replaced by a script of completions (a tiny random model would never write a tool call); the
rest (parsing, tool execution, the tool results' tokens, scoring, the loss) is the trainer's own.
"""

from __future__ import annotations

import asyncio
import warnings
from unittest.mock import patch

import pytest
import torch
from datasets import Dataset

from fusedrl import GRPOConfig, GRPOTrainer
from fusedrl.cli import presets
from fusedrl.trainers.online.agents.parsing import derived_response_template, parse_completion
from tests.helpers.online import train_quietly
from tests.helpers.tool_turns import TOOL_TEMPLATE, multiply


async def async_multiply(a: int, b: int) -> int:
    """Multiply two integers, asynchronously.

    Args:
        a: The first factor.
        b: The second factor.
    """
    await asyncio.sleep(0)
    return a * b


def tool_tokenizer():
    tokenizer = presets.build_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def scripted_generate(tokenizer, turns: list[list[str]], calls: list):
    """A ``generate`` replacement: call k returns ``turns[k]`` (one text per row, right-padded); ``calls`` records
    each call's batch size and decoded input."""

    def generate(input_ids, **kwargs):
        texts = turns[len(calls)]
        calls.append([tokenizer.decode(row, skip_special_tokens=False) for row in input_ids])
        assert len(texts) == input_ids.shape[0], f"turn {len(calls)}: {input_ids.shape[0]} rows, script {len(texts)}"
        rows = [ids_of(tokenizer, text) for text in texts]
        width = max(len(row) for row in rows)
        completion = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        return torch.cat([input_ids, completion.to(input_ids.device)], dim=1)

    return generate


def conversational_prompts(n: int = 2) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} times 4?"}] for i in range(n)]})


def settings(tmp_path, **overrides) -> GRPOConfig:
    values = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "num_generations": 2,
              "max_completion_length": 256, "max_steps": 1, "logging_steps": 1, "learning_rate": 0.1, "bf16": False,
              "report_to": [], "save_strategy": "no", "use_cpu": True, "kernels": "all=reference",
              "dataloader_pin_memory": False, "disable_tqdm": True, "seed": 3, "shuffle_dataset": False}
    values.update(overrides)
    return GRPOConfig(**values)


def length_reward(completions, **kwargs):
    return [float(sum(len(m.get("content") or "") for m in c)) for c in completions]


def tiny_model(tokenizer):
    model = presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer)
    # Character-level conversations with tool results run past the preset's 128 positions (rotary: no table to grow).
    model.config.max_position_embeddings = 512
    return model


def make_trainer(tmp_path, tokenizer, *, dataset=None, reward_funcs=(length_reward,), **kwargs) -> GRPOTrainer:
    config_overrides = kwargs.pop("config", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOTrainer(tiny_model(tokenizer),
                           reward_funcs=list(reward_funcs) if reward_funcs is not None else None,
                           args=settings(tmp_path, **config_overrides),
                           train_dataset=conversational_prompts() if dataset is None else dataset,
                           processing_class=tokenizer, **kwargs)


CALL_OK = '<tool_call>{"name": "TOOL", "arguments": {"a": 3, "b": 4}}</tool_call><eos>'
CALL_BAD_ARG = '<tool_call>{"name": "TOOL", "arguments": {"a": 3, "c": 4}}</tool_call><eos>'


@pytest.mark.parametrize("tool", [multiply, async_multiply], ids=["sync", "async"])
def test_tool_loop_runs_calls_and_masks_tool_results(tmp_path, tool):
    """4 rows: a good call, a call with a wrong argument name (a failure the model sees), two plain answers. 2 calls
    in 4 rows -> call_frequency 0.5; 1 of 2 failed -> failure_frequency 0.5."""
    tokenizer = tool_tokenizer()
    seen = []

    def recording_reward(completions, **kwargs):
        seen.extend(completions)
        return length_reward(completions)

    trainer = make_trainer(tmp_path, tokenizer, reward_funcs=[recording_reward], tools=[tool])
    first = [CALL_OK.replace("TOOL", tool.__name__), CALL_BAD_ARG.replace("TOOL", tool.__name__), "12<eos>", "7<eos>"]
    calls = []
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with patch.object(trainer.model, "generate", side_effect=scripted_generate(tokenizer, [first, ["Done<eos>"] * 2],
                                                                               calls)):
        logs = train_quietly(trainer)
    assert [len(c) for c in calls] == [4, 2]  # only the rows that called a tool continue
    assert calls[1][0].endswith("</tool_call><eos><|user|>result: 12<eos><|assistant|>")
    assert "result: {'error':" in calls[1][1]
    step = logs[0]
    assert step["tools/call_frequency"] == pytest.approx(0.5)
    assert step["tools/failure_frequency"] == pytest.approx(0.5)
    # The reward functions get the whole conversation after the prompt.
    assert seen[0][0]["tool_calls"][0]["function"] == {"name": tool.__name__, "arguments": {"a": 3, "b": 4}}
    assert seen[0][1] == {"role": "tool", "name": tool.__name__, "content": "12"}
    assert seen[0][2]["content"] == "Done"
    assert seen[2] == [{"role": "assistant", "content": "12"}]
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_tool_mask_keeps_tool_results_out_of_the_loss(tmp_path):
    tokenizer = tool_tokenizer()
    trainer = make_trainer(tmp_path, tokenizer, tools=[multiply], config={"max_steps": 1})
    first = [CALL_OK.replace("TOOL", "multiply"), "12<eos>", "7<eos>", "9<eos>"]
    batches = []
    original = trainer._generate_and_score

    def keep(inputs):
        batches.append(original(inputs))
        return batches[-1]

    with patch.object(trainer, "_generate_and_score", side_effect=keep), \
            patch.object(trainer.model, "generate", side_effect=scripted_generate(tokenizer, [first, ["Done<eos>"]],
                                                                                  [])):
        logs = train_quietly(trainer)
    batch = batches[0]
    suffix = ids_of(tokenizer, "<|user|>result: 12<eos><|assistant|>")
    call = ids_of(tokenizer, CALL_OK.replace("TOOL", "multiply"))
    row = 0  # captured before the round's shuffle: rows in sampling order, the tool call first
    ids = batch["completion_ids"][row]
    mask = batch["tool_mask"][row]
    assert ids[:len(call)].tolist() == call
    assert ids[len(call):len(call) + len(suffix)].tolist() == suffix
    assert mask[:len(call)].tolist() == [1] * len(call)
    assert mask[len(call):len(call) + len(suffix)].tolist() == [0] * len(suffix)
    done = ids_of(tokenizer, "Done<eos>")
    assert mask[len(call) + len(suffix):len(call) + len(suffix) + len(done)].tolist() == [1] * len(done)
    counted = (batch["completion_mask"] * batch["tool_mask"]).sum()
    assert batch["num_items_in_batch"].item() == counted.item()
    assert counted.item() == batch["completion_mask"].sum().item() - len(suffix)
    # Logged lengths count the sampled tokens only (TRL's): the tool row has len(call) + len(done) of them.
    assert logs[0]["completions/max_length"] == len(call) + len(done)


def test_max_tool_calling_iterations_and_completion_budget(tmp_path):
    tokenizer = tool_tokenizer()
    call = CALL_OK.replace("TOOL", "multiply")
    # Zero turns: the call is parsed but never run.
    trainer = make_trainer(tmp_path / "zero", tokenizer, tools=[multiply],
                           config={"max_tool_calling_iterations": 0})
    calls = []
    with patch.object(trainer.model, "generate",
                      side_effect=scripted_generate(tokenizer, [[call, "1<eos>", "2<eos>", "3<eos>"]], calls)):
        logs = train_quietly(trainer)
    assert len(calls) == 1 and logs[0]["tools/call_frequency"] == 0.0
    # A budget the tool results would overflow: the row keeps its completion as it is (no second generate call).
    budget = len(ids_of(tokenizer, call)) + 3
    trainer = make_trainer(tmp_path / "budget", tokenizer, tools=[multiply], config={"max_completion_length": budget})
    calls = []
    with patch.object(trainer.model, "generate",
                      side_effect=scripted_generate(tokenizer, [[call, "1<eos>", "2<eos>", "3<eos>"]], calls)):
        train_quietly(trainer)
    assert len(calls) == 1


def test_malformed_tool_call_is_plain_text(tmp_path):
    tokenizer = tool_tokenizer()
    tokenizer.response_template = derived_response_template(tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    broken = '<tool_call>{"name": "multiply", "argu'
    assert parse_completion(tokenizer, ids_of(tokenizer, broken), prompt) == {"role": "assistant", "content": broken}
    unnamed = '<tool_call>{"nme": "multiply"}</tool_call><eos>'
    assert "tool_calls" not in parse_completion(tokenizer, ids_of(tokenizer, unnamed), prompt)


def test_llama3_style_tool_calls_are_parsed():
    tokenizer = presets.build_tokenizer()
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|' + m.role + '|>' }}{% if m.tool_calls %}"
        "{% for c in m.tool_calls %}{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}"
        "{% endfor %}{% else %}{{ m.content }}{% endif %}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.response_template = derived_response_template(tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    parsed = parse_completion(tokenizer, ids_of(tokenizer, '{"name": "multiply", "parameters": {"a": 2, "b": 5}}<eos>'),
                              prompt)
    assert parsed["tool_calls"] == [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 2, "b": 5}}}]
    assert parse_completion(tokenizer, ids_of(tokenizer, "ten<eos>"), prompt) == {"role": "assistant", "content": "ten"}


def test_chat_template_without_tool_support_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not support tool calling"):
        make_trainer(tmp_path, presets.build_tokenizer(), tools=[multiply])


class Counter:
    """An environment with a tool, an owned reward, and an observation from reset."""

    instances = 0

    def __init__(self):
        Counter.instances += 1
        self.total = 0
        self.resets = []

    def reset(self, **example):
        self.total = 0
        self.resets.append(example)
        return " Count up."

    def increment(self, step: int) -> int:
        """Add to the counter.

        Args:
            step: How much to add.
        """
        self.total += step
        return self.total

    def get_reward(self) -> float:
        return float(self.total)


class Echo:
    def reset(self, **example):
        return None

    def shout(self, text: str) -> str:
        """Shout the text.

        Args:
            text: What to shout.
        """
        return text.upper()


def test_environments_route_tools_reset_and_own_their_reward(tmp_path):
    """Batch [counter, counter, echo, echo]: each environment's rows see only its tools and call them; Counter's
    get_reward is a reward column (named after the class) scored for its rows only."""
    Counter.instances = 0
    tokenizer = tool_tokenizer()
    dataset = Dataset.from_dict({"environment": ["counter", "echo"], "level": [1, 2]})
    trainer = make_trainer(tmp_path, tokenizer, dataset=dataset, reward_funcs=None,
                           environment_factory={"counter": Counter, "echo": Echo})
    assert trainer.reward_func_names == ["Counter"]
    assert Counter.instances == 1  # the probe seeds the pool
    first = ['<tool_call>{"name": "increment", "arguments": {"step": 5}}</tool_call><eos>', "no<eos>",
             '<tool_call>{"name": "shout", "arguments": {"text": "hi"}}</tool_call><eos>', "ok<eos>"]
    calls = []
    with patch.object(trainer.model, "generate",
                      side_effect=scripted_generate(tokenizer, [first, ["Done<eos>", "Done<eos>"]], calls)):
        logs = train_quietly(trainer)
    prompts = calls[0]
    assert "tools: increment<eos>" in prompts[0] and "shout" not in prompts[0]
    assert "tools: shout<eos>" in prompts[2] and "increment" not in prompts[2]
    assert "Count up.<eos>" in prompts[0]  # the observation joined the user's message
    assert "result: 5<eos>" in calls[1][0] and "result: HI<eos>" in calls[1][1]
    assert Counter.instances == 2  # two concurrent counter rollouts: the pool grew by one
    assert [type(e) for e in trainer.environments] == [Counter, Counter, Echo, Echo]  # TRL's: the round's rows
    pool = trainer.agents.environments.pool["counter"]
    assert all(r == {"level": 1} for e in pool for r in e.resets)  # `environment` is not passed to reset
    assert logs[0]["rewards/Counter/mean"] == pytest.approx(2.5)  # (5 + 0) / 2; echo rows are None, not 0
    assert logs[0]["tools/failure_frequency"] == 0.0


def test_unknown_environment_raises(tmp_path):
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "x"}]] * 2, "environment": ["other"] * 2})
    trainer = make_trainer(tmp_path, tool_tokenizer(), dataset=dataset, environment_factory={"counter": Counter})
    with pytest.raises(ValueError, match="not among the environments"):
        train_quietly(trainer)


def test_environment_owned_data_and_its_refusals(tmp_path):
    tokenizer = tool_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(tokenizer)
        with pytest.raises(ValueError, match="`max_steps` must be set"):
            GRPOTrainer(model, reward_funcs=[length_reward], args=settings(tmp_path, max_steps=-1),
                        processing_class=tokenizer, environment_factory=Counter)
        with pytest.raises(ValueError, match="requires a `train_dataset` with an `environment` column"):
            GRPOTrainer(model, reward_funcs=[length_reward], args=settings(tmp_path), processing_class=tokenizer,
                        environment_factory={"counter": Counter})
        with pytest.raises(ValueError, match="`train_dataset` is required"):
            GRPOTrainer(model, reward_funcs=[length_reward], args=settings(tmp_path), processing_class=tokenizer)
        trainer = GRPOTrainer(model, reward_funcs=None, args=settings(tmp_path, max_steps=2),
                              processing_class=tokenizer, environment_factory=Counter)
    calls = []
    with patch.object(trainer.model, "generate",
                      side_effect=scripted_generate(tokenizer, [["a<eos>", "bb<eos>", "1<eos>", "22<eos>"]] * 2,
                                                    calls)):
        logs = train_quietly(trainer)
    assert len(logs) == 2 and all(c[0].endswith("<|user|> Count up.<eos><|assistant|>") for c in calls)


def test_rollout_func_feeds_tokens_masks_and_columns(tmp_path):
    tokenizer = tool_tokenizer()
    seen = {}

    def rollout_func(prompts, trainer):
        seen["prompts"] = prompts
        prompt_ids = [ids_of(tokenizer, "<|user|>q<eos><|assistant|>") for _ in prompts]
        completion_ids = [ids_of(tokenizer, f"ans{i}<eos>") for i in range(len(prompts))]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                "logprobs": [[0.0] * len(c) for c in completion_ids],
                "env_mask": [[1, 1, 1, 0, 1] for _ in completion_ids], "hint": [f"h{i}" for i in range(len(prompts))],
                "source": "env"}

    def hint_reward(completions, hint, source, **kwargs):
        seen["hint"], seen["source"] = hint, source
        return [float(len(h)) + i for i, h in enumerate(hint)]

    trainer = make_trainer(tmp_path, tokenizer, reward_funcs=[hint_reward], rollout_func=rollout_func)
    batches = []
    original = trainer._generate_and_score
    with patch.object(trainer, "_generate_and_score", side_effect=lambda rows: batches.append(original(rows))
                      or batches[-1]):
        train_quietly(trainer)
    assert len(seen["prompts"]) == 4 and seen["hint"] == ["h0", "h1", "h2", "h3"] and seen["source"] == ["env"] * 4
    batch = batches[0]
    assert batch["tool_mask"][:, :5].tolist() == [[1, 1, 1, 0, 1]] * 4
    assert batch["num_items_in_batch"].item() == 16


def test_rollout_func_missing_keys_raise(tmp_path):
    trainer = make_trainer(tmp_path, tool_tokenizer(),
                           rollout_func=lambda prompts, trainer: {"prompt_ids": [[1]], "completion_ids": [[2]]})
    with pytest.raises(ValueError, match=r"rollout_func must return keys \['logprobs'\]"):
        train_quietly(trainer)


def test_agentic_refusals(tmp_path):
    """Tools on string prompts (no assistant turn to read a call from) and the off-policy mask with a rollout_func
    (TRL masks with the rollout's sampling log-probs) are refused with the fix."""
    tokenizer = tool_tokenizer()
    strings = Dataset.from_dict({"prompt": ["What is 2 times 4?", "And 3 times 4?"]})
    trainer = make_trainer(tmp_path, tokenizer, dataset=strings, tools=[multiply])
    with patch.object(trainer.model, "generate", side_effect=scripted_generate(tokenizer, [["1<eos>"] * 4], [])), \
            pytest.raises(ValueError, match="need conversational prompts"):
        train_quietly(trainer)
    with pytest.raises(ValueError, match="off_policy_mask_threshold with a rollout_func"):
        make_trainer(tmp_path, tokenizer, rollout_func=lambda prompts, trainer: {},
                     config={"off_policy_mask_threshold": 0.5})
