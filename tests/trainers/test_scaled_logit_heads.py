"""Models whose logits are the LM head's output times a constant (Cohere's ``logit_scale``, Granite's division by
``logits_scaling``): the fused head folds the constant into its weight, so DPO's log-probs and every metric match
TRL's, which reads the model's own logits. A non-linear transform (Gemma 2's final soft-capping) is still refused.
"""

from __future__ import annotations

import pytest
import torch
import trl
from transformers import (
    Cohere2Config,
    Cohere2ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
)

import fusedrl.trainers as fused
from fusedrl.trainers.models import head_logit_multiplier
from tests.helpers.models import TINY_LLAMA
from tests.helpers.parity import assert_matches_trl, train_logs, trainable_snapshot
from tests.trainers.test_dpo_trainer import make_trainer

_WIDTHS = {key: TINY_LLAMA[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                            "bos_token_id", "eos_token_id", "pad_token_id")}
# Scales far from 1 so that a head ignoring them would move every log-prob by much more than the tolerance.
MODELS = {
    "cohere2": (Cohere2ForCausalLM, Cohere2Config(**_WIDTHS, logit_scale=0.25, head_dim=12,
                                                  layer_types=["sliding_attention", "full_attention"],
                                                  sliding_window=64), 0.25),
    "granite": (GraniteForCausalLM, GraniteConfig(**_WIDTHS, logits_scaling=8.0, tie_word_embeddings=False), 0.125),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def scaled_model_dir(request, tmp_path_factory):
    model_cls, config, multiplier = MODELS[request.param]
    torch.manual_seed(0)
    model = model_cls(config)
    assert head_logit_multiplier(model) == multiplier
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return str(path)


def test_dpo_matches_trl_on_scaled_logits(scaled_model_dir, tmp_path):
    expected = train_logs(make_trainer(trl, scaled_model_dir, tmp_path / "trl"))
    trainer = make_trainer(fused, scaled_model_dir, tmp_path / "fused")
    before = trainable_snapshot(trainer)
    assert_matches_trl(train_logs(trainer), expected, before, trainer)


def test_fused_log_probs_are_the_models_own(scaled_model_dir, tmp_path):
    """The trainer's per-token log-probs of a batch equal log_softmax of the model's full logits at the labels."""
    trainer = make_trainer(fused, scaled_model_dir, tmp_path / "fused")
    model = trainer.model.eval()
    input_ids = torch.tensor([[1, 5, 9, 17, 33, 2], [1, 7, 11, 40, 41, 2]])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.no_grad():
        head = trainer.head_inputs(model, inputs, input_ids)
        logits = head.hidden_NTH.float() @ head.weight_VH.float().T
        expected = model(**inputs).logits[:, :-1].float().log_softmax(-1)
    torch.testing.assert_close(logits.log_softmax(-1).gather(-1, head.labels_NT[..., None]),
                               expected.gather(-1, head.labels_NT[..., None]), rtol=1e-5, atol=1e-5)


def test_soft_capped_logits_are_refused(tmp_path):
    model = Gemma2ForCausalLM(Gemma2Config(**_WIDTHS, head_dim=12, final_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        make_trainer(fused, model, tmp_path)
