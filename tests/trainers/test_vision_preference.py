"""Vision-language models in DPO and KTO: rows with an ``image`` / ``images`` column are encoded by the model's
processor when batched, and every forward of a row (policy, reference, precomputed reference, KTO's KL pairs) gets
its image fields. The fused head's sequence log-probs are checked against the model's own logits over the same
inputs, so a forward that lost its pixels, or misaligned a per-token field (Gemma 3's ``token_type_ids``, Qwen's
``mm_token_type_ids``), fails; and the logged metrics against TRL's own trainers on the same tiny VLM."""

from __future__ import annotations

import math
import random

import pytest
import torch
import trl
from datasets import Dataset

import fusedrl.trainers as fused
from fusedrl.ops.preference import sequence_logps
from fusedrl.trainers.head import IGNORE_INDEX
from tests.helpers.parity import train_logs
from tests.helpers.vision import save_tiny_vlm, solid_image, tiny_vlm
from tests.utils import assert_close

FAMILIES = ("llava", "gemma3", "qwen2_vl")
# Keys of a batch that are not image fields.
_TEXT_KEYS = ("input_ids", "attention_mask", "completion_mask", "label", "ref_logps", "ref_KL_logps",
              "ref_chosen_logps", "ref_rejected_logps")


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _pairs(n: int, *, column: str = "image", seed: int = 0) -> Dataset:
    """``n`` conversational pairs with one 32x32 image each; chosen lengths differ, so the batch has padding."""
    rng = random.Random(seed)
    images = [solid_image(rng, 32) for _ in range(n)]
    return Dataset.from_dict({
        "prompt": [_user(f"What color is square {i}?") for i in range(n)],
        "chosen": [_assistant("Red." * (i % 3 + 1)) for i in range(n)],
        "rejected": [_assistant("Blue, I think.") for _ in range(n)],
        column: images if column == "image" else [[image] for image in images],
    })


def _unpaired(n: int, *, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    return Dataset.from_dict({
        "prompt": [_user(f"What color is square {i}?") for i in range(n)],
        "completion": [_assistant("Red square." * (i % 3 + 1)) for i in range(n)],
        "label": [i % 2 == 0 for i in range(n)],
        "images": [[solid_image(rng, 32)] for _ in range(n)],
    })


def _settings(tmp_path, **overrides) -> dict:
    # bf16=False: the default bf16 mixed precision runs the head in bf16, 1e-3 away from the model's fp32 logits.
    return {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "max_steps": 2, "logging_steps": 1,
            "learning_rate": 0.1, "bf16": False, "report_to": [], "save_strategy": "no", "seed": 0,
            "use_cpu": True, "disable_tqdm": True, "max_length": None, **overrides}


def _trainer(lib, method: str, tmp_path, family: str, dataset: Dataset, *, model=None, **overrides):
    """``lib``'s (fusedrl's or TRL's) DPO or KTO trainer on ``tiny_vlm(family)`` with its processor; the reference
    is a second ``tiny_vlm(family)`` (same weights), which TRL needs for a model given as an object."""
    vlm, processor = tiny_vlm(family)
    config = getattr(lib, f"{method}Config")(**_settings(tmp_path, **overrides))
    return getattr(lib, f"{method}Trainer")(model=vlm if model is None else model, ref_model=tiny_vlm(family)[0],
                                            args=config, train_dataset=dataset, processing_class=processor)


def _image_fields(batch: dict, prefix: str = "") -> dict:
    """The batch's image fields for the rows ``prefix`` names: shared per-image fields, ``prefix`` per-token ones."""
    fields = {key: value for key, value in batch.items() if key not in _TEXT_KEYS and not key.startswith("KL_")}
    return {key: batch.get(prefix + key, value) for key, value in fields.items()}


def _model_sequence_logps(model, batch: dict, prefix: str = "") -> torch.Tensor:
    """Summed completion log-probs ``[N]`` from the model's own ``[N, T, V]`` logits, image fields included."""
    input_ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}completion_mask"]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=batch[f"{prefix}attention_mask"],
                       **_image_fields(batch, prefix)).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logps * mask[:, 1:]).sum(-1)


def _fused_sequence_logps(trainer, batch: dict, prefix: str = "") -> torch.Tensor:
    """The same from the trainer's fused head, through the inputs the trainer builds (KTO: its ``_sequences``)."""
    if isinstance(trainer, fused.KTOTrainer):
        inputs, labels, mask_NT = trainer._sequences(batch, prefix)
    else:
        inputs = {key: value for key, value in batch.items() if key != "completion_mask"}
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
        mask_NT = batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        return sequence_logps(trainer.token_logprobs(trainer.model, inputs, labels).logps, mask_NT)


def _swap_images(rows: list[dict]) -> list[dict]:
    """The rows with the images of rows 0 and 1 exchanged (same size, so the same image tokens)."""
    key = "image" if "image" in rows[0] else "images"
    swapped = [dict(row) for row in rows]
    swapped[0][key], swapped[1][key] = rows[1][key], rows[0][key]
    return swapped


