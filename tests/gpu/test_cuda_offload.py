"""ActivationOffloader (fusedrl.runtime.offload) on a CUDA device, where copies run on a side stream into pinned host
memory and the ordering rests on events, ``wait_stream`` / ``wait_event`` and ``record_stream``: what the CPU tests
(tests/runtime/test_offload.py, host clones, no streams) cannot reach.

- streams: every tensor the backward gets back equals, bit for bit and stride for stride, the one the forward saved,
  with one copy in flight at a time over ~1 GB of activations (so freed blocks are reused while copies run: a missing
  wait would corrupt a host copy); gradients equal the plain run's; host buffers are pinned; the backward prefetches;
- memory: after the forward, device memory holds at least half the offloaded bytes less than without offloading;
- the tiny Llama in fp32 and bf16, with and without checkpointing, and DPOTrainer with ``activation_offloading``:
  the plain run's loss and gradients.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

import fusedrl.trainers as fused
from fusedrl.cli.presets import build_tokenizer, load_preset_model, preference_dataset
from fusedrl.ops.dispatch import use_kernels
from fusedrl.ops.logprobs import linear_token_logprobs
from fusedrl.runtime.offload import ActivationOffloader
from tests.utils import assert_close

pytestmark = pytest.mark.cuda

MiB = 2**20


def _mlp(device) -> torch.nn.Module:
    """4 blocks of Linear(1024, 4096) -> GELU -> Linear(4096, 1024): on 8192 tokens each block saves a 32 MiB input
    and two 128 MiB activations."""
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
              for _ in range(4)]
    return torch.nn.Sequential(*blocks).to(device)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


class _Recorder:
    """Spies on an offloader's pack and unpack: the saved tensor's value, shape and stride at pack time, compared
    with what unpack hands the backward; whether each host buffer is pinned."""

    def __init__(self, offloader: ActivationOffloader):
        self.saved: dict[int, tuple[torch.Tensor, tuple[int, ...]]] = {}
        self.mismatches: list[str] = []
        self.pinned: list[bool] = []
        self.num_checked = 0
        pack, unpack = offloader._pack, offloader._unpack

        def spy_pack(tensor):
            original = tensor.detach().clone()
            packed = pack(tensor)
            if packed is not tensor and packed.id not in self.saved:  # a ticket (first save of its tensor)
                self.saved[packed.id] = (original, tensor.stride())
                self.pinned.append(packed.host.is_pinned())
            return packed

        def spy_unpack(packed):
            tensor = unpack(packed)
            if not isinstance(packed, torch.Tensor):
                original, stride = self.saved[packed.id]
                self.num_checked += 1
                # A view with gaps (its span over the storage larger than its size) comes back contiguous.
                span = 1 + sum((n - 1) * s for n, s in zip(original.shape, stride))
                same_layout = tensor.stride() == stride or span > original.numel()
                if not same_layout or not torch.equal(tensor, original):
                    self.mismatches.append(f"ticket {packed.id}: shape {tuple(tensor.shape)}")
            return tensor

        # The hooks are bound when the offloader is entered, so instance attributes set before that are what runs.
        offloader._pack, offloader._unpack = spy_pack, spy_unpack


def test_streams_give_back_every_saved_tensor_exactly(device):
    net = _mlp(device)
    x = torch.randn(8192, 1024, device=device, requires_grad=True)
    net(x).square().mean().backward()
    expected, expected_x = _grads(net), x.grad.clone()
    net.zero_grad(set_to_none=True)
    x.grad = None

    offloader = ActivationOffloader(net, device=device, min_bytes=MiB, max_in_flight=1, prefetch=2)
    recorder = _Recorder(offloader)
    with offloader:
        net(x).square().mean().backward()
    torch.cuda.synchronize(device)
    stats = offloader.stats()
    assert stats.num_offloaded >= 8 and stats.num_prefetched > 0, stats
    assert recorder.num_checked >= stats.num_offloaded and not recorder.mismatches, recorder.mismatches
    assert recorder.pinned and all(recorder.pinned)
    assert stats.stash_size == 0 and stats.tracker_size == 0
    assert_close(x.grad, expected_x, name="grad x")
    for name, grad in _grads(net).items():
        assert_close(grad, expected[name], name=f"grad {name}")


def test_forward_leaves_the_activations_on_the_host(device):
    """Measured after the forward (the offloader exited, its stash drained: the newest ``max_in_flight`` tensors stay
    on the device for the backward), before the backward."""
    net = _mlp(device)
    x = torch.randn(8192, 1024, device=device, requires_grad=True)
    allocated = {}
    for name in ("plain", "offloaded"):
        offloader = ActivationOffloader(net, device=device, min_bytes=MiB, max_in_flight=1)
        before = torch.cuda.memory_allocated(device)
        with offloader if name == "offloaded" else contextlib.nullcontext():
            loss = net(x).square().mean()
        torch.cuda.synchronize(device)
        allocated[name] = torch.cuda.memory_allocated(device) - before
        loss.backward()
        del loss
        net.zero_grad(set_to_none=True)
        x.grad = None
    offloaded = offloader.stats().bytes_offloaded
    assert offloaded >= 8 * 128 * MiB * 0.5, offloaded
    assert allocated["plain"] - allocated["offloaded"] >= offloaded / 2, (allocated, offloaded)


def _llama_step(model, offloader: ActivationOffloader | None, device):
    """One forward + backward as the trainer runs it (hidden states -> fused head under ``paused``); the loss and
    every gradient."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (4, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    labels = ids.masked_fill(mask == 0, -100)[:, 1:].to(device)
    ids, mask = ids.to(device), mask.to(device)
    model.zero_grad(set_to_none=True)
    with offloader if offloader is not None else contextlib.nullcontext(), use_kernels(all="reference"):
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1,
                       use_cache=False).hidden_states[-1][:, :-1]
        with offloader.paused() if offloader is not None else contextlib.nullcontext():
            logps = linear_token_logprobs(hidden, model.lm_head.weight, labels)
        loss = -logps.sum() / (labels != -100).sum()
        loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpoint"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_llama_same_loss_and_gradients(device, needs_dtype, dtype, checkpointing):
    """``min_bytes=0``: the tiny model's activations are a few KiB, and the point is to push every one through the
    streams; each comes back bit for bit."""
    needs_dtype(dtype)
    model = load_preset_model("tiny").to(device=device, dtype=dtype).train()
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable({"use_reentrant": False})
    ref_loss, ref_grads = _llama_step(model, None, device)
    offloader = ActivationOffloader(model, device=device, min_bytes=0, max_in_flight=3, prefetch=2)
    recorder = _Recorder(offloader)
    loss, grads = _llama_step(model, offloader, device)
    assert not recorder.mismatches, recorder.mismatches
    assert offloader.stats().num_offloaded > 0 and offloader.stats().num_fetched > 0
    assert_close(loss, ref_loss, name="loss")
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], name=f"grad {name}")


