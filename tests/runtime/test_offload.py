"""ActivationOffloader (fusedrl.runtime.offload) on the CPU, where every copy is a host clone into a separate buffer.

- exactness: offloading on and off give bitwise-identical loss and gradients on the tiny preset Llama, plain, with
  non-reentrant and reentrant activation checkpointing, and with a LoRA adapter (peft); a retained graph's second
  backward fetches again and matches too;
- bookkeeping: the forward stash is bounded by ``max_in_flight`` and empty after every backward, as is the tracker;
  over 20 optimizer steps no ticket or host buffer outlives its step and the process RSS does not grow;
- skip rules: parameters, buffers and views of them, autocast copies of parameters, small tensors, duplicate
  storages, the paused (LM head / loss) region, recomputation inside a backward, conjugate-bit layouts;
- trainer: DPOTrainer with ``activation_offloading=True`` logs the same losses and ends with the same weights as
  without, with the head region kept on the device.

``min_bytes=0`` everywhere except the size-rule test: the tiny model's activations are a few KiB, below the 1 MiB
default, and the point is to push every activation through the offload path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
import weakref

import psutil
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.checkpoint import checkpoint

import fusedrl.trainers as fused
from fusedrl.cli.presets import build_tokenizer, load_preset_model, preference_dataset
from fusedrl.ops.dispatch import use_kernels
from fusedrl.ops.logprobs import linear_token_logprobs
from fusedrl.runtime.offload import ActivationOffloader

MiB = 2**20


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[4, 24]`` token ids, a mask with a padded row, and shifted labels ``[4, 23]`` (-100 at padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (4, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)[:, 1:]


def llama_step(model, offloader: ActivationOffloader | None, seed: int = 0):
    """One forward + backward the way the trainer runs it (hidden states -> fused head under ``paused``); returns
    the loss and every gradient. The offloader is active over both passes, as in ``FusedTrainer.training_step``."""
    ids, mask, labels = batch(seed)
    model.zero_grad(set_to_none=True)
    active = offloader if offloader is not None else contextlib.nullcontext()
    with active, use_kernels(all="reference"):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=-1, logits_to_keep=1,
                       use_cache=False).hidden_states[-1][:, :-1]
        pause = offloader.paused() if offloader is not None else contextlib.nullcontext()
        with pause:
            logps = linear_token_logprobs(hidden, base.lm_head.weight, labels)
        loss = -logps.sum() / (labels != -100).sum()
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def preset_llama(*, checkpointing: str = "none", lora: bool = False):
    model = load_preset_model("tiny").train()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, init_lora_weights="gaussian"))
    if checkpointing != "none":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    return model


def assert_bitwise(loss, grads, ref_loss, ref_grads):
    assert torch.equal(loss, ref_loss), f"loss {loss.item()} != {ref_loss.item()}"
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), f"gradient of {name} differs"


# --- exactness ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing,lora", [("none", False), ("non-reentrant", False), ("reentrant", False),
                                                ("none", True), ("non-reentrant", True)],
                         ids=["plain", "checkpoint", "checkpoint-reentrant", "lora", "lora-checkpoint"])
def test_bitwise_identical_loss_and_gradients(checkpointing, lora):
    model = preset_llama(checkpointing=checkpointing, lora=lora)
    ref_loss, ref_grads = llama_step(model, None)
    offloader = ActivationOffloader(model, min_bytes=0, max_in_flight=3, prefetch=2)
    loss, grads = llama_step(model, offloader)
    assert_bitwise(loss, grads, ref_loss, ref_grads)

    stats = offloader.stats()
    assert stats.num_offloaded > 0 and stats.num_fetched > 0 and stats.num_prefetched > 0
    assert stats.num_from_stash > 0  # the last forward tensors are the first the backward needs
    assert stats.stash_size == 0 and stats.tracker_size == 0
    assert stats.skipped["param"] > 0 and stats.skipped["paused"] > 0
    # Reentrant checkpointing reruns each block's forward inside the backward, under our hooks: kept, not offloaded.
    assert (stats.skipped["backward"] > 0) == (checkpointing == "reentrant")
    if checkpointing == "none":
        # Without checkpointing every block saves its activations; q/k/v (and LoRA's A) share their input.
        assert stats.skipped["duplicate"] > 0


def test_checkpointing_offloads_only_block_inputs():
    """Non-reentrant checkpointing saves each block's inputs and recomputes the rest under its own (inner) hooks,
    so far fewer tensors reach the offloader than without checkpointing."""
    plain, ckpt = ActivationOffloader(min_bytes=0), ActivationOffloader(min_bytes=0)
    llama_step(preset_llama(), plain)
    llama_step(preset_llama(checkpointing="non-reentrant"), ckpt)
    assert 0 < ckpt.stats().num_offloaded < plain.stats().num_offloaded / 3


def test_retained_graph_fetches_again():
    """The first backward consumes the device copies; the second fetches from the host copies (kept while autograd
    holds the tickets) and gives the same gradients, so the total is exactly twice the plain one."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    x = torch.randn(5, 8, requires_grad=True)
    (net(x) ** 2).sum().backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    offloader = ActivationOffloader(net, min_bytes=0, max_in_flight=1)
    with offloader:
        loss = (net(x) ** 2).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in net.parameters()]
    assert offloader.stats().tracker_size > 0  # the retained graph still owns its tickets
    loss.backward()
    for g_ref, g_one, param in zip(ref, first, net.parameters()):
        assert torch.equal(g_one, g_ref) and torch.equal(param.grad, g_one + g_one)
    del loss
    assert offloader.stats().tracker_size == 0


