"""Tool-calling conversations (TRL's format: an assistant turn with ``tool_calls`` and no ``content``, a ``tools``
column) in the preference data path: accepted by validation, rendered by the tokenizer's chat template with the
tools, trained on (issue 14, cause 5)."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

import fusedrl
from fusedrl.cli.presets import build_tokenizer
from fusedrl.trainers.data.validation import DatasetFormatError, validate_preference_dataset
from tests.helpers.models import tiny_llama

# Renders an assistant tool call as `call name({...})` and lists the tools first; a template without tool support
# would print None for the missing content.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}tools:{% for tool in tools %} {{ tool['function']['name'] }}{% endfor %}; {% endif %}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}call {{ call['function']['name'] }}"
    "({{ call['function']['arguments'] | tojson }}){% endfor %}{% else %}{{ message['content'] }}{% endif %}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {}}}}]


def tool_pairs() -> Dataset:
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "3+4?"}]],
        "chosen": [[{"role": "assistant", "tool_calls": [call], "content": None}],
                   [{"role": "assistant", "content": "7"}]],
        "rejected": [[{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "8"}]],
        "tools": [json.dumps(TOOLS)] * 2,
    })


def test_validation_accepts_a_tool_call_turn_and_names_the_fix_otherwise():
    validate_preference_dataset(tool_pairs())
    bad = Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]],
                             "chosen": [[{"role": "assistant", "content": None}]],
                             "rejected": [[{"role": "assistant", "content": "no"}]]})
    with pytest.raises(DatasetFormatError, match="'content' must be a string, got None$"):
        validate_preference_dataset(bad)


def test_dpo_trains_on_tool_calls_rendered_with_the_tools(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    args = fusedrl.DPOConfig(str(tmp_path), per_device_train_batch_size=2, max_steps=1, logging_steps=1, report_to=[], bf16=False,
                             use_cpu=True)
    trainer = fusedrl.DPOTrainer(tiny_llama(), args=args, train_dataset=tool_pairs(), processing_class=tokenizer)
    row = trainer.train_dataset[0]
    assert tokenizer.decode(row["prompt_ids"]).startswith("<bos>tools: add; <|user|>2+2?")
    assert tokenizer.decode(row["chosen_ids"]).startswith('call add({"a": 2, "b": 2})')
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 1 and losses[0] > 0
