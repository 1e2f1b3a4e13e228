"""Memory management for a training loop: selective activation checkpointing, releasing cached memory at gradient
accumulation boundaries, and per-step peak-memory statistics.

- Selective checkpointing (``selective_checkpointing=True``): transformers' activation checkpointing recomputes the
  whole decoder layer in the backward. With torch's selective-checkpoint policy the outputs of matmuls and attention
  (the FLOP-heavy ops) are kept and only the elementwise ops (norms, activations, rotary, residual adds) are
  recomputed: most of the recompute time is saved for a fraction of the memory of no checkpointing, since each kept
  matmul output is one ``[N, T, H]`` or ``[N, T, I]`` tensor while the elementwise chain around it saves several.
- Releasing memory (``release_memory_every_step=True``): ``gc.collect()`` frees reference cycles (autograd graphs kept
  alive by a cycle through a Python object), then the accelerator's caching allocator returns its free blocks, or on
  CPU glibc's ``malloc_trim`` returns freed heap pages to the OS. It costs time; it helps when another process (a
  generation server, the next job) needs the memory, or to read true usage.
- Statistics (``log_memory=True``): the peak since the previous step. CUDA: ``max_memory_allocated`` /
  ``max_memory_reserved`` of the caching allocator. CPU: the process's resident-set high-water mark (``VmHWM``),
  reset at each step through ``/proc/self/clear_refs`` where the kernel allows it (else the peak since start).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

_MB = 2**20
_aten = torch.ops.aten
# Ops whose outputs selective checkpointing keeps: the matmuls and attention kernels, where a decoder layer spends
# nearly all its FLOPs. Everything else is recomputed.
_KEPT_OPS = frozenset(
    op
    for op in (
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        getattr(_aten, "_scaled_dot_product_flash_attention", None),
        getattr(_aten, "_scaled_dot_product_efficient_attention", None),
        getattr(_aten, "_scaled_dot_product_cudnn_attention", None),
        getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None),
    )
    if op is not None
)


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    packet = getattr(op, "overloadpacket", op)
    if op in _KEPT_OPS or packet in _KEPT_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_contexts():
    """The ``context_fn`` of ``torch.utils.checkpoint.checkpoint`` that keeps matmul and attention outputs."""
    return create_selective_checkpoint_contexts(_keep_matmuls)


def apply_selective_checkpointing(model: torch.nn.Module) -> int:
    """Switch every decoder layer that transformers checkpoints (``gradient_checkpointing`` set on it) to the selective
    policy; returns how many layers were switched. Reversible: ``activation_checkpointing_enable()`` resets it."""
    selective = functools.partial(checkpoint, use_reentrant=False, context_fn=selective_checkpoint_contexts)
    switched = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module._gradient_checkpointing_func = selective
            switched += 1
    return switched


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_memory() -> None:
    """Collect reference cycles, then hand cached free memory back (CUDA caching allocator, or glibc's heap)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # 5 resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory between :meth:`reset` and :meth:`read` on ``device``, in MB, keyed by metric name."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_rss_peak()

    def read(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {"memory/peak_allocated_mb": torch.cuda.max_memory_allocated(self.device) / _MB,
                    "memory/peak_reserved_mb": torch.cuda.max_memory_reserved(self.device) / _MB}
        peak_kb = _status_kb("VmHWM")
        return {} if peak_kb is None else {"memory/peak_rss_mb": peak_kb / 1024}


class MemoryCallback(TrainerCallback):
    """Per optimizer step: reset the peak counters at the start, record the peaks at the end through ``record(name,
    value)``, then release memory if asked. ``on_step_end`` is the gradient-accumulation boundary: the optimizer
    has stepped and the gradients are zeroed."""

    def __init__(self, device: torch.device, record: Callable[[str, float], None], *, log_memory: bool,
                 release: bool):
        self.peak = PeakMemory(device)
        self.record = record
        self.log_memory = log_memory
        self.release = release

    def on_step_begin(self, args, state, control, **kwargs):
        if self.log_memory:
            self.peak.reset()

    def on_step_end(self, args, state, control, **kwargs):
        if self.log_memory:
            for name, value in self.peak.read().items():
                self.record(name, value)
        if self.release:
            release_memory()


class SelectiveCheckpointCallback(TrainerCallback):
    """Applies :func:`apply_selective_checkpointing` once transformers has enabled checkpointing (at train start)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and apply_selective_checkpointing(model) == 0:
            raise ValueError("selective_checkpointing=True but no layer of the model is checkpointed; set "
                             "gradient_checkpointing=True, or use a model whose layers support checkpointing")