# --- bookkeeping ----------------------------------------------------------------------------------------------------


def test_stash_is_bounded_then_drained():
    torch.manual_seed(0)
    x = torch.randn(6, 32, requires_grad=True)
    offloader = ActivationOffloader(min_bytes=0, max_in_flight=2)
    with offloader:
        h = x
        for _ in range(5):
            h = torch.sin(h) * 1.5  # sin saves its input: 5 distinct tensors offloaded
            assert offloader.stats().stash_size <= 2
        assert offloader.stats().num_offloaded == 5 and offloader.stats().tracker_size == 5
        h.sum().backward()
        assert offloader.stats().stash_size == 0 and offloader.stats().tracker_size == 0
    expected = x.detach().clone().requires_grad_()
    g = expected
    for _ in range(5):
        g = torch.sin(g) * 1.5
    g.sum().backward()
    assert torch.equal(x.grad, expected.grad)


def test_dead_branch_tickets_live_until_their_graph_is_freed():
    """A saved tensor whose backward never runs (an output the loss does not use) is not leaked: its ticket dies
    with its graph, and the tracker forgets it then."""
    x = torch.randn(4, 8, requires_grad=True)
    offloader = ActivationOffloader(min_bytes=0)
    with offloader:
        h = x * 2.0
        unused = h.exp()  # exp saves its output
        loss = torch.sin(h).sum()
    loss.backward()
    assert offloader.stats().tracker_size == 1
    del unused
    assert offloader.stats().tracker_size == 0


def test_no_leak_over_20_steps(monkeypatch):
    """20 optimizer steps of the tiny Llama: after each, no ticket and no host buffer is alive (weakrefs to every
    one created), and the stash and tracker are empty."""
    model = preset_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    offloader = ActivationOffloader(model, min_bytes=0)
    created = []
    offload = offloader._offload

    def spy(tensor):
        ticket = offload(tensor)
        created.append((weakref.ref(ticket), weakref.ref(ticket.host)))
        return ticket

    monkeypatch.setattr(offloader, "_offload", spy)
    for step in range(20):
        llama_step(model, offloader, seed=step)
        optimizer.step()
        stats = offloader.stats()
        assert stats.stash_size == 0 and stats.tracker_size == 0, f"step {step}: {stats}"
        assert all(t() is None and h() is None for t, h in created), f"step {step}: a ticket outlived its step"
    assert len(created) == offloader.stats().num_offloaded > 20


