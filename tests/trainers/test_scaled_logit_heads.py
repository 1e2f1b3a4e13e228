"""Models whose logits are not the LM head's plain output: a constant factor (Cohere's ``logit_scale``, Granite's
division by ``logits_scaling``), folded into the fused head's weight, and Gemma 2's final soft cap
(``final_logit_softcapping``: ``c * tanh(head(h) / c)``), which the fused head's ops apply to each logits tile. Either
way the trainers' log-probs and metrics match TRL's, which reads the model's own logits: DPO on all three, GRPO on
Gemma 2 (the cap before the sampling temperature), and the per-token log-probs, statistics and ``compute_metrics``
logits against the model's forward on every backend; and one step of every trainer family on Gemma 2 hands the cap to
every row of every LM-head pass it makes (loss, reference, old log-probs, statistics). A transform the fused head
cannot reproduce is still refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import trl
from datasets import Dataset
from transformers import (
    Cohere2Config,
    Cohere2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
)

import fusedrl
import fusedrl.trainers as fused
from fusedrl.cli import presets
from fusedrl.ops.logprobs import compiled as rows_compiled
from fusedrl.trainers.models import head_logit_multiplier, head_logit_softcap
from tests.helpers.data import CHOSEN, PROMPTS, REJECTED, standard_pairs
from tests.helpers.grpo_parity import assert_grpo_logs_match, run_grpo
from tests.helpers.models import TINY_GEMMA2, TINY_LLAMA, tiny_gemma2, tiny_llama
from tests.helpers.online import char_reward
from tests.helpers.parity import assert_matches_trl, base_settings, train_logs, trainable_snapshot
from tests.trainers.test_dpo_trainer import make_trainer
from tests.utils import assert_close

_WIDTHS = {key: TINY_LLAMA[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                            "bos_token_id", "eos_token_id", "pad_token_id")}
_SOFTCAP = TINY_GEMMA2["final_logit_softcapping"]
# name -> (model factory, logit multiplier, soft cap). Scales and caps far from 1 / 30 so that a head ignoring them
# would move every log-prob by much more than the tolerance (tests/helpers/models.py: the tiny Gemma 2's cap).
MODELS = {
    "cohere2": (lambda: Cohere2ForCausalLM(Cohere2Config(**_WIDTHS, logit_scale=0.25, head_dim=12,
                                                         layer_types=["sliding_attention", "full_attention"],
                                                         sliding_window=64)), 0.25, None),
    "granite": (lambda: GraniteForCausalLM(GraniteConfig(**_WIDTHS, logits_scaling=8.0, tie_word_embeddings=False)),
                0.125, None),
    "gemma2": (tiny_gemma2, 1.0, _SOFTCAP),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def scaled_model_dir(request, tmp_path_factory):
    factory, multiplier, softcap = MODELS[request.param]
    torch.manual_seed(0)
    model = factory()
    assert head_logit_multiplier(model) == multiplier
    assert head_logit_softcap(model) == softcap
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def soft_capped_model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gemma2")
    tiny_gemma2().save_pretrained(path)
    return str(path)


def test_dpo_matches_trl_on_scaled_logits(scaled_model_dir, tmp_path):
    """Two DPO steps (the fused head+loss op, compiled backend): every logged metric (loss, rewards, log-probs, the
    ``logits/*`` means of the model's own logits) and the trained weights as TRL's."""
    expected = train_logs(make_trainer(trl, scaled_model_dir, tmp_path / "trl"))
    trainer = make_trainer(fused, scaled_model_dir, tmp_path / "fused")
    before = trainable_snapshot(trainer)
    assert_matches_trl(train_logs(trainer), expected, before, trainer)


@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
def test_fused_log_probs_are_the_models_own(scaled_model_dir, tmp_path, backend):
    """The trainer's per-token log-probs (its fused head op on ``backend``) equal log_softmax of the model's full
    logits at the labels; so do the statistics of its tiles (top-1, log sum p^2) and the vocabulary mean of the
    logits (TRL's ``logits/*``), and ``compute_metrics``' logits are the model's own."""
    trainer = make_trainer(fused, scaled_model_dir, tmp_path / "fused")
    model = trainer.model.eval()
    input_ids = torch.tensor([[1, 5, 9, 17, 33, 2], [1, 7, 11, 40, 41, 2]])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    scored_NT = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad(), fusedrl.use_kernels(linear_logprobs=backend):
        ours = trainer.token_logprobs(model, inputs, input_ids, with_entropy=True, statistics_mask=scored_NT)
        logits = model(**inputs).logits.float()
        built = trainer.sequence_logits(model, inputs)
    logp_NTV = logits[:, :-1].log_softmax(-1)
    labels_NT1 = input_ids[:, 1:, None]
    assert_close(ours.logps, logp_NTV.gather(-1, labels_NT1)[..., 0], name="logps")
    assert_close(ours.entropy, -(logp_NTV.exp() * logp_NTV).sum(-1), name="entropy")
    assert torch.equal(ours.is_top1, logits[:, :-1].argmax(-1) == input_ids[:, 1:])
    assert_close(ours.log_sum_sq_probs, torch.logsumexp(2 * logp_NTV, -1), name="log sum p^2")
    assert_close(ours.mean_logits, logits[:, :-1].mean(-1), name="mean logits")
    assert_close(built.float(), logits, name="compute_metrics logits")


def test_grpo_matches_trl_on_soft_capped_logits(soft_capped_model_dir, tmp_path):
    """Two GRPO steps of Gemma 2 (sampling temperature 0.7, applied after the cap; KL against the reference; the fused
    policy loss on the compiled backend): identical completions and every metric TRL logs (loss, KL, entropy, clip
    ratios, rewards) within 1e-5, and every parameter moved."""
    fields = {"temperature": 0.7, "beta": 0.1, "loss_type": "grpo"}
    ours, ours_logs, moved, trainable = run_grpo(fused.GRPOTrainer, fused.GRPOConfig, soft_capped_model_dir,
                                                 tmp_path, kernels="all=compiled", **fields)
    _, theirs, _, _ = run_grpo(trl.GRPOTrainer, trl.GRPOConfig, soft_capped_model_dir, tmp_path, **fields)
    assert head_logit_softcap(ours.model) == _SOFTCAP
    assert_grpo_logs_match(ours_logs, theirs)
    assert moved == trainable, f"parameters that never moved: {sorted(trainable - moved)}"


_ONLINE = {"per_device_train_batch_size": 4, "max_steps": 1, "logging_steps": 1, "learning_rate": 1e-3, "bf16": False,
           "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "dataloader_pin_memory": False, "seed": 0,
           "kernels": "all=compiled"}


def _one_step_trainer(name: str, tmp_path):
    """One training step of trainer family ``name`` on the tiny Gemma 2, compiled kernels."""
    model, tokenizer = tiny_gemma2(), presets.build_tokenizer()
    prompts = presets.load_preset_dataset("arithmetic", kind="prompt", n=8, seed=1)
    if name in ("DPO", "CPO", "ORPO", "KTO"):
        data = standard_pairs()
        if name == "KTO":  # the pairs as unpaired examples, both labels in the batch
            labels = [True, False, True, True, False, True, False, False]
            data = Dataset.from_dict({"prompt": PROMPTS, "label": labels, "completion": [
                c if label else r for c, r, label in zip(CHOSEN, REJECTED, labels)]})
        args = getattr(fused, f"{name}Config")(**base_settings(tmp_path, max_steps=1, kernels="all=compiled"))
        return getattr(fused, f"{name}Trainer")(model=model, args=args, train_dataset=data,
                                                processing_class=tokenizer)
    online = {"GRPO": {"num_generations": 4, "max_completion_length": 6, "beta": 0.04},
              "RLOO": {"num_generations": 2, "max_completion_length": 6, "beta": 0.04},
              "OnlineDPO": {"max_new_tokens": 6, "use_cpu": True, "gradient_checkpointing": False},
              "PPO": {"num_mini_batches": 1, "num_ppo_epochs": 1, "response_length": 6, "use_cpu": True,
                      "gradient_checkpointing": False}}[name]
    args = getattr(fused, f"{name}Config")(str(tmp_path), **online, **_ONLINE)
    return getattr(fused, f"{name}Trainer")(model, reward_funcs=[char_reward], args=args, train_dataset=prompts,
                                            processing_class=tokenizer)


@pytest.mark.parametrize("name", ["DPO", "CPO", "ORPO", "KTO", "GRPO", "RLOO", "OnlineDPO", "PPO"])
def test_every_trainer_hands_the_cap_to_every_head_pass(name, tmp_path, monkeypatch):
    """Every call of the head's row functions in a training step of each trainer family (its loss, the reference's
    and old log-probs at sampling or loss time, the statistics of its tiles, forward and backward) carries Gemma
    2's cap, and the step's loss is finite."""
    caps = []
    for function, position in (("rows_fwd", 5), ("rows_bwd", 8), ("rows_stats", 4)):
        original = getattr(rows_compiled, function)

        def spy(*args, _original=original, _position=position):
            caps.append(args[_position])
            return _original(*args)

        monkeypatch.setattr(rows_compiled, function, spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _one_step_trainer(name, tmp_path)
        trainer.train()
    assert caps and set(caps) == {_SOFTCAP}, sorted(set(caps))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_gemma3_text_cap_is_read_when_set():
    """Gemma 3's text config has ``final_logit_softcapping`` None by default (no cap) and honours it when set."""
    small = {**_WIDTHS, "head_dim": 12, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64}
    assert head_logit_softcap(Gemma3ForCausalLM(Gemma3TextConfig(**small))) is None
    assert head_logit_softcap(Gemma3ForCausalLM(Gemma3TextConfig(**small, final_logit_softcapping=30.0))) == 30.0


def test_unknown_logit_transform_is_refused(tmp_path):
    """A multiplier the fused head has no rule for (``logit_scale`` on a Llama) is refused, naming the field."""
    with pytest.raises(ValueError, match="logit_scale=2.0"):
        make_trainer(fused, tiny_llama(logit_scale=2.0), tmp_path)