@pytest.mark.parametrize("family", FAMILIES)
def test_logps_match_model_logits_and_follow_the_pixels(tmp_path, family):
    """DPO's 2B rows and KTO's rows and KL rows: fused log-probs == the model's own (fp32, 1e-4); swapping the
    pixels of two rows changes them while the ids stay the same."""
    for method, dataset, prefixes in (("DPO", _pairs(4), ("",)), ("KTO", _unpaired(4), ("", "KL_"))):
        trainer = _trainer(fused, method, tmp_path / method, family, dataset)
        trainer.model.eval()
        rows = [trainer.train_dataset[i] for i in range(2)]
        batch = trainer.data_collator(rows)
        image_token = trainer.model.config.image_token_id
        assert (batch["input_ids"] == image_token).sum(1).min() > 0  # every row holds its image tokens
        swapped = trainer.data_collator(_swap_images(rows))
        assert torch.equal(swapped["input_ids"], batch["input_ids"])
        for prefix in prefixes:
            ours = _fused_sequence_logps(trainer, batch, prefix)
            assert_close(ours, _model_sequence_logps(trainer.model, batch, prefix), rtol=1e-4, atol=1e-4,
                         name=f"{method} {prefix}rows")
            # Rows do not interact and fp32 is deterministic, so a row that ignored its pixels would not move at all.
            moved = (_fused_sequence_logps(trainer, swapped, prefix) - ours).abs()
            assert (moved > 0).all() and moved.max() > 1e-3, f"{method} {prefix}rows ignore their pixels: {moved}"
        if method == "KTO":  # KL row i: prompt i (and its image) with completion i - 1 (the first: the last's)
            ids, kl_ids = batch["input_ids"], batch["KL_input_ids"]
            prompt_0 = int(batch["completion_mask"][0].argmax())  # the first completion position
            assert torch.equal(kl_ids[0, :prompt_0], ids[0, :prompt_0])
            assert torch.equal(kl_ids[0, prompt_0:][batch["KL_completion_mask"][0, prompt_0:].bool()],
                               ids[1][batch["completion_mask"][1].bool()])


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_and_kto_train_a_vision_model(tmp_path, family):
    for method, dataset in (("DPO", _pairs(4, column="images")), ("KTO", _unpaired(4))):
        trainer = _trainer(fused, method, tmp_path / method, family, dataset)
        before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
        logs = train_logs(trainer)
        assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)
        after = dict(trainer.model.named_parameters())
        decoder = [name for name in before if "language_model" in name or name.startswith("lm_head")]
        unchanged = [name for name in decoder if "norm" not in name and torch.equal(before[name], after[name])]
        assert decoder and not unchanged, f"{method}: language-model tensors that did not move: {unchanged}"


def test_vlm_loaded_by_path_with_its_processor(tmp_path):
    path = save_tiny_vlm("llava", str(tmp_path / "vlm"))
    config = fused.DPOConfig(**_settings(tmp_path / "out", max_steps=1))
    trainer = fused.DPOTrainer(model=path, args=config, train_dataset=_pairs(2))
    assert type(trainer.model).__name__ == "LlavaForConditionalGeneration"
    assert trainer._is_vlm and not trainer.prefix_sharing.enabled
    assert math.isfinite(train_logs(trainer)[0]["loss"])


def test_text_only_rows_with_a_vision_processor(tmp_path):
    """TRL's text-only data on a VLM: the text path, rendered with the processor's chat template (the tiny LLaVA's
    tokenizer has none of its own, like llava-hf checkpoints)."""
    dataset = Dataset.from_dict({"prompt": [_user("Hi?")] * 2, "chosen": [_assistant("Yes.")] * 2,
                                 "rejected": [_assistant("No!")] * 2})
    trainer = _trainer(fused, "DPO", tmp_path, "llava", dataset)
    assert "chosen_ids" in trainer.train_dataset.column_names and not trainer.prefix_sharing.enabled
    assert all(math.isfinite(entry["loss"]) for entry in train_logs(trainer))


def test_precomputed_reference_logps_carry_the_images(tmp_path):
    """Precomputed columns (batches of 3) == the live reference's log-probs of the training batches (of 2), for
    DPO's pairs and KTO's examples and KL pairs; then 2 steps train on them."""
    family = "qwen2_vl"  # per-image grids and per-token mm_token_type_ids
    cases = (("DPO", _pairs(4), ("ref_chosen_logps", "ref_rejected_logps")),
             ("KTO", _unpaired(4), ("ref_logps", "ref_KL_logps")))
    for method, dataset, columns in cases:
        trainer = _trainer(fused, method, tmp_path / method, family, dataset, precompute_ref_log_probs=True,
                           precompute_ref_batch_size=3)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        precomputed = [batch.pop(column) for column in columns]
        if method == "DPO":
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
            inputs = {key: value for key, value in batch.items() if key != "completion_mask"}
            live = trainer._reference_logps(inputs, labels, batch["completion_mask"][:, 1:].bool())
        else:
            live = trainer._reference_logps(batch)
        for name, ours, expected in zip(columns, precomputed, live, strict=True):
            assert_close(ours, expected, rtol=1e-4, atol=1e-4, name=f"{method} {name}")
        assert all(math.isfinite(entry["loss"]) for entry in train_logs(trainer))


