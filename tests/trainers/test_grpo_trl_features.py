"""TRL 1.16 GRPO features that fusedrl's GRPOConfig used to leave out: ``off_policy_mask_threshold`` (DeepSeek-V3.2's
off-policy sequence mask) on every policy-loss backend and in the trainer against trl.GRPOTrainer;
``cast_lm_head_to_fp32`` (the fused head and the model's own head in fp32 under bf16 mixed precision); and two
construction refusals in TRL's words (no reward source; Liger with prompt-learning PEFT).

The op-level cases sit here, beside the trainer's, because the mask is one feature end to end: its formula (hand-
derived and against TRL's ``get_off_policy_mask``), the loss with it against TRL's ``_compute_loss`` on the same
tensors, the compiled / Triton / fused-head paths against the reference, then the trainers side by side.
"""

from __future__ import annotations

import dataclasses
import math
import types
import warnings
from collections import defaultdict

import pytest
import torch
import trl
from peft import LoraConfig, PromptTuningConfig, TaskType

import fusedrl
from fusedrl.cli import presets
from fusedrl.ops.policy.reference import LOSS_TYPES, off_policy_keep, policy_loss_reference
from fusedrl.trainers import GRPOConfig, GRPOTrainer, RLOOConfig
from fusedrl.trainers.online import grpo as grpo_module
from tests.helpers.grpo_parity import GRPO_BASE, TOKENIZER, assert_grpo_logs_match, run_grpo
from tests.helpers.models import tiny_llama
from tests.helpers.online import char_reward, make_grpo_trainer, train_quietly
from tests.utils import assert_close, count_calls

FAST_BACKENDS = ("compiled", "triton")


def _tensors(num_rows=6, num_cols=23, *, adv_per_token=False, seed=0):
    """Log-probs near -1, old log-probs within 0.5 of them (row means of ``old - logps`` spread around 0), advantages
    of both signs, ~30% padding and one fully masked row, entropies in [0, 3)."""
    generator = torch.Generator().manual_seed(seed)
    logps = torch.randn(num_rows, num_cols, generator=generator) - 1.0
    old = logps + 0.5 * torch.randn(num_rows, num_cols, generator=generator)
    ref = logps + 0.3 * torch.randn(num_rows, num_cols, generator=generator)
    shape = (num_rows, num_cols) if adv_per_token else (num_rows,)
    adv = torch.randn(shape, generator=generator)
    mask = torch.rand(num_rows, num_cols, generator=generator) > 0.3
    mask[2] = False
    entropy = 3 * torch.rand(num_rows, num_cols, generator=generator)
    return logps, old, ref, adv, mask, entropy