def _run_dpo(tmp_path, offloading: bool):
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "max_steps": 3, "logging_steps": 1,
                "learning_rate": 1e-3, "bf16": False, "report_to": [], "save_strategy": "no", "seed": 0,
                "max_length": 48, "disable_tqdm": True, "kernels": "all=reference",
                "activation_offloading": offloading}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = fused.DPOTrainer(model=load_preset_model("tiny"), args=fused.DPOConfig(**settings),
                                   train_dataset=preference_dataset(12), processing_class=build_tokenizer())
        if offloading:  # below the 1 MiB default every tiny activation would stay; offload them all
            trainer._activation_offloader = ActivationOffloader(trainer.model, device=trainer.accelerator.device,
                                                                min_bytes=0)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_dpo_trainer_same_losses_with_offloading(device, tmp_path):
    _, plain_losses = _run_dpo(tmp_path / "plain", offloading=False)
    offloaded, losses = _run_dpo(tmp_path / "offloaded", offloading=True)
    assert offloaded.accelerator.device.type == device.type
    assert len(losses) == 3
    assert_close(torch.tensor(losses), torch.tensor(plain_losses), name="losses")
    stats = offloaded._activation_offloader.stats()
    assert stats.num_offloaded > 0 and stats.skipped["paused"] > 0
    assert stats.stash_size == 0 and stats.tracker_size == 0