def test_implicit_prompt_and_rows_without_images(tmp_path):
    """DPO rows without ``prompt`` (the shared start is the prompt) and an ``images`` list that is empty for one
    row: that row gets no image tokens and adds no pixels; the log-probs still match the model's."""
    rng = random.Random(1)
    dataset = Dataset.from_dict({
        "chosen": [_user("Which color?") + _assistant("Red."), _user("Any image?") + _assistant("None.")],
        "rejected": [_user("Which color?") + _assistant("Green!"), _user("Any image?") + _assistant("Yes.")],
        "images": [[solid_image(rng, 32)], []],
    })
    trainer = _trainer(fused, "DPO", tmp_path, "llava", dataset)
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    image_tokens = (batch["input_ids"] == trainer.model.config.image_token_id).sum(1)
    assert image_tokens.tolist() == [4, 0, 4, 0] and batch["pixel_values"].shape[0] == 2  # pair 0, chosen+rejected
    assert_close(_fused_sequence_logps(trainer, batch), _model_sequence_logps(trainer.model, batch),
                 rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["DPO", "KTO"])
def test_compute_metrics_logits_carry_the_images(tmp_path, method):
    """An eval with compute_metrics hands it the policy's [N, T, V] logits of each batch: built with the batch's image
    fields, they are the model's own logits (a text-only forward would give others)."""
    dataset = _pairs(2) if method == "DPO" else _unpaired(2)
    seen = []
    trainer = _trainer(fused, method, tmp_path, "llava", dataset)
    trainer.compute_metrics = lambda prediction: seen.append(prediction) or {"seen": 1.0}
    batch = trainer.data_collator([dataset[i] for i in range(2)])
    ours = trainer.sequence_logits(trainer.model, batch)
    with torch.no_grad():
        expected = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 **_image_fields(batch)).logits
        text_only = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, text_only, atol=1e-3)
    metrics = trainer.evaluate(eval_dataset=dataset)
    assert metrics["eval_seen"] == 1.0 and seen and seen[0].predictions.shape[-1] == expected.shape[-1]


def test_refusals_name_the_field_and_the_fix(tmp_path):
    model, processor = tiny_vlm("llava")

    def build(method="DPO", dataset=None, processing_class=processor, compute_metrics=None, **overrides):
        config = getattr(fused, f"{method}Config")(**_settings(tmp_path, **overrides))
        dataset = dataset if dataset is not None else (_pairs(2) if method == "DPO" else _unpaired(2))
        return getattr(fused, f"{method}Trainer")(model=model, args=config, train_dataset=dataset,
                                                  processing_class=processing_class, compute_metrics=compute_metrics)

    for method in ("DPO", "KTO"):
        with pytest.raises(ValueError, match="vision-related.*not seem to be a vision-language model"):
            build(method, processing_class=processor.tokenizer)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="truncation_mode='keep_end' is not supported"):
        build(max_length=64, truncation_mode="keep_end")
    with pytest.raises(ValueError, match="unpaired format.*unpair_preference_dataset"):
        build("KTO", dataset=_pairs(2))
    strings = _pairs(2).map(lambda row: {"prompt": "What color?", "chosen": "Red.", "rejected": "Blue."})
    with pytest.raises(ValueError, match="requires conversational"):
        build(dataset=strings)
    # A prompt (image tokens included) that does not fit below max_length is refused when its batch is built.
    trainer = build(max_length=12)
    with pytest.raises(ValueError, match=r"max_length=12 is too short .* prompt, image tokens included"):
        trainer.data_collator([trainer.train_dataset[0]])
    image_completion = _pairs(1).map(lambda row: {"chosen": [{"role": "assistant", "content": [{"type": "image"}]}]})
    trainer = build(dataset=image_completion)
    with pytest.raises(ValueError, match="'chosen' completion holds an image block"):
        trainer.data_collator([trainer.train_dataset[0]])


@pytest.mark.parametrize(("method", "family"), [("DPO", "llava"), ("KTO", "llava")])
def test_matches_trl_on_a_vision_model(tmp_path, method, family):
    """Same weights, data, seed and config (fp32): every metric TRL's own trainer logs in 2 steps, fusedrl logs
    with the same value (KTO: batches of 3, so the KL pairs rotate within each)."""
    dataset = _pairs(4) if method == "DPO" else _unpaired(6)
    overrides = {"learning_rate": 1e-2, "gradient_checkpointing": False,
                 "per_device_train_batch_size": 2 if method == "DPO" else 3}
    expected = train_logs(_trainer(trl, method, tmp_path / "trl", family, dataset, **overrides))
    actual = train_logs(_trainer(fused, method, tmp_path / "fused", family, dataset, **overrides))
    assert len(actual) == len(expected) == 2
    for step, (ours, theirs) in enumerate(zip(actual, expected, strict=True)):
        for key, value in theirs.items():
            if "runtime" not in key and "per_second" not in key and key != "total_flos":
                assert_close(torch.tensor(ours[key]), torch.tensor(value), rtol=1e-4, atol=1e-4,
                             name=f"step {step} {key}")