def _threshold_that_splits(logps, old, adv, mask) -> float:
    """A threshold between the row-mean gaps of the negative-advantage rows (with tokens), so the mask drops some
    and keeps others: the median of those gaps."""
    gaps = ((old - logps) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    negative = (adv.reshape(adv.shape[0], -1)[:, 0] < 0) & (mask.sum(-1) > 0)
    assert negative.sum() >= 2, "the inputs need two negative-advantage rows with tokens"
    return float(gaps[negative].median())


# --- the mask itself --------------------------------------------------------------------------------------------


def test_off_policy_keep_hand_derived():
    """Row 0: A = +1, mean gap 2 > 1 -> kept (positive advantage). Row 1: A = -1, gaps [0.5, 0.5] -> 0.5 <= 1, kept.
    Row 2: A = -1, gaps [2, 2] on its 2 masked tokens, padding holding -1e4 and NaN (never counted) -> 2 > 1, dropped.
    Row 3: A = 0 counts as non-negative -> kept. Row 4: A = -1 and no tokens -> mean 0 <= 1, kept."""
    sampling = torch.zeros(5, 4)
    logps = torch.tensor([[-2.0] * 4, [-0.5] * 4, [-2.0, -2.0, -1e4, math.nan], [-5.0] * 4, [-9.0] * 4])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    adv = torch.tensor([1.0, -1.0, -1.0, 0.0, -1.0])
    keep = off_policy_keep(adv, logps, sampling, mask, 1.0)
    assert torch.equal(keep, torch.tensor([[1.0], [1.0], [0.0], [1.0], [1.0]]))


@pytest.mark.parametrize("adv_per_token", [False, True], ids=["adv_B", "adv_BT"])
def test_off_policy_keep_equals_trl(adv_per_token):
    """Bitwise TRL's ``GRPOTrainer.get_off_policy_mask`` (a NaN sampling log-prob included), at a threshold that
    splits the negative rows, for [B] and [B, T] advantages; fusedrl's trainer has TRL's static method too (same
    arguments, the mask's dtype)."""
    logps, old, _, adv, mask, _ = _tensors(adv_per_token=adv_per_token)
    old[0, 3] = math.nan
    threshold = _threshold_that_splits(logps, old, adv, mask)
    adv_trl = adv if adv_per_token else adv.unsqueeze(1)
    expected = trl.GRPOTrainer.get_off_policy_mask(adv_trl, logps, old, mask.long(), threshold)
    keep = off_policy_keep(adv, logps, old, mask, threshold)
    assert torch.equal(keep, expected.float())
    assert 0 < int((keep == 0).sum()) < keep.numel()
    ours = GRPOTrainer.get_off_policy_mask(adv_trl, logps, old, mask.long(), threshold)
    assert ours.dtype == expected.dtype and torch.equal(ours, expected)


# --- the loss with the mask against TRL's _compute_loss, then every backend against the reference --------------


def _trl_compute_loss(logps, old, ref, adv, mask, entropy, *, loss_type, level, threshold, quantile):
    """TRL 1.16's ``GRPOTrainer._compute_loss`` on given tensors: a stand-in ``self`` (one process, no vLLM, no
    accumulation, no entropy bonus, plain k3 KL) whose model call returns these log-probs and entropies."""
    accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        sync_gradients=True, reduce=lambda x, reduction: x,
                                        pad_across_processes=lambda x, dim, pad_index: x)
    args = types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1,
                                 sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                                 vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)
    stand_in = types.SimpleNamespace(
        accelerator=accelerator, args=args, top_entropy_quantile=quantile, off_policy_mask_threshold=threshold,
        importance_sampling_level=level, beta=0.04, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
        use_vllm=False, model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=32, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), get_gamma_weights=trl.GRPOTrainer.get_gamma_weights,
        get_off_policy_mask=trl.GRPOTrainer.get_off_policy_mask,
    )
    stand_in.get_high_entropy_mask = lambda *a: trl.GRPOTrainer.get_high_entropy_mask(stand_in, *a)
    stand_in._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropy, None)
    rows = logps.shape[0]
    inputs = {"prompt_ids": torch.zeros(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(57.0)}
    return trl.GRPOTrainer._compute_loss(stand_in, None, inputs), stand_in._metrics["train"]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reference_matches_trl_compute_loss(loss_type, level):
    """Loss, gradient and metrics with the mask, the k3 KL (not masked) and the top-entropy mask together; and the
    mask changes the loss (some negative rows are dropped, so the test would see a mask that never applied)."""
    logps, old, ref, adv, mask, entropy = _tensors()
    threshold = _threshold_that_splits(logps, old, adv, mask)
    theirs = logps.clone().requires_grad_()
    trl_loss, metrics = _trl_compute_loss(theirs, old, ref, adv, mask, entropy, loss_type=loss_type, level=level,
                                          threshold=threshold, quantile=0.6)
    trl_loss.backward()
    options = {"ref_logps_BT": ref, "beta": 0.04, "epsilon_high": 0.28, "importance_sampling_level": level,
               "loss_type": loss_type, "max_completion_length": 32, "num_items_in_batch": 57.0, "entropy_BT": entropy,
               "top_entropy_quantile": 0.6}
    ours = logps.clone().requires_grad_()
    out = policy_loss_reference(ours, old, adv, mask, off_policy_mask_threshold=threshold, **options)
    out.loss.backward()
    assert_close(out.loss, trl_loss.detach(), name="loss")
    assert_close(ours.grad, theirs.grad, name="grad")
    assert_close(out.kl, torch.tensor(metrics["kl"][0]), name="kl")
    assert_close(out.entropy, torch.tensor(metrics["entropy"][0]), name="entropy")
    unmasked = policy_loss_reference(logps, old, adv, mask, **options)
    assert not torch.equal(unmasked.loss, out.loss)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(("loss_type", "level"), [("dapo", "token"), ("grpo", "sequence"), ("cispo", "token"),
                                                  ("vespo", "token"), ("sapo", "sequence")])
def test_backends_match_reference(backend, loss_type, level):
    """The mask reaches the compiled and Triton rows (through their ``keep``) on the awkward shape, with the k3 KL,
    the top-entropy mask and the entropy bonus, which must not see the off-policy mask (TRL's bonus acts on the
    entropy mask's tokens only): loss, metrics and both gradients equal the reference's."""
    logps, old, ref, adv, mask, entropy = _tensors(3, 47, seed=1)
    adv = torch.tensor([-0.7, -1.2, -0.4])  # all negative: the mask decides every row
    threshold = _threshold_that_splits(logps, old, adv, mask)
    options = {"ref_logps_BT": ref, "beta": 0.04, "epsilon_high": 1.05, "importance_sampling_level": level,
               "loss_type": loss_type, "num_items_in_batch": 40.0, "top_entropy_quantile": 0.4, "entropy_coef": 0.3,
               "off_policy_mask_threshold": threshold}
    results = {}
    for name in ("reference", backend):
        leaves = logps.clone().requires_grad_(), entropy.clone().requires_grad_()
        with fusedrl.use_kernels(policy_loss=name):
            out = fusedrl.policy_loss(leaves[0], old, adv, mask, entropy_BT=leaves[1], **options)
        out.loss.backward()
        results[name] = out, leaves[0].grad, leaves[1].grad
    (expected, grad, entropy_grad), (actual, actual_grad, actual_entropy_grad) = results["reference"], results[backend]
    assert_close(actual.loss, expected.loss, name="loss")
    assert_close(actual_grad, grad, name="grad logps")
    assert_close(actual_entropy_grad, entropy_grad, name="grad entropy")
    for name in ("kl", "clip_ratio_low", "clip_ratio_high", "entropy", "bonus_entropy_sum", "bonus_tokens"):
        assert_close(getattr(actual, name), getattr(expected, name), name=name)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("ratio_weighted", [False, True], ids=["k3", "ratio_weighted_kl"])
def test_fused_head_matches_unfused(monkeypatch, backend, ratio_weighted):
    """``linear_policy_loss(fused=True)`` (the trainer's path: the mask computed per row inside the fused op) equals
    the unfused path on the same backend: loss and the gradients of hidden states and head weight."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 9, 16, generator=generator)
    weight = 0.3 * torch.randn(40, 16, generator=generator)
    ids = torch.randint(0, 40, (4, 9), generator=generator)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        logps = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = logps + 0.4 * torch.randn(4, 9, generator=generator)
    adv = torch.tensor([-1.0, -0.5, 0.8, -0.2])
    threshold = _threshold_that_splits(logps, old, adv, mask)
    options = {"ref_logps_BT": logps + 0.1, "beta": 0.05, "loss_type": "dapo", "num_items_in_batch": 30.0,
               "off_policy_mask_threshold": threshold, "ratio_weighted": ratio_weighted}
    calls = count_calls(monkeypatch, {"fused": "fusedrl.ops.policy.fused_head:fused_policy_loss"})
    results = []
    for fused in (True, False):
        leaves = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with fusedrl.use_kernels(linear_logprobs=backend, policy_loss=backend):
            out = fusedrl.linear_policy_loss(leaves[0], leaves[1], ids, mask, old, adv, fused=fused, **options)
        out.loss.backward()
        results.append((out.loss, leaves[0].grad, leaves[1].grad))
    assert calls["fused"] == 1
    for name, got, want in zip(("loss", "grad hidden", "grad weight"), *results):
        assert_close(got, want, name=name)


def test_op_refuses_bad_requests():
    """A NaN threshold would compare False and silently drop sequences; RLOO's summed log-probs have no per-token
    gap (TRL's RLOO has no mask)."""
    logps, old, _, adv, mask, _ = _tensors()
    with pytest.raises(ValueError, match="off_policy_mask_threshold must be a finite number"):
        fusedrl.policy_loss(logps, old, adv, mask, off_policy_mask_threshold=math.nan)
    hidden, weight = torch.randn(2, 3, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="off_policy_mask_threshold masks sequences .* needs sum_log_probs=False"):
        fusedrl.linear_policy_loss(hidden, weight, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3),
                                   torch.zeros(2, 1), torch.ones(2), sum_log_probs=True, off_policy_mask_threshold=0.5)


# --- the trainer against trl.GRPOTrainer ----------------------------------------------------------------------


# num_iterations=2 computes old log-probs, so step 2's sequences have a gap (step 1's is 0). After one lr-1e-2 step
# the 4 negative-advantage rows' mean gaps measured 0.152, 0.237, 0.416 and 0.676 (the same in the three cases: Adam's
# first step does not depend on the gradient's scale): 0.3 drops two and keeps two.
OFF_POLICY = {"num_iterations": 2, "off_policy_mask_threshold": 0.3}
TRAINER_CASES = {
    "grpo_kl_reference": ({"loss_type": "grpo", "beta": 0.05, **OFF_POLICY}, "all=reference"),
    "dapo_fused_compiled": ({"loss_type": "dapo", **OFF_POLICY}, "all=compiled"),
    "bnpo_sequence_fused_triton": ({"loss_type": "bnpo", "importance_sampling_level": "sequence", **OFF_POLICY},
                                   "all=triton"),
}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_off_policy_mask_matches_trl(preset_model_dir, tmp_path, case):
    """Every metric TRL logs, to 1e-5, with the mask on; and the same run without it logs another step-2 loss, so the
    mask dropped something. (TRL logs nothing of its own for the mask.)"""
    fields, kernels = TRAINER_CASES[case]
    _, our_logs, moved, trainable = run_grpo(GRPOTrainer, GRPOConfig, preset_model_dir, tmp_path / "ours",
                                             kernels=kernels, **fields)
    _, their_logs, _, _ = run_grpo(trl.GRPOTrainer, trl.GRPOConfig, preset_model_dir, tmp_path / "trl", **fields)
    assert_grpo_logs_match(our_logs, their_logs)
    assert moved == trainable
    unmasked = {**fields, "off_policy_mask_threshold": None}
    _, plain_logs, _, _ = run_grpo(GRPOTrainer, GRPOConfig, preset_model_dir, tmp_path / "plain", kernels=kernels,
                                   **unmasked)
    assert plain_logs[0]["loss"] == our_logs[0]["loss"]  # step 1 is on-policy: the gap is 0, nothing dropped
    assert plain_logs[1]["loss"] != pytest.approx(our_logs[1]["loss"], rel=1e-4)


def test_config_fields_follow_trl(tmp_path):
    """GRPOConfig has both fields with TRL's defaults; RLOOConfig has neither, as TRL's RLOOConfig; a NaN threshold
    is refused naming the field."""
    for name in ("off_policy_mask_threshold", "cast_lm_head_to_fp32"):
        trl_default = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}[name]
        assert {f.name: f.default for f in dataclasses.fields(GRPOConfig)}[name] == trl_default
        assert name not in {f.name for f in dataclasses.fields(trl.RLOOConfig)}
        assert name not in {f.name for f in dataclasses.fields(RLOOConfig)}
    with pytest.raises(ValueError, match="off_policy_mask_threshold must be a finite number"):
        GRPOConfig(str(tmp_path), **GRPO_BASE, off_policy_mask_threshold=math.nan)


