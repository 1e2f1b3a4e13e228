"""Vision-language models in the sampling trainers (GRPO, RLOO, online DPO): prompts with images are encoded by the
model's processor, sampled with the image features, and scored by the fused head with the same image fields in every
forward. The scores are checked against the model's own logits over the same inputs, so a forward that lost its
images (or misaligned a per-token field) fails."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from fusedrl import GRPOConfig, GRPOTrainer, OnlineDPOConfig, OnlineDPOTrainer, PPOConfig, RLOOConfig, RLOOTrainer
from fusedrl.trainers.data.vision import (
    attach_images,
    collate_vision,
    extend_vision_row,
    prompt_images,
    row_images,
)
from fusedrl.trainers.online.resume import load_round, save_round
from tests.helpers.vision import image_prompts, save_tiny_vlm, solid_image, tiny_vlm

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "gemma3", "llava", "llava_next", "idefics2")


def completion_length(completions, **kwargs):
    return [float(len(completion[0]["content"])) for completion in completions]


def _grpo(tmp_path, family: str, trainer_cls=GRPOTrainer, config_cls=GRPOConfig, dataset=None, **overrides):
    model, processor = tiny_vlm(family)
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "num_generations": 2,
                "max_completion_length": 6, "learning_rate": 0.1, "report_to": "none", "max_steps": 2,
                "use_cpu": True, "beta": 0.1, "logging_steps": 1, "save_strategy": "no", **overrides}
    return trainer_cls(model=model, reward_funcs=completion_length, args=config_cls(**settings),
                       train_dataset=dataset if dataset is not None else image_prompts(4), processing_class=processor)


def _model_logps(model, batch: dict, temperature: float) -> torch.Tensor:
    """The completion tokens' log-probs from the model's own ``[B, T, V]`` logits, image fields included."""
    prompt_width, completion_width = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    fields = collate_vision(batch["vision"], prompt_width, completion_width, dtype=model.dtype)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                       attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
                       **fields).logits
    logps = torch.log_softmax(logits[:, prompt_width - 1:-1].float() / temperature, -1)
    token_logps = logps.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    return token_logps * batch["completion_mask"]


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_round_is_scored_with_the_image_features(tmp_path, family):
    trainer = _grpo(tmp_path, family, temperature=0.7, bf16=False)  # fp32 throughout: exact up to rounding
    rows = [trainer.train_dataset[i] for i in (0, 0, 1, 1)]
    batch = trainer._generate_and_score(rows)
    assert len(batch["vision"]) == 4 and all(row is not None and row["images"] for row in batch["vision"])
    image_token = trainer.model.config.image_token_id
    assert not (batch["completion_ids"] == image_token).any()  # suppressed: no features would stand behind it
    assert (batch["prompt_ids"] == image_token).sum(1).min() > 0
    ours = trainer._sampled_logps(trainer.model, batch, batch_size=3)  # 3: a micro-batch cuts the rows 3 + 1
    expected = _model_logps(trainer.model, batch, temperature=0.7)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    # The images reach the scores: the same rows with the other prompt's pixels (same size) score differently.
    swapped = [{"images": batch["vision"][j]["images"], "tokens": batch["vision"][i]["tokens"]}
               for i, j in enumerate((2, 3, 0, 1))]
    other = dict(batch, vision=swapped)
    assert not torch.allclose(trainer._sampled_logps(trainer.model, other, batch_size=4), ours, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "llava"])
def test_grpo_and_rloo_train_a_vision_model(tmp_path, family):
    for trainer_cls, config_cls in ((GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)):
        trainer = _grpo(tmp_path / trainer_cls.__name__, family, trainer_cls, config_cls)
        before = {name: param.clone() for name, param in trainer.model.named_parameters()}
        trainer.train()
        logged = trainer.state.log_history[-2]
        assert torch.isfinite(torch.tensor(logged["loss"])) and logged["completions/mean_length"] > 0
        changed = {name for name, param in trainer.model.named_parameters() if not torch.equal(param, before[name])}
        decoder = [name for name in before if ".language_model." in name or name.startswith("lm_head")]
        assert decoder and set(decoder) <= changed | {n for n in decoder if "norm" in n}
        # The latest generation batch's rows, each with its prompt's image (TRL's _logs["images"]).
        assert len(trainer._logs["images"]) == trainer.args.generation_batch_size
        assert all(len(images) == 1 for images in trainer._logs["images"])


def test_grpo_takes_several_images_per_row_and_logs_none_when_asked(tmp_path):
    rows = image_prompts(2, column="images")
    two_per_row = Dataset.from_dict({"prompt": rows["prompt"], "images": [
        [solid_image(__import__("random").Random(i), 32), solid_image(__import__("random").Random(10 + i), 32)]
        for i in range(2)]})
    trainer = _grpo(tmp_path, "qwen2_vl", dataset=two_per_row, log_multimodal=False, bf16=False)
    batch = trainer._generate_and_score([trainer.train_dataset[i] for i in (0, 0, 1, 1)])
    assert all(row["images"]["image_grid_thw"].shape[0] == 2 for row in batch["vision"])
    image_token = trainer.model.config.image_token_id
    per_row = (batch["prompt_ids"] == image_token).sum(1)
    assert per_row.tolist() == [int(row["images"]["image_grid_thw"].prod(1).sum() // 4) for row in batch["vision"]]
    torch.testing.assert_close(trainer._sampled_logps(trainer.model, batch, 4),
                               _model_logps(trainer.model, batch, 1.0), rtol=1e-4, atol=1e-5)
    trainer.train()
    assert len(trainer._logs["images"]) == 0


def test_online_dpo_trains_a_vision_model(tmp_path):
    model, processor = tiny_vlm("llava")
    args = OnlineDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_new_tokens=6,
                           learning_rate=0.1, bf16=False, report_to="none", max_steps=2, use_cpu=True, logging_steps=1,
                           save_strategy="no")
    trainer = OnlineDPOTrainer(model=model, reward_funcs=completion_length, args=args,
                               train_dataset=image_prompts(4, column="images"), processing_class=processor)
    rows = [trainer.train_dataset[i] for i in (0, 1)]
    inputs = trainer._prepare_inputs(rows)
    assert "position_ids" not in inputs and len(inputs["vision"]) == 4
    head = trainer.head_inputs(trainer.model, {"input_ids": inputs["input_ids"],
                                               "attention_mask": inputs["attention_mask"],
                                               **collate_vision(inputs["vision"], inputs["input_ids"].shape[1], 0)},
                               inputs["labels"])
    with torch.no_grad():
        logits = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               **collate_vision(inputs["vision"], inputs["input_ids"].shape[1], 0)).logits
    expected = logits[:, :-1] @ torch.eye(logits.shape[-1])  # the head's input, projected: the model's logits
    projected = head.hidden_NTH @ head.weight_VH.T
    mask = inputs["attention_mask"][:, 1:].bool()
    torch.testing.assert_close(projected[mask], expected[mask], rtol=1e-4, atol=1e-4)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-2]["loss"]))


def test_a_vision_model_loads_by_path_with_its_processor(tmp_path):
    path = save_tiny_vlm("gemma3", str(tmp_path / "vlm"))
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, report_to="none", max_steps=1, use_cpu=True, save_strategy="no")
    trainer = GRPOTrainer(model=path, reward_funcs=completion_length, args=args, train_dataset=image_prompts(2))
    assert type(trainer.model).__name__ == "Gemma3ForConditionalGeneration"
    assert type(trainer.processing_class).__name__ == "Gemma3Processor" and trainer._is_vlm
    trainer.train()


def test_vision_refusals_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="conversational prompts"):
        _grpo(tmp_path, "llava", dataset=Dataset.from_dict(
            {"prompt": ["a string prompt"], "image": [solid_image(__import__("random").Random(0), 32)]}),
            max_steps=1).train()
    model, _ = tiny_vlm("llava")
    tokenizer_only = GRPOTrainer(model=model, reward_funcs=completion_length, train_dataset=image_prompts(2),
                                 processing_class=tiny_vlm("llava")[1].tokenizer, args=GRPOConfig(
                                     output_dir=str(tmp_path / "t"), per_device_train_batch_size=2,
                                     num_generations=2, max_completion_length=4, report_to="none", use_cpu=True))
    with pytest.raises(ValueError, match="pass the vision-language model's processor"):
        tokenizer_only._generate_and_score([tokenizer_only.train_dataset[0]] * 2)
    with pytest.raises(ValueError, match="max_prompt_length"):
        _grpo(tmp_path / "v", "llava", max_prompt_length=4, max_steps=1).train()
    from fusedrl import PPOTrainer  # PPO keeps text prompts only
    assert PPOTrainer is not None and PPOConfig is not None


def test_attach_images_follows_trl_placement_and_leaves_the_input_alone():
    image_a, image_b = object(), object()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is this?"},
                {"role": "assistant", "content": "a cat"}, {"role": "user", "content": "and this?"}]
    attached = attach_images(messages, [image_a, image_b])
    assert messages[1]["content"] == "what is this?"
    assert attached[0]["content"] == [{"type": "text", "text": "be brief"}]
    assert attached[1]["content"] == [{"type": "image", "image": image_a}, {"type": "image", "image": image_b},
                                      {"type": "text", "text": "what is this?"}]
    assert attached[3]["content"] == [{"type": "text", "text": "and this?"}]
    assert prompt_images(attached) == [image_a, image_b]
    placed = [{"role": "user", "content": [{"type": "text", "text": "compare"}, {"type": "image"}]}]
    assert attach_images(placed, [image_a])[0]["content"][1] == {"type": "image", "image": image_a}
    with pytest.raises(ValueError, match="1 image placeholder"):
        attach_images(placed, [image_a, image_b])
    assert row_images([{"image": None}, {"image": image_a}]) == [None, [image_a]]
    assert row_images([{"images": []}]) is None and row_images([{"prompt": "x"}]) is None


def test_collate_vision_pads_images_and_aligns_token_fields():
    rows = [{"images": {"pixel_values": torch.ones(1, 2, 3)}, "tokens": {"token_type_ids": torch.tensor([1, 1, 0])}},
            None,
            {"images": {"pixel_values": torch.full((2, 4, 3), 2.0)}, "tokens": {"token_type_ids": torch.tensor([1])}}]
    out = collate_vision(rows, prompt_width=4, completion_width=2)
    assert out["pixel_values"].shape == (3, 4, 3)
    assert out["pixel_values"][0, 2:].abs().sum() == 0 and out["pixel_values"][1:].eq(2.0).all()
    assert out["token_type_ids"].tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]]


def test_images_in_a_completion_extend_the_row_and_collate_after_the_prompt():
    """A tool's image rendered into the completion (tool loop): its per-image fields follow the prompt's (padded to
    one trailing shape, LLaVA-NeXT's patch counts differ), its per-token fields land at the completion positions it
    was rendered at; a prompt without images gets zero type ids of its length. The input rows are left as they
    were."""
    prompt_row = {"images": {"pixel_values": torch.ones(1, 2, 3)}, "tokens": {"token_type_ids": torch.tensor([1, 0])}}
    first = {"images": {"pixel_values": torch.full((1, 3, 3), 2.0)}, "tokens": {"token_type_ids": torch.tensor([0, 1])}}
    row = extend_vision_row(prompt_row, first, prompt_length=2, completion_length=1)
    row = extend_vision_row(row, first, prompt_length=2, completion_length=5)
    assert prompt_row["images"]["pixel_values"].shape == (1, 2, 3) and "completion_tokens" not in prompt_row
    assert row["images"]["pixel_values"].shape == (3, 3, 3) and row["images"]["pixel_values"][0, 2].eq(0).all()
    assert row["completion_tokens"]["token_type_ids"].tolist() == [0, 0, 1, 0, 0, 0, 1]
    new = extend_vision_row(None, first, prompt_length=3, completion_length=0)
    assert new["tokens"]["token_type_ids"].tolist() == [0, 0, 0]
    out = collate_vision([row, None, new], prompt_width=3, completion_width=6)
    assert out["pixel_values"].shape == (4, 3, 3)
    assert out["token_type_ids"].tolist() == [[0, 1, 0, 0, 0, 1, 0, 0, 0], [0] * 9, [0, 0, 0, 0, 1, 0, 0, 0, 0]]


def test_a_pending_vision_round_survives_a_checkpoint(tmp_path):
    row = {"images": {"pixel_values": torch.randn(4, 6), "image_grid_thw": torch.tensor([[1, 2, 2]])},
           "tokens": {"mm_token_type_ids": torch.tensor([0, 1, 1])},
           "completion_tokens": {"mm_token_type_ids": torch.tensor([0, 0, 1, 1, 0])}}  # a tool's image
    batches = [{"prompt_ids": torch.ones(2, 3, dtype=torch.long), "vision": [row, None]}]
    save_round(str(tmp_path / "round.safetensors"), batches, {})
    loaded, _ = load_round(str(tmp_path / "round.safetensors"), torch.device("cpu"))
    assert loaded[0]["vision"][1] is None
    for kind in ("images", "tokens", "completion_tokens"):
        assert loaded[0]["vision"][0][kind].keys() == row[kind].keys()
        for key, value in row[kind].items():
            assert torch.equal(loaded[0]["vision"][0][kind][key], value)


@pytest.mark.parametrize("family", ["llava", "llava_next", "idefics2"])
def test_grpo_on_a_vision_model_logs_what_trl_logs(tmp_path, family):
    """fusedrl's and TRL's GRPOTrainer on the same saved VLM, image prompts, reward and seed: the same completions
    are sampled (one RNG stream, same image inputs) and every metric TRL logs agrees (fp32, reference kernels).
    Qwen-VL and Gemma 3 are not compared: TRL 1.16 re-encodes the rendered prompt text for its scoring forward with
    the tokenizer's special tokens on, and this tokenizer adds a BOS to plain text, so TRL's per-token image fields
    sit one column off the ids (Qwen-VL's rotary index then fails; Gemma 3's bidirectional image mask shifts)."""
    import trl
    from transformers import AutoModelForImageTextToText

    from tests.helpers.grpo_parity import GRPO_BASE, assert_grpo_logs_match

    path = save_tiny_vlm(family, str(tmp_path / "vlm"))
    logs = []
    for trainer_cls, config_cls in ((GRPOTrainer, GRPOConfig), (trl.GRPOTrainer, trl.GRPOConfig)):
        config = config_cls(str(tmp_path / trainer_cls.__module__.split(".")[0]), **{
            **GRPO_BASE, "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 5,
            "beta": 0.1})
        if hasattr(config, "kernels"):
            config.kernels = "all=reference"
        trainer = trainer_cls(AutoModelForImageTextToText.from_pretrained(path), reward_funcs=completion_length,
                              args=config, train_dataset=image_prompts(8), processing_class=tiny_vlm(family)[1])
        trainer.train()
        logs.append([entry for entry in trainer.state.log_history if "loss" in entry])
    assert_grpo_logs_match(*logs)


def test_prompt_validation_takes_multimodal_blocks_and_names_a_bad_one():
    from fusedrl.trainers.data import DatasetFormatError, check_prompt_dataset

    blocks = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Why?"}]}]
    check_prompt_dataset(Dataset.from_list([{"prompt": blocks, "images": [solid_image(__import__("random").Random(0),
                                                                                       32)]}]), "train_dataset",
                         images_ok=True)
    bad = [{"role": "user", "content": [{"type": "video"}]}]
    with pytest.raises(DatasetFormatError, match=r"row 0, field 'prompt', message 0, block 0: expected"):
        check_prompt_dataset(Dataset.from_list([{"prompt": bad}]), "train_dataset")
    blank = [{"role": "user", "content": [{"type": "text", "text": "  "}]}]
    with pytest.raises(DatasetFormatError, match="empty"):
        check_prompt_dataset(Dataset.from_list([{"prompt": blank}]), "train_dataset")


def test_a_checkpoint_inside_a_vision_round_resumes_it(tmp_path):
    """A checkpoint between the two micro-batches of a round keeps the round's image fields (online/resume.py): the
    resumed run's second step is the uninterrupted run's, loss and weights, without sampling again."""
    settings = {"max_steps": 2, "steps_per_generation": 2, "save_strategy": "steps", "save_steps": 1, "bf16": False,
                "seed": 5}
    full = _grpo(tmp_path / "full", "llava", **settings)
    full.train()
    resumed = _grpo(tmp_path / "resumed", "llava", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    assert resumed._buffered_inputs[1]["vision"] is not None
    expected = next(entry for entry in full.state.log_history if entry.get("step") == 2 and "loss" in entry)
    actual = next(entry for entry in resumed.state.log_history if entry.get("step") == 2 and "loss" in entry)
    compared = {name for name in expected if name not in ("step_time", "memory/peak_rss_mb")}
    assert {"loss", "grad_norm", "kl", "entropy"} <= compared
    assert {name: actual[name] for name in compared} == {name: expected[name] for name in compared}
    for (name, ours), (_, theirs) in zip(resumed.model.named_parameters(), full.model.named_parameters(), strict=True):
        assert torch.equal(ours, theirs), name
