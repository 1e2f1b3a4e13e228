"""GRPO's tool loop and ``rollout_func`` on a vision-language model: the prompt's image fields reach every
continuation's ``generate`` and the scoring forward of the whole conversation (prompt with image tokens, completion,
text tool results); a tool that returns an image gets it rendered into the completion; a ``rollout_func`` sees the prompts with
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
from tests.helpers.tool_turns import multiply
from tests.helpers.vision import save_tiny_vlm, solid_image, tiny_vlm

# Character-level like the presets' template, with tools (a system turn), <tool_call> JSON in assistant turns, tool
# results as "result: ..." user turns, and image blocks (a prompt's or a tool result's) rendered as PLACEHOLDER.
_TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>tools:{% for t in tools %} "
    "{{ (t.function if t.function is defined else t).name }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|user|>result: {% else %}{{ '<|' + m.role + '|>' }}{% endif %}"
    "{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for b in m.content or [] %}{% if b.type == 'image' %}PLACEHOLDER{% else %}{{ b.text }}{% endif %}{% endfor %}"
    "{% endif %}{% for c in m.tool_calls or [] %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# How each family's chat template writes an image (tests/helpers/vision.py).
PLACEHOLDERS = {"llava": "<image>", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                "gemma3": "<start_of_image>"}
CALL = '<tool_call>{"name": "TOOL", "arguments": {"a": 3, "b": 4}}</tool_call><eos>'


def screenshot(a: int, b: int) -> list:
    """Take a screenshot.

    Args:
        a: The width.
        b: The height.
    """
    return [{"type": "image", "image": solid_image(random.Random(a), 32)}, {"type": "text", "text": "here"}]


def _image_prompts() -> Dataset:
    rng = random.Random(0)
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} times 4?"}] for i in range(2)],
                              "image": [solid_image(rng, 32) for _ in range(2)]})


def _trainer(tmp_path, family="llava", reward=None, **agents):
    model, processor = tiny_vlm(family)
    processor.chat_template = processor.tokenizer.chat_template = _TOOL_TEMPLATE.replace("PLACEHOLDER",
                                                                                          PLACEHOLDERS[family])
    dataset = _image_prompts()
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=200, max_steps=1, learning_rate=0.1, bf16=False, report_to="none",
                      save_strategy="no", use_cpu=True, kernels="all=reference", seed=3, shuffle_dataset=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOTrainer(model, reward_funcs=reward or _reward, args=args,
                           train_dataset=dataset, processing_class=processor, **agents)


def _reward(completions, **kwargs):
    return [float(len(completion)) for completion in completions]


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


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3"])
def test_an_image_a_tool_returns_reaches_the_continuation_and_the_scores(tmp_path, family):
    """TRL 1.16's multimodal tool results: the processor renders the tool message's image into image tokens inside
    the completion (masked out of the loss like any tool result); its pixels follow the prompt's into the
    continuation's ``generate`` and the scoring forward; per-token type fields (Qwen's ``mm_token_type_ids``,
    Gemma's ``token_type_ids``) mark those tokens. Checked against TRL's own forward: every row's images through
    the image processor, type ids read off the ids."""
    rewarded = []

    def reward(completions, **kwargs):
        rewarded.extend(completions)
        return _reward(completions)

    trainer = _trainer(tmp_path, family, reward=reward, tools=[screenshot])
    processor, model = trainer.processing_class, trainer.model
    tokenizer, image_token = processor.tokenizer, model.config.image_token_id
    calls = []
    first = [CALL.replace("TOOL", "screenshot"), "1<eos>", "2<eos>", "3<eos>"]
    with patch.object(model, "generate", side_effect=_scripted(tokenizer, [first, ["Done<eos>"]], calls)):
        batch = trainer._generate_and_score([trainer.train_dataset[i] for i in (0, 0, 1, 1)])
    tool_image = screenshot(3, 4)[0]["image"]
    prompt_images = [trainer.train_dataset[i]["image"] for i in (0, 0, 1, 1)]
    tokens_per_image = int((batch["prompt_ids"][1] == image_token).sum())
    # Row 0's completion: the call, the tool's image tokens (masked out), "here", the sampled "Done".
    completion, mask = batch["completion_ids"][0], batch["tool_mask"][0]
    assert int((completion == image_token).sum()) == tokens_per_image > 0
    assert mask[completion == image_token].eq(0).all() and mask[:len(tokenizer(CALL)["input_ids"]) - 1].eq(1).all()
    assert tokenizer.decode(completion[batch["completion_mask"][0].bool()]).endswith("here<eos><|assistant|>Done<eos>")
    assert not (batch["completion_ids"][1:] == image_token).any()
    # The continuation's generate got row 0's prompt image, then the tool's.
    expected_pixels = processor.image_processor(images=[prompt_images[0], tool_image], return_tensors="pt")
    torch.testing.assert_close(calls[1]["pixel_values"], expected_pixels["pixel_values"])
    # The reward saw the tool message with its image block.
    assert rewarded[0][1]["role"] == "tool" and rewarded[0][1]["content"][0]["image"] == tool_image
    # TRL's forward of the whole batch: every row's images in order, type ids where the image tokens are.
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    flat = [prompt_images[0], tool_image, *prompt_images[1:]]
    inputs = dict(processor.image_processor(images=flat, return_tensors="pt"))
    type_key = next((key for key in ("mm_token_type_ids", "token_type_ids")
                     if key in collate_vision(batch["vision"], batch["prompt_ids"].shape[1])), None)
    if type_key is not None:
        inputs[type_key] = (ids == image_token).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
                       **inputs).logits
    prompt_width = batch["prompt_ids"].shape[1]
    expected = torch.log_softmax(logits[:, prompt_width - 1:-1], -1).gather(
        -1, batch["completion_ids"][..., None]).squeeze(-1) * batch["completion_mask"]
    torch.testing.assert_close(trainer._sampled_logps(model, batch, 4), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_image_tool_results_log_what_trl_logs(tmp_path, family):
    """fusedrl's and TRL 1.16's GRPOTrainer on the same saved VLM, image prompts and scripted turns (one row calls
    the screenshot tool, then says "Done"): every metric TRL logs agrees, loss and grad norm included, so both see
    the tool's image in the same tokens with the same features. Gemma 3 is not compared: TRL marks a tool image's
    tokens by looking up ``<|image_pad|>`` / ``<|image|>``, neither of which this tiny Gemma's tokenizer has."""
    import trl
    from transformers import AutoModelForImageTextToText

    from fusedrl.trainers.online.agents.parsing import derived_response_template
    from tests.helpers.grpo_parity import GRPO_BASE, assert_grpo_logs_match

    path = save_tiny_vlm(family, str(tmp_path / "vlm"))
    logs = []
    for trainer_cls, config_cls in ((GRPOTrainer, GRPOConfig), (trl.GRPOTrainer, trl.GRPOConfig)):
        _, processor = tiny_vlm(family)
        tokenizer = processor.tokenizer
        processor.chat_template = tokenizer.chat_template = _TOOL_TEMPLATE.replace("PLACEHOLDER", PLACEHOLDERS[family])
        tokenizer.response_template = derived_response_template(tokenizer)  # TRL knows no schema for this template
        config = config_cls(str(tmp_path / trainer_cls.__module__.split(".")[0]), **{
            **GRPO_BASE, "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 200,
            "max_steps": 1, "beta": 0.1, "shuffle_dataset": False})
        if hasattr(config, "kernels"):
            config.kernels = "all=reference"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = trainer_cls(AutoModelForImageTextToText.from_pretrained(path), reward_funcs=_reward, args=config,
                                  train_dataset=_image_prompts(), processing_class=processor, tools=[screenshot])
        first = [CALL.replace("TOOL", "screenshot"), "1<eos>", "2<eos>", "3<eos>"]
        calls = []
        with patch.object(trainer.model, "generate", side_effect=_scripted(tokenizer, [first, ["Done<eos>"]], calls)):
            trainer.train()
        assert len(calls) == 2
        logs.append([entry for entry in trainer.state.log_history if "loss" in entry])
    assert logs[0][0]["tools/call_frequency"] == 0.25
    assert_grpo_logs_match(*logs)


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