def test_rss_does_not_grow_over_20_steps():
    """An MLP offloading about 4.5 MiB per step: a leak of one step's host copies would add 67 MiB to the RSS
    between steps 5 and 20; steady state allows allocator noise only (16 MiB)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512))
    x = torch.randn(256, 512)
    offloader = ActivationOffloader(net, min_bytes=MiB // 4)
    process = psutil.Process()
    for step in range(20):
        with offloader:
            net(x).square().mean().backward()
        net.zero_grad(set_to_none=True)
        if step == 4:
            rss_5, bytes_5 = process.memory_info().rss, offloader.stats().bytes_offloaded
    growth = process.memory_info().rss - rss_5
    per_step = (offloader.stats().bytes_offloaded - bytes_5) / 15
    assert per_step >= 4 * MiB, per_step  # x (0.5 MiB), the two [256, 2048] activations, the output
    assert growth < 16 * MiB < 15 * per_step / 4, f"RSS grew by {growth / MiB:.1f} MiB over 15 steps"
    assert offloader.stats().tracker_size == 0 and offloader.stats().stash_size == 0


# --- skip rules -----------------------------------------------------------------------------------------------------


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)
        self.gain = torch.nn.Parameter(torch.linspace(1.0, 2.0, 16))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        # Saved: a view of linear.weight (addmm saves weight.t()), a view of its detached copy, the buffer, and the
        # Parameter gain itself.
        return self.linear(x) + x @ self.linear.weight.detach().t() + x * self.scale + x * self.gain


@pytest.mark.parametrize("with_module", [True, False], ids=["module", "no-module"])
def test_parameters_buffers_and_their_views_stay(with_module):
    net, x = Scaled(), torch.randn(3, 16, requires_grad=True)
    offloader = ActivationOffloader(net if with_module else None, min_bytes=0)
    with offloader:
        out = net(x).sum()
    out.backward()
    skipped = offloader.stats().skipped
    # A Parameter and its views (weight.t()) are recognised by type; a detached alias and a buffer only through the
    # module's storages.
    assert skipped["param"] == (4 if with_module else 2)
    expected = x.detach().clone().requires_grad_()
    net(expected).sum().backward()
    assert torch.equal(x.grad, expected.grad)


def test_autocast_copy_of_a_parameter_stays():
    """Under bf16 autocast a linear layer saves bf16 copies of its input (an activation: offloaded) and of its
    weight (a rebuilt copy of a parameter: kept)."""
    linear, x = torch.nn.Linear(32, 64), torch.randn(16, 32, requires_grad=True)
    offloader = ActivationOffloader(linear, min_bytes=0)
    with offloader, torch.autocast("cpu", torch.bfloat16):
        out = linear(x)
    out.float().sum().backward()
    stats = offloader.stats()
    assert (stats.num_offloaded, stats.bytes_offloaded, stats.skipped["param"]) == (1, 16 * 32 * 2, 1)


@pytest.mark.parametrize("min_bytes,offloaded", [(1024, 1), (1025, 0)])
def test_min_bytes_boundary(min_bytes, offloaded):
    """sin saves its [16, 16] fp32 input: 16 * 16 * 4 = 1024 bytes, offloaded at min_bytes=1024, not above."""
    x = torch.randn(16, 16, requires_grad=True)
    offloader = ActivationOffloader(min_bytes=min_bytes)
    with offloader:
        torch.sin(x).sum().backward()
    stats = offloader.stats()
    assert (stats.num_offloaded, stats.skipped["small"]) == (offloaded, 1 - offloaded)
    assert torch.equal(x.grad, torch.cos(x.detach()))


def test_duplicates_are_offloaded_once():
    """``a * a`` saves ``a`` twice; two view objects with the same storage, offset, shape and stride are one tensor;
    rows 0 and 1 of the same storage are two."""
    x = torch.randn(8, 8, requires_grad=True)
    offloader = ActivationOffloader(min_bytes=0)
    with offloader:
        a = x * 3.0
        square = a * a  # saves a, a
        v1, v2 = a.view(64), a.view(64)  # two view objects, one key (while v1 lives, its address is its own)
        views = torch.sin(v1) + torch.cos(v2)
        rows = torch.sin(a[0]) + torch.sin(a[1])  # different offsets
        (square.sum() + views.sum() + rows.sum()).backward()
    stats = offloader.stats()
    assert (stats.num_offloaded, stats.skipped["duplicate"]) == (1 + 1 + 2, 1 + 1)
    y = x.detach().clone().requires_grad_()
    b = y * 3.0
    ((b * b).sum() + (torch.sin(b.view(64)) + torch.cos(b.view(64))).sum()
     + (torch.sin(b[0]) + torch.sin(b[1])).sum()).backward()
    assert torch.equal(x.grad, y.grad)
    assert stats.tracker_size == 0


def test_paused_region_stays_on_device():
    x = torch.randn(4, 8, requires_grad=True)
    offloader = ActivationOffloader(min_bytes=0)
    with offloader:
        h = torch.sin(x)  # offloaded
        with offloader.paused():
            with offloader.paused():  # nests
                y = torch.cos(h)  # paused
            z = torch.exp(y)  # paused (exp saves its output)
        torch.tanh(z).sum().backward()  # offloaded again
    stats = offloader.stats()
    assert (stats.num_offloaded, stats.skipped["paused"]) == (2, 2)


def test_conjugate_view_is_kept():
    """``y * y`` saves the conjugate view twice (kept: its lazy conj bit is not a plain strided layout); ``abs``
    saves the product, an ordinary complex tensor (offloaded)."""
    x = torch.randn(4, 4, dtype=torch.complex64, requires_grad=True)
    offloader = ActivationOffloader(min_bytes=0)
    with offloader:
        y = x.conj()
        (y * y).abs().sum().backward()
    stats = offloader.stats()
    assert (stats.skipped["layout"], stats.num_offloaded, stats.bytes_offloaded) == (2, 1, 16 * 8)
    expected = x.detach().clone().requires_grad_()
    (expected.conj() * expected.conj()).abs().sum().backward()
    assert torch.equal(x.grad, expected.grad)


def test_reentrant_checkpoint_recomputation_is_not_offloaded():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    offloader = ActivationOffloader(net, min_bytes=0)
    with offloader:
        checkpoint(net, x, use_reentrant=True).sum().backward()
    stats = offloader.stats()
    # Forward: the checkpoint Function saves its input x (offloaded, 4 x 8 fp32). Backward: the recomputed block
    # saves x and weight.t() (first linear), tanh's output, tanh's output and weight.t() (second linear); all kept,
    # the backward consumes them at once.
    assert (stats.num_offloaded, stats.bytes_offloaded, stats.skipped["backward"]) == (1, 4 * 8 * 4, 5)
    grad = x.grad.clone()
    x.grad = None
    net(x).sum().backward()
    assert torch.equal(grad, x.grad)


@pytest.mark.parametrize("kwargs,field", [({"min_bytes": -1}, "min_bytes"), ({"max_in_flight": 0}, "max_in_flight"),
                                          ({"prefetch": -1}, "prefetch"), ({"device": "meta"}, "cuda and cpu")])
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ActivationOffloader(**kwargs)


def test_reentering_an_active_offloader_raises():
    offloader = ActivationOffloader()
    with offloader, pytest.raises(RuntimeError, match="already active"):
        offloader.__enter__()


# --- trainer --------------------------------------------------------------------------------------------------------


def test_every_config_has_the_field():
    for config in (fused.DPOConfig, fused.KTOConfig, fused.ORPOConfig, fused.CPOConfig):
        fields = {f.name: f for f in dataclasses.fields(config)}
        assert fields["activation_offloading"].default is False, config.__name__


def run_dpo(tmp_path, offloading: bool, min_bytes: int = 0):
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "max_steps": 3, "logging_steps": 1,
                "learning_rate": 1e-3, "bf16": False, "report_to": [], "save_strategy": "no", "seed": 0,
                "max_length": 48, "disable_tqdm": True, "kernels": "all=reference",
                "activation_offloading": offloading}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = fused.DPOTrainer(model=load_preset_model("tiny"), args=fused.DPOConfig(**settings),
                                   train_dataset=preference_dataset(12), processing_class=build_tokenizer())
        if offloading:  # the tiny model's activations are below the 1 MiB default; offload them all
            trainer._activation_offloader = ActivationOffloader(trainer.model, min_bytes=min_bytes)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


def test_dpo_trainer_same_losses_with_offloading(tmp_path):
    """Gradient checkpointing is on (FusedConfig's default), so this also covers the trainer's checkpointed blocks."""
    plain, plain_losses = run_dpo(tmp_path / "plain", offloading=False)
    offloaded, losses = run_dpo(tmp_path / "offloaded", offloading=True)
    assert len(losses) == 3 and losses == plain_losses
    for (name, param), ref in zip(offloaded.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(param, ref), name
    stats = offloaded._activation_offloader.stats()
    assert stats.num_offloaded > 0 and stats.skipped["paused"] > 0
    assert stats.stash_size == 0 and stats.tracker_size == 0
