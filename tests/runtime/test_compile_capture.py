"""Graph capture and memory management through the shared trainer base (runtime/compile.py, runtime/memory.py).

- the loss region (hidden states -> fused head -> DPO loss) traces with zero graph breaks;
- compile on (loss region + every block) gives the loss trajectory and gradients of compile off, with activation
  checkpointing off and on;
- batches of five different sequence lengths compile each boundary at most MAX_COMPILES_PER_BOUNDARY times;
- selective and every-n-layers checkpointing give the gradients of no checkpointing; the policy reaches the layers;
- peak memory is logged per step; release_memory_every_step runs at each accumulation boundary.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch._dynamo
from datasets import Dataset
from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

from fusedrl.cli import presets
from fusedrl.runtime import memory
from fusedrl.runtime.compile import MAX_COMPILES_PER_BOUNDARY, decoder_blocks
from fusedrl.trainers import DPOConfig, DPOTrainer
from fusedrl.trainers.head import IGNORE_INDEX
from fusedrl.trainers.preference.dpo import _dpo_region
from tests.helpers.online import char_reward, make_ppo_trainer, train_quietly
from tests.utils import assert_close

# Prompts of 4 to 8 characters and completions of 1 to 5: each batch of one pair has its own padded length.
PROMPTS = ["1+1=", "12+30=", "7+8=", "100-1=", "45+45="]
CHOSEN = ["2", "42", "15", "99", "90"]
REJECTED = ["3", "41111", "16", "9", "900"]


def pairs() -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})


def make_trainer(tmp_path, **fields) -> DPOTrainer:
    tokenizer = presets.build_tokenizer()
    base = {"output_dir": str(tmp_path), "per_device_train_batch_size": 1, "max_steps": len(PROMPTS),
            "logging_steps": 1, "learning_rate": 1e-3, "report_to": "none", "save_strategy": "no", "bf16": False,
            "use_cpu": True, "disable_tqdm": True, "dataloader_pin_memory": False, "gradient_checkpointing": False,
            "seed": 0, "kernels": "all=compiled"}
    base.update(fields)
    return DPOTrainer(model=presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer), args=DPOConfig(**base),
                      train_dataset=pairs(), processing_class=tokenizer)


def losses(trainer: DPOTrainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def first_step_gradients(trainer: DPOTrainer) -> dict[str, torch.Tensor]:
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.model.zero_grad()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    grads["loss"] = loss.detach()
    return grads


def test_loss_region_has_no_graph_breaks(tmp_path):
    trainer = make_trainer(tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    completion_mask = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    head = trainer.head_inputs(trainer.model, model_inputs, labels)
    ref = torch.zeros(1)
    explanation = torch._dynamo.explain(_dpo_region)(
        head.hidden_NTH, head.weight_VH, head.bias_V, head.labels_NT, ref, ref, completion_mask.sum(-1).float(),
        trainer.args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_on_matches_off_and_bounds_recompiles(tmp_path):
    eager = make_trainer(tmp_path / "eager")
    eager.train()
    torch._dynamo.reset()
    clear_compilation_metrics()
    compiled = make_trainer(tmp_path / "compiled", compile=True, compile_blocks=True)
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in decoder_blocks(compiled.model))
    compiled.train()
    # Five steps, five padded lengths (asserted, so the bound below is exercised).
    rows = compiled.train_dataset
    lengths = {len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) for row in rows}
    assert len(lengths) == 5
    assert_close(torch.tensor(losses(compiled)), torch.tensor(losses(eager)))
    compiles = Counter(metric.co_name for metric in get_compilation_metrics())
    assert compiles["_dpo_region"] == 1  # the policy's loss region: one graph for all five lengths
    assert compiles["head_logprobs"] == 1  # the reference's head region (no grad)
    block_compiles = compiles["forward_with_checkpointing"] + compiles["_call_impl"]
    assert 0 < block_compiles <= MAX_COMPILES_PER_BOUNDARY, compiles
    assert max(compiles.values()) <= MAX_COMPILES_PER_BOUNDARY, compiles


def test_compile_with_checkpointing_gives_same_gradients(tmp_path):
    eager = first_step_gradients(make_trainer(tmp_path / "eager", gradient_checkpointing=True))
    compiled = first_step_gradients(make_trainer(tmp_path / "compiled", gradient_checkpointing=True, compile=True,
                                                 compile_blocks=True))
    assert eager.keys() == compiled.keys()
    for name in eager:
        assert_close(compiled[name], eager[name], name=name)


def test_selective_and_every_n_layers_checkpointing_match_plain_gradients(tmp_path):
    plain = first_step_gradients(make_trainer(tmp_path / "plain"))
    for fields in ({"selective_checkpointing": True}, {"checkpoint_every_n_layers": 2}):
        trainer = make_trainer(tmp_path / "ckpt", gradient_checkpointing=True, max_steps=1, **fields)
        trainer.train()  # transformers enables checkpointing at train start; the callback applies the policy then
        layers = decoder_blocks(trainer.model)
        checkpointed = [layer for layer in layers if layer.gradient_checkpointing]
        if "selective_checkpointing" in fields:
            assert len(checkpointed) == len(layers)
            assert all(layer._gradient_checkpointing_func.keywords["context_fn"]
                       is memory.selective_checkpoint_contexts for layer in checkpointed)
        else:
            assert len(checkpointed) == len(layers) // 2
        fresh = make_trainer(tmp_path / "fresh", gradient_checkpointing=True, **fields)
        fresh.model.activation_checkpointing_enable({"use_reentrant": False},
                                                    every_n_layers=fields.get("checkpoint_every_n_layers", 1))
        if "selective_checkpointing" in fields:
            assert memory.apply_selective_checkpointing(fresh.model) == len(layers)
        grads = first_step_gradients(fresh)
        for name in plain:
            assert_close(grads[name], plain[name], name=f"{fields}: {name}")


def test_selective_checkpointing_keeps_matmul_outputs():
    """Under the policy the backward recomputes elementwise ops only: counting the tensors saved by a linear ->
    silu -> linear chain, the matmul outputs are stored by the checkpoint and silu is recomputed."""
    layer = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8))
    x = torch.randn(4, 8, requires_grad=True)
    recomputed = []
    original = torch.nn.functional.silu

    def counting_silu(*args, **kwargs):
        recomputed.append(1)
        return original(*args, **kwargs)

    torch.nn.functional.silu = counting_silu
    try:
        out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False,
                                                context_fn=memory.selective_checkpoint_contexts)
        out.sum().backward()
    finally:
        torch.nn.functional.silu = original
    # silu ran in the forward and once more in the recompute; the result matches the plain computation.
    assert len(recomputed) == 2
    expected = torch.autograd.grad(layer(x).sum(), x)[0]
    assert_close(x.grad, expected)


def test_peak_memory_logged_and_release_runs_each_step(tmp_path, monkeypatch):
    released = []
    monkeypatch.setattr(memory, "release_memory", lambda: released.append(1))
    trainer = make_trainer(tmp_path, max_steps=3, release_memory_every_step=True)
    trainer.train()
    peaks = [entry["memory/peak_rss_mb"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(peaks) == 3 and all(peak > 10 for peak in peaks)
    assert len(released) == 3
    quiet = make_trainer(tmp_path / "quiet", max_steps=1, log_memory=False)
    quiet.train()
    assert not any(key.startswith("memory/") for entry in quiet.state.log_history for key in entry)


def test_bad_memory_fields_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every_n_layers"):
        DPOConfig(output_dir=str(tmp_path), checkpoint_every_n_layers=0)
    with pytest.raises(ValueError, match="gradient_checkpointing=True"):
        make_trainer(tmp_path, selective_checkpointing=True, gradient_checkpointing=False)


def test_ppo_compile_on_matches_off(tmp_path):
    """The same base switch on an RL trainer: PPO's loss region (fused head -> clipped policy loss + value loss) and
    the blocks of policy and value model compiled give the eager losses (same rollouts: same seed, and sampling
    runs outside the compiled regions)."""
    eager = [entry["loss"] for entry in train_quietly(make_ppo_trainer(tmp_path / "eager", kernels="all=compiled"))]
    compiled_trainer = make_ppo_trainer(tmp_path / "compiled", kernels="all=compiled", compile=True, compile_blocks=True)
    compiled = [entry["loss"] for entry in train_quietly(compiled_trainer)]
    assert len(eager) == 2
    assert_close(torch.tensor(compiled), torch.tensor(eager))


def test_grpo_compile_on_matches_off(tmp_path):
    """GRPO's loss region (fused head -> clipped loss with a k3 KL to the reference) and compiled blocks of policy
    and reference give the eager losses; generation runs eagerly inside (runtime.compile.eager_generation)."""
    from fusedrl.trainers import GRPOConfig, GRPOTrainer

    tokenizer = presets.build_tokenizer()
    config = {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 5, "max_steps": 2,
              "logging_steps": 1, "learning_rate": 1e-2, "bf16": False, "gradient_checkpointing": True,
              "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "dataloader_pin_memory": False,
              "seed": 3, "beta": 0.04, "kernels": "all=compiled", "use_cpu": True}
    runs = {}
    for name, extra in (("eager", {}), ("compiled", {"compile": True, "compile_blocks": True})):
        trainer = GRPOTrainer(presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer),
                              reward_funcs=[presets.answer_reward, char_reward],  # dense: every group has spread
                              args=GRPOConfig(str(tmp_path / name), **config, **extra),
                              train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=16, seed=1),
                              processing_class=tokenizer)
        trainer.train()
        runs[name] = torch.tensor([[entry["loss"], entry["grad_norm"], entry["kl"]]
                                   for entry in trainer.state.log_history if "loss" in entry])
    # The loss itself is ~0 at ratio 1 (advantages have zero mean per group): the gradient norm and the KL to the
    # reference are the informative columns, and they are far from 0.
    assert runs["eager"].shape == (2, 3) and runs["eager"][:, 1].min() > 1e-3 and runs["eager"][1, 2] > 0
    assert_close(runs["compiled"], runs["eager"])
