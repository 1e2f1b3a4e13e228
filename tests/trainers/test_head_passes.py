"""LM-head passes of one eager training step per trainer family, and the fused step against the unfused reference.

A head pass is one ``C x V x H`` matmul over the tokens of a pass: the profiler records every ``aten::mm`` /
``addmm`` (forward, backward, inside the custom ops); those with an operand of vocabulary size V count, except the
model's own ``lm_head`` call (``logits_to_keep=1``: one position per row, whose logits are discarded). The model's
vocabulary is 131, a size no other matmul of the tiny Llama has, and at V = 131 one tile holds every token of
a step (``chunk_tokens``), so each pass is exactly one matmul. Expected, per trainer, on the default (compiled)
kernels: 3 for the policy's loss (forward, grad_hidden, grad_weight from the same tiles: the metrics too) plus 1
no-grad pass per other log-prob set the algorithm reads (the reference; the sampling-time old log-probs of RLOO
and PPO; KTO's mismatched pairs under policy and reference), counted apart as the rollout's passes where the trainer
makes them at sampling time. Before the fused head+loss ops a DPO step made 6 (the per-token op's 4, the
reference's 1 and a no-grad pass for the top-1 metric); the unfused path, which a loss coupling the batch still
takes, now makes 5 (``test_unfused_path_makes_more_passes``).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from datasets import Dataset
from torch.profiler import ProfilerActivity, profile, record_function

from fusedrl.cli import presets
from fusedrl.trainers import (
    CPOConfig,
    CPOTrainer,
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    OnlineDPOConfig,
    OnlineDPOTrainer,
    ORPOConfig,
    ORPOTrainer,
    PPOConfig,
    PPOTrainer,
    RLOOConfig,
    RLOOTrainer,
)
from tests.helpers.data import CHOSEN, PROMPTS, REJECTED, standard_pairs
from tests.helpers.models import tiny_llama
from tests.helpers.online import char_reward, digit_count
from tests.helpers.parity import base_settings
from tests.utils import assert_close

VOCAB, HIDDEN = 131, 48
MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
_MODEL_HEAD = "test::model_lm_head"
_ROLLOUT = "test::rollout"
ONLINE = {"per_device_train_batch_size": 4, "max_steps": 1, "logging_steps": 1, "learning_rate": 1e-3, "bf16": False,
          "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "dataloader_pin_memory": False,
          "seed": 0}


def _prompts():
    return presets.load_preset_dataset("arithmetic", kind="prompt", n=16, seed=1)


def _pairs_trainer(trainer_cls, config_cls, train_dataset=None):
    def build(tmp_path, kernels):
        return trainer_cls(model=tiny_llama(vocab_size=VOCAB), args=config_cls(**base_settings(
            tmp_path, max_steps=1, kernels=kernels)), train_dataset=train_dataset or standard_pairs(),
            processing_class=presets.build_tokenizer())

    return build


def _unpaired():
    """The pairs as KTO's unpaired examples, both labels in the batch."""
    labels = [True, False, True, True, False, True, False, False]
    completions = [c if label else r for c, r, label in zip(CHOSEN, REJECTED, labels)]
    return Dataset.from_dict({"prompt": PROMPTS, "completion": completions, "label": labels})


def _grpo(tmp_path, kernels):
    args = GRPOConfig(str(tmp_path), num_generations=4, max_completion_length=6, beta=0.04, kernels=kernels, **ONLINE)
    return GRPOTrainer(tiny_llama(vocab_size=VOCAB), reward_funcs=[char_reward], args=args, train_dataset=_prompts(),
                       processing_class=presets.build_tokenizer())


def _rloo(tmp_path, kernels):
    args = RLOOConfig(str(tmp_path), num_generations=2, max_completion_length=6, kernels=kernels, **ONLINE)
    return RLOOTrainer(tiny_llama(vocab_size=VOCAB), reward_funcs=[char_reward], args=args, train_dataset=_prompts(),
                       processing_class=presets.build_tokenizer())


def _online_dpo(tmp_path, kernels):
    args = OnlineDPOConfig(str(tmp_path), max_new_tokens=6, use_cpu=True, gradient_checkpointing=False,
                           kernels=kernels, **ONLINE)
    return OnlineDPOTrainer(tiny_llama(vocab_size=VOCAB), reward_funcs=[char_reward], args=args,
                            train_dataset=_prompts(), processing_class=presets.build_tokenizer())


def _ppo(tmp_path, kernels):
    args = PPOConfig(str(tmp_path), num_mini_batches=1, num_ppo_epochs=1, response_length=6, use_cpu=True,
                     gradient_checkpointing=False, kernels=kernels, **ONLINE)
    return PPOTrainer(tiny_llama(vocab_size=VOCAB), reward_funcs=[digit_count], args=args, train_dataset=_prompts(),
                      processing_class=presets.build_tokenizer())


# trainer -> (builder, expected head passes in the rollout, in the step)
TRAINERS = {
    "dpo": (_pairs_trainer(DPOTrainer, DPOConfig), 0, 3 + 1),  # the reference's pass runs inside compute_loss
    "cpo": (_pairs_trainer(CPOTrainer, CPOConfig), 0, 3),  # no reference model
    "orpo": (_pairs_trainer(ORPOTrainer, ORPOConfig), 0, 3),
    # The reference, and the KL estimate's mismatched pairs under the policy (no grad) and the reference.
    # The reference's examples and KL pairs share their prompts and run as one forward and one head pass (shared
    # prefixes, issue 15); the policy's KL pass is the other. The plain layout's 3 + 1 + 2: test_kto_plain_layout...
    "kto": (_pairs_trainer(KTOTrainer, KTOConfig, _unpaired()), 0, 3 + 1 + 1),
    "online_dpo": (_online_dpo, 0, 3 + 1),  # sampling scores with rewards, not log-probs
    "grpo": (_grpo, 1, 3),  # beta 0.04: the reference at sampling time; on-policy, so no old log-probs
    "rloo": (_rloo, 2, 3),  # old and reference log-probs at sampling time (the KL reward penalty)
    "ppo": (_ppo, 2, 3),  # old and reference log-probs at sampling time (KL rewards, the ratio)
}