# --- cast_lm_head_to_fp32 -------------------------------------------------------------------------------------


def test_cast_lm_head_runs_the_heads_in_fp32(tmp_path, monkeypatch):
    """Under bf16 autocast: with the flag the fused head gets the fp32 weight and fp32 hidden states, the model's
    own head projects in fp32 and keeps an fp32 weight through training (TRL's test reads it), and training moves
    every parameter; without it the fused head runs in bf16."""
    seen = []
    original = grpo_module.linear_policy_loss

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return original(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(grpo_module, "linear_policy_loss", spy)
    plain = make_grpo_trainer(tmp_path / "plain", bf16=True, kernels="all=compiled", max_steps=1)
    assert plain._lm_head(plain.model)[0].dtype == torch.bfloat16
    trainer = make_grpo_trainer(tmp_path / "fp32", bf16=True, kernels="all=compiled", cast_lm_head_to_fp32=True)
    assert trainer._lm_head(trainer.model)[0].dtype == torch.float32
    head = trainer.model.get_output_embeddings()
    assert head(torch.randn(2, head.in_features, dtype=torch.bfloat16)).dtype == torch.float32
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    logs = train_quietly(trainer)
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert head.weight.dtype == torch.float32 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert all(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())


def test_cast_lm_head_with_tied_embeddings_keeps_activation_dtype(tmp_path):
    """A bf16 model with tied embeddings: the shared weight becomes fp32 (still shared), the embedding's outputs stay
    bf16 for the trunk, and the deep-copied reference (beta > 0) projects with its own fp32 head."""
    model = tiny_llama(tie_word_embeddings=True).to(torch.bfloat16)
    args = GRPOConfig(str(tmp_path), **{**GRPO_BASE, "max_steps": 1}, use_cpu=True, beta=0.1,
                      cast_lm_head_to_fp32=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model, reward_funcs=[char_reward], args=args, processing_class=TOKENIZER,
                              train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=16, seed=1))
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight.dtype == torch.float32 and head.weight is embeddings.weight
    assert embeddings(torch.tensor([[3, 4]])).dtype == torch.bfloat16
    assert train_quietly(trainer) and head.weight.dtype == torch.float32
    reference_head = trainer.ref_model.get_output_embeddings()
    assert reference_head.weight.dtype == torch.float32 and reference_head.weight is not head.weight
    states = torch.randn(1, head.in_features)
    # The policy trained, the reference did not: the copy's forward must read the copy's weight.
    assert not torch.equal(reference_head.weight, head.weight)
    assert_close(reference_head(states), states @ reference_head.weight.T, name="reference head")


