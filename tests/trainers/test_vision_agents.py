"""GRPO's tool loop and ``rollout_func`` on a vision-language model: the prompt's image fields reach every
continuation's ``generate`` and the scoring forward of the whole conversation (prompt with image tokens, completion,
text tool results); a tool that returns an image is refused with the fix; a ``rollout_func`` sees the prompts with
their images and its prompt ids must be the processor's. ``generate`` is scripted (the tiny LLaVA's samples would never form a tool
call); the scores are checked against the model's own logits."""

from __future__ import annotations

import random
import warnings
from unittest.mock import patch

import pytest
import torch
from datasets import Dataset

from fusedrl import GRPOConfig, GRPOTrainer
from fusedrl.trainers.data.vision import collate_vision
from tests.helpers.vision import solid_image, tiny_vlm

# Character-level like the presets' template, with tools (a system turn), <tool_call> JSON in assistant turns, tool
# results as "result: ..." user turns, and image blocks rendered as LLaVA's <image> placeholder.
VLM_TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>tools:{% for t in tools %} "
    "{{ (t.function if t.function is defined else t).name }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|user|>result: {{ m.content }}{{ eos_token }}"
    "{% else %}{{ '<|' + m.role + '|>' }}{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for b in m.content or [] %}{% if b.type == 'image' %}<image>{% else %}{{ b.text }}{% endif %}{% endfor %}"
    "{% endif %}{% for c in m.tool_calls or [] %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CALL = '<tool_call>{"name": "TOOL", "arguments": {"a": 3, "b": 4}}</tool_call><eos>'


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def screenshot(a: int, b: int) -> list:
    """Take a screenshot.

    Args:
        a: The width.
        b: The height.
    """
    return [{"type": "image", "image": solid_image(random.Random(a), 32)}, {"type": "text", "text": "here"}]


def _trainer(tmp_path, **agents):
    model, processor = tiny_vlm("llava")
    processor.chat_template = processor.tokenizer.chat_template = VLM_TOOL_TEMPLATE
    rng = random.Random(0)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} times 4?"}] for i in range(2)],
                                 "image": [solid_image(rng, 32) for _ in range(2)]})
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=200, max_steps=1, learning_rate=0.1, bf16=False, report_to="none",
                      save_strategy="no", use_cpu=True, kernels="all=reference", seed=3, shuffle_dataset=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOTrainer(model, reward_funcs=lambda completions, **kw: [1.0] * len(completions), args=args,
                           train_dataset=dataset, processing_class=processor, **agents)


def _scripted(tokenizer, turns, calls):
    def generate(input_ids, **kwargs):
        calls.append({"rows": input_ids.shape[0], "pixel_values": kwargs.get("pixel_values"),
                      "text": [tokenizer.decode(row) for row in input_ids]})
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in turns[len(calls) - 1]]
        width = max(len(row) for row in rows)
        completion = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        return torch.cat([input_ids, completion.to(input_ids.device)], dim=1)

    return generate


def test_tool_turns_of_a_vision_model_keep_the_prompt_images(tmp_path):
    trainer = _trainer(tmp_path, tools=[multiply])
    tokenizer = trainer.processing_class.tokenizer
    rows = [trainer.train_dataset[i] for i in (0, 0, 1, 1)]
    calls = []
    first = [CALL.replace("TOOL", "multiply"), "12<eos>", "7<eos>", CALL.replace("TOOL", "multiply")]
    with patch.object(trainer.model, "generate", side_effect=_scripted(tokenizer, [first, ["Done<eos>"] * 2], calls)):
        batch = trainer._generate_and_score(rows)
    # The continuation of rows 0 and 3 (images of prompts 0 and 1) gets exactly those rows' pixels.
    assert calls[1]["rows"] == 2 and "<|user|>result: 12<eos><|assistant|>" in calls[1]["text"][0]
    expected_pixels = torch.cat([batch["vision"][0]["images"]["pixel_values"],
                                 batch["vision"][3]["images"]["pixel_values"]])
    assert torch.equal(calls[1]["pixel_values"], expected_pixels)
    assert batch["tool_mask"][0].eq(0).any() and batch["tool_mask"][1].eq(1).all()
    # The fused scores of the whole conversation equal the model's own logits with the images.
    prompt_width, completion_width = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                               attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
                               **collate_vision(batch["vision"], prompt_width, completion_width)).logits
    expected = torch.log_softmax(logits[:, prompt_width - 1:-1], -1).gather(
        -1, batch["completion_ids"][..., None]).squeeze(-1) * batch["completion_mask"]
    torch.testing.assert_close(trainer._sampled_logps(trainer.model, batch, 4), expected, rtol=1e-4, atol=1e-5)


def test_a_tool_returning_an_image_is_refused_with_the_fix(tmp_path):
    trainer = _trainer(tmp_path, tools=[screenshot])
    tokenizer = trainer.processing_class.tokenizer
    first = [CALL.replace("TOOL", "screenshot"), "1<eos>", "2<eos>", "3<eos>"]
    with patch.object(trainer.model, "generate", side_effect=_scripted(tokenizer, [first], [])), \
            pytest.raises(ValueError, match="'screenshot' returned an image.*return text"):
        trainer._generate_and_score([trainer.train_dataset[i] for i in (0, 0, 1, 1)])


def test_a_rollout_func_on_a_vision_model_gets_the_prompt_images(tmp_path):
    """TRL's contract: the rollout_func sees the prompts with their images in the messages and returns ids; the
    scoring forward then takes each row's image fields, encoded by the processor; ids that are not the processor's
    (so image tokens the features could not fill) are refused with the fix."""
    seen = []

    def rollout(prompts, trainer_):
        processor, tokenizer = trainer_.processing_class, trainer_.processing_class.tokenizer
        seen.extend(prompts)
        ids = [list(processor.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                    ["input_ids"][0]) for p in prompts]
        return {"prompt_ids": ids, "completion_ids": [tokenizer("12<eos>", add_special_tokens=False)["input_ids"]]
                * len(prompts), "logprobs": None}

    trainer = _trainer(tmp_path, rollout_func=rollout)
    batch = trainer._generate_and_score([trainer.train_dataset[i] for i in (0, 0, 1, 1)])
    assert seen[0][0]["content"][0]["type"] == "image" and "image" in seen[0][0]["content"][0]
    assert batch["vision"] is not None and batch["vision"][2]["images"]["pixel_values"].shape[0] == 1
    prompt_width = batch["prompt_ids"].shape[1]
    image_token = trainer.model.config.image_token_id
    assert (batch["prompt_ids"] == image_token).sum(1).tolist() == [4, 4, 4, 4]
    assert torch.isfinite(trainer._sampled_logps(trainer.model, batch, 4)).all() and prompt_width > 4

    def text_ids(prompts, trainer_):
        return {"prompt_ids": [[1, 5, 6]] * len(prompts), "completion_ids": [[7, 2]] * len(prompts), "logprobs": None}

    trainer = _trainer(tmp_path / "text_ids", rollout_func=text_ids)
    with pytest.raises(ValueError, match="prompt_ids of row 0 differ from the processor's encoding"):
        trainer._generate_and_score([trainer.train_dataset[i] for i in (0, 0, 1, 1)])
