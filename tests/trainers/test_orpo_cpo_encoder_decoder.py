"""fusedrl's ORPO and CPO on an encoder-decoder model (a tiny T5) against trl.experimental's 1.16 trainers.

- parity: both trainers run 2 optimizer steps on equal T5 weights, data, seed and config; every metric TRL logs must
  match to fp32 precision (tests/utils.assert_close: rtol = atol = 1e-5), the loss must be finite and every
  trainable tensor must have moved. The cases cover T5's head scaling both ways (``scale_decoder_outputs``: the
  original T5 multiplies the decoder's output by d_model**-0.5 before its tied head, "v1.1" does not), answers cut by
  ``max_completion_length``, conversational data, gradient accumulation with evaluation, LoRA, and every CPO loss type;
- kernels: the reference, compiled and Triton backends give the same first-step loss and gradients on T5;
- refusals: a model whose logits get a non-zero ``final_logits_bias``, a decoder without a start token, several
  adapters trained together.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import BartConfig, BartForConditionalGeneration

import fusedrl.trainers as fused
from fusedrl.cli.presets.tokenizer import build_tokenizer
from tests.helpers.data import EVAL_PAIRS, conversational_pairs, standard_pairs
from tests.helpers.models import tiny_t5
from tests.helpers.parity import (
    assert_backends_agree,
    assert_matches_trl,
    base_settings,
    first_step,
    train_logs,
    trainable_snapshot,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning: the peer is only compared against
    from trl.experimental import cpo as trl_cpo
    from trl.experimental import orpo as trl_orpo

T5_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], "lora_dropout": 0.0}


def make_trainer(module, method: str, output_dir, *, model=None, train=None, eval_dataset=None, peft_config=None,
                 **overrides):
    trainer_cls, config_cls = getattr(module, f"{method}Trainer"), getattr(module, f"{method}Config")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer_cls(model=tiny_t5() if model is None else model,
                           args=config_cls(**base_settings(output_dir, **overrides)),
                           train_dataset=standard_pairs() if train is None else train, eval_dataset=eval_dataset,
                           processing_class=build_tokenizer(), peft_config=peft_config)


# Each case: (method, config overrides, fresh-object factories for the trainer arguments).
PARITY_CASES = {
    "orpo-scaled-head": ("ORPO", {}, {}),
    "orpo-unscaled-head": ("ORPO", {}, {"model": lambda: tiny_t5(tie_word_embeddings=False)}),
    "orpo-answers-cut-4": ("ORPO", {"max_completion_length": 4}, {}),
    "orpo-conversational": ("ORPO", {}, {"train": conversational_pairs}),
    "orpo-grad-accumulation-eval": ("ORPO", {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                             "beta": 0.5}, {"eval_dataset": lambda: Dataset.from_dict(EVAL_PAIRS)}),
    "orpo-peft-lora": ("ORPO", {}, {"peft_config": lambda: LoraConfig(**T5_LORA)}),
    "cpo-sigmoid": ("CPO", {"loss_type": "sigmoid"}, {}),
    "cpo-hinge": ("CPO", {"loss_type": "hinge"}, {}),
    "cpo-ipo": ("CPO", {"loss_type": "ipo"}, {}),
    "cpo-simpo-unscaled-head": ("CPO", {"loss_type": "simpo"}, {"model": lambda: tiny_t5(tie_word_embeddings=False)}),
    "cpo-alphapo": ("CPO", {"loss_type": "alphapo", "alpha": 0.25}, {}),
}


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_matches_trl(name, tmp_path):
    method, overrides, factories = PARITY_CASES[name]
    module = trl_orpo if method == "ORPO" else trl_cpo
    evaluate = "eval_dataset" in factories

    def build(peer, output_dir):
        return make_trainer(peer, method, output_dir, **{key: make() for key, make in factories.items()}, **overrides)

    expected = train_logs(build(module, tmp_path / "trl"), evaluate)
    trainer = build(fused, tmp_path / "fused")
    assert trainer.is_encoder_decoder
    before = trainable_snapshot(trainer)
    assert_matches_trl(train_logs(trainer, evaluate), expected, before, trainer, num_logs=2 + evaluate)


def test_head_scaling_is_the_models_own(tmp_path):
    """The two T5 flavours differ only in the d_model**-0.5 factor before the head: their first-step log-probs must
    differ, so the parity cases above would catch a head path that applied the wrong one."""
    scaled = make_trainer(fused, "ORPO", tmp_path / "scaled")
    unscaled = make_trainer(fused, "ORPO", tmp_path / "unscaled", model=tiny_t5(tie_word_embeddings=False))
    assert scaled.model.config.scale_decoder_outputs and not unscaled.model.config.scale_decoder_outputs
    assert not torch.allclose(first_step(scaled)[0], first_step(unscaled)[0])


def test_kernel_backends_agree(tmp_path):
    assert_backends_agree(lambda backend: make_trainer(fused, "ORPO", tmp_path / backend,
                                                       kernels=f"linear_logprobs={backend}"))


def test_batch_layout(tmp_path):
    """The collated encoder-decoder batch: each prompt twice (chosen rows, then rejected rows), the answers as
    labels padded with -100, unshifted (a label row is exactly a tokenized answer)."""
    trainer = make_trainer(fused, "CPO", tmp_path, per_device_train_batch_size=2)
    batch = next(iter(trainer.get_train_dataloader()))
    assert torch.equal(batch["input_ids"][:2], batch["input_ids"][2:])
    assert torch.equal(batch["attention_mask"][:2], batch["attention_mask"][2:])
    labels = batch["labels"]
    assert labels.shape[0] == 4 and torch.equal(batch["completion_mask"].bool(), labels != -100)
    for rows, side in ((labels[:2], "chosen"), (labels[2:], "rejected")):
        answers = {tuple(row[f"{side}_labels"]) for row in trainer.train_dataset}
        assert all(tuple(row[row != -100].tolist()) in answers for row in rows)


def test_max_completion_length_defaults_to_128(tmp_path, caplog):
    long_answers = standard_pairs().map(lambda row: {"chosen": row["chosen"] * 60})
    with caplog.at_level("WARNING", logger="fusedrl"):
        trainer = make_trainer(fused, "ORPO", tmp_path, train=long_answers, max_completion_length=None)
    assert trainer.max_completion_length == 128 and "max_completion_length is None" in caplog.text
    assert max(len(row["chosen_labels"]) for row in trainer.train_dataset) == 128


def test_refuses_nonzero_final_logits_bias(tmp_path):
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=128, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2))
    bart.final_logits_bias.fill_(0.5)
    with pytest.raises(ValueError, match="non-zero final_logits_bias"):
        make_trainer(fused, "ORPO", tmp_path, model=bart)


def test_refuses_missing_decoder_start_token(tmp_path):
    model = tiny_t5()
    model.config.decoder_start_token_id = None
    with pytest.raises(ValueError, match=r"decoder_start_token_id is None"):
        make_trainer(fused, "CPO", tmp_path, model=model)


def test_refuses_joint_adapters(tmp_path):
    from peft import get_peft_model

    model = get_peft_model(tiny_t5(), LoraConfig(**T5_LORA), adapter_name="first")
    model.add_adapter("second", LoraConfig(**T5_LORA))
    datasets = {"first": standard_pairs(), "second": standard_pairs()}
    with pytest.raises(ValueError, match="encoder-decoder model trains one adapter at a time"):
        make_trainer(fused, "ORPO", tmp_path, model=model, train=datasets, model_adapter_name=["first", "second"])