def test_cast_lm_head_refuses_a_peft_adapter_on_the_head(tmp_path):
    """TRL's refusal, in its words, when the adapter's target modules include lm_head."""
    args = GRPOConfig(str(tmp_path), **GRPO_BASE, use_cpu=True, cast_lm_head_to_fp32=True)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"^`cast_lm_head_to_fp32=True` is not supported when the lm_head carries a "
                                         r"PEFT adapter"):
        GRPOTrainer(tiny_llama(), reward_funcs=[char_reward], args=args, processing_class=TOKENIZER,
                    train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=8),
                    peft_config=peft_config)


# --- construction refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("reward_funcs", [None, []], ids=["none", "empty"])
def test_no_reward_source_raises(tmp_path, reward_funcs):
    """No reward_funcs and none named in the config: TRL's first words, then where fusedrl takes rewards from. A
    name in the config is a source (the trainer builds)."""
    prompts = presets.load_preset_dataset("arithmetic", kind="prompt", n=8)
    args = GRPOConfig(str(tmp_path), **GRPO_BASE, use_cpu=True)
    with pytest.raises(ValueError, match=r"^No reward source provided\. fusedrl: reward_funcs is required"):
        GRPOTrainer(tiny_llama(), reward_funcs=reward_funcs, args=args, processing_class=TOKENIZER,
                    train_dataset=prompts)
    named = GRPOConfig(str(tmp_path), **GRPO_BASE, use_cpu=True, reward_funcs=["accuracy"])
    assert GRPOTrainer(tiny_llama(), args=named, processing_class=TOKENIZER, train_dataset=prompts).rewards


def test_liger_with_prompt_learning_peft_raises(tmp_path):
    """use_liger_kernel with a prompt-learning PEFT config is refused at construction; prompt tuning alone, and Liger
    with LoRA, are not."""
    prompts = presets.load_preset_dataset("arithmetic", kind="prompt", n=8)
    prompt_tuning = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])

    def build(use_liger_kernel: bool, peft_config):
        args = GRPOConfig(str(tmp_path), **GRPO_BASE, use_cpu=True, use_liger_kernel=use_liger_kernel)
        return GRPOTrainer(tiny_llama(), reward_funcs=[char_reward], args=args, processing_class=TOKENIZER,
                           train_dataset=prompts, peft_config=peft_config)

    with pytest.raises(ValueError, match="^use_liger_kernel=True does not support prompt-learning PEFT methods"):
        build(True, prompt_tuning)
    assert build(False, prompt_tuning).model.active_peft_config.is_prompt_learning
    assert not build(True, lora).model.active_peft_config.is_prompt_learning