def _build(name, tmp_path, kernels="all=compiled"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TRAINERS[name][0](tmp_path, kernels)


def test_every_trainer_is_counted():
    """Every trainer family fusedrl ships has an entry here."""
    from fusedrl import trainers

    shipped = {name.removesuffix("Trainer").lower() for name in trainers.__all__
               if name.endswith("Trainer") and name != "FusedTrainer"}  # the base, no algorithm
    assert shipped == {name.replace("_", "") for name in TRAINERS}


@contextlib.contextmanager
def _marked(trainer):
    """Profiler ranges around every call of a module with the LM head's weight shape (the models' own ``lm_head``)
    and around the rollout (``_prepare_inputs``)."""
    handles, open_ranges = [], []
    models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    for model in models:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and tuple(module.weight.shape) == (VOCAB, HIDDEN):
                handles.append(module.register_forward_pre_hook(
                    lambda *_: open_ranges.append(record_function(_MODEL_HEAD).__enter__())))
                handles.append(module.register_forward_hook(lambda *_: open_ranges.pop().__exit__(None, None, None)))
    prepare = trainer._prepare_inputs

    def marked_prepare(*args, **kwargs):
        with record_function(_ROLLOUT):
            return prepare(*args, **kwargs)

    trainer._prepare_inputs = marked_prepare
    try:
        yield
    finally:
        trainer._prepare_inputs = prepare
        for handle in handles:
            handle.remove()


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


def head_matmuls(trainer) -> list[tuple[str, list[str]]]:
    """Head matmuls of ``trainer.train()`` (one step): ``("rollout" | "step", operand dtypes)`` each."""
    with _marked(trainer), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    matmuls = []
    for event in prof.events():
        if event.name not in MATMULS or not any(VOCAB in shape for shape in event.input_shapes):
            continue
        ancestors = set(_ancestors(event))
        if _MODEL_HEAD not in ancestors:
            matmuls.append(("rollout" if _ROLLOUT in ancestors else "step", [d for d in event.input_dtypes if d]))
    return matmuls


def count_head_passes(trainer) -> dict[str, int]:
    """Head matmuls of one step, counted apart for the rollout and the step."""
    counts = {"rollout": 0, "step": 0}
    for where, _ in head_matmuls(trainer):
        counts[where] += 1
    return counts


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_one_step_makes_the_floor_of_head_passes(name, tmp_path):
    _, rollout, step = TRAINERS[name]
    assert count_head_passes(_build(name, tmp_path)) == {"rollout": rollout, "step": step}


def test_kto_plain_layout_makes_a_pass_per_log_prob_set(tmp_path):
    """With ``shared_prefix=False`` KTO's reference scores its examples and its KL pairs in two passes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = KTOTrainer(model=tiny_llama(vocab_size=VOCAB), args=KTOConfig(**base_settings(
            tmp_path, max_steps=1, kernels="all=compiled", shared_prefix=False)), train_dataset=_unpaired(),
            processing_class=presets.build_tokenizer())
    assert count_head_passes(trainer) == {"rollout": 0, "step": 3 + 1 + 2}


def test_mixed_precision_runs_the_head_in_bf16(tmp_path):
    """``bf16=True`` with fp32 master weights (autocast): every head pass of a DPO step, the reference's included,
    multiplies bf16 operands (the ops accumulate in fp32 inside), as autocast runs the model's other linear layers."""
    trainer = DPOTrainer(model=tiny_llama(vocab_size=VOCAB), args=DPOConfig(**base_settings(
        tmp_path, max_steps=1, kernels="all=compiled", bf16=True, use_cpu=True)), train_dataset=standard_pairs(),
        processing_class=presets.build_tokenizer())
    assert trainer.model.lm_head.weight.dtype == torch.float32
    matmuls = head_matmuls(trainer)
    assert len(matmuls) == 3 + 1
    assert all(dtypes and set(dtypes) == {"c10::BFloat16"} for _, dtypes in matmuls), matmuls


def test_unfused_path_makes_more_passes(tmp_path):
    """The counter sees the unfused path's extra pass: a DPO step whose loss runs on the reference backend takes
    the per-token op (forward, then recompute, grad_hidden, grad_weight: 4, the metrics from the forward's tiles)
    and the reference's 1."""
    trainer = _build("dpo", tmp_path, kernels="all=compiled,preference=reference")
    assert count_head_passes(trainer) == {"rollout": 0, "step": 4 + 1}


def _first_step(trainer):
    """Loss and gradients of the first micro-step, from a rollout sampled under seed 0."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); GRPO's loss scaling reads it
    torch.manual_seed(0)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_fused_step_matches_reference_kernels(name, tmp_path):
    """The fused step (compiled kernels) gives the reference kernels' (unfused, full fp32 logits) loss and
    gradients."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_loss, expected = _first_step(_build(name, tmp_path / "reference", "all=reference"))
        loss, grads = _first_step(_build(name, tmp_path / "fused"))
    assert_close(loss, expected_loss, name="loss")
    assert grads.keys() == expected.keys()
    for key, grad in grads.items():
        assert_close(grad, expected[key], name=f"grad {key}", rtol=1e-4, atol=1e-6)
