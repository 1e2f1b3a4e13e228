"""Activation offloading: tensors the forward saves for the backward are copied to host memory on a side stream and
copied back, ahead of need, when the backward asks for them.

:class:`ActivationOffloader` is a context manager built on ``torch.autograd.graph.saved_tensors_hooks``: inside it,
every tensor autograd saves goes through :meth:`~ActivationOffloader._pack` (forward) and comes back through
:meth:`~ActivationOffloader._unpack` (backward). The design, and a bandwidth model of its GPU effect, are in
docs/offloading.md. In short:

- forward: a qualifying tensor is copied into a pinned host buffer on a side CUDA stream; the device tensor stays
  referenced in a bounded *stash* until its copy's event has completed (at most ``max_in_flight`` copies in flight),
  then the compute stream waits on that event and the reference is dropped, so the allocator can reuse the memory.
- backward: unpacking ticket ``k`` starts host-to-device copies of the next ``prefetch`` tickets (``k - 1``,
  ``k - 2``, ...: the backward visits saved tensors roughly in reverse order) on the side stream; the compute stream
  waits on a ticket's event before using it, and ``record_stream`` tells the allocator that the compute stream uses
  the side-stream allocation. Tensors still in the stash when the backward starts are served without any copy.
- skipped, kept on the device: parameters and buffers (and their views and aliases, and autocast copies of trainable
  parameters: the optimizer step needs the weights on the device anyway; decided when the tensor is saved, see
  "Parameters" below), tensors smaller than ``min_bytes`` (copies of small tensors cost more in launch latency than
  they save), tensors saved while :meth:`~ActivationOffloader.paused` (the fused LM head / loss region: its saved
  hidden states are needed first in the backward) or during a backward (reentrant checkpointing recomputes there and
  consumes at once), and tensors on another device or without a plain strided layout. A tensor saved twice (same
  storage, offset, shape, stride and version) is offloaded once.

Parameters: FSDP2 all-gathers a layer's weights right before its forward into storage it allocates anew at every
gather and frees after the forward (``reshard_after_forward``), so a set of parameter addresses read before the
forward never holds them, and every linear layer's saved ``weight.t()`` would be copied to the host at each step (a
full copy of the model's weights per step, read back in the backward while FSDP2 gathers them again anyway). A saved
tensor is therefore classified when it is packed: a ``Parameter``, a view of one (``_base``: FSDP2's unsharded
weights are ``Parameter`` objects too), an autocast copy of one, or a tensor whose storage is one of the module's
parameter or buffer storages read at ``__enter__`` (detached aliases of weights that stay where they are: plain,
DDP and ZeRO-1/2 models, and buffers).

On the CPU there is no device memory to free: offloading only adds copies (logged once per process). The same
bookkeeping runs with each copy a host clone into a separate buffer and no streams or events, so tests exercise the
stash, tracker, prefetch and skip rules exactly.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import logging
import math
import weakref
from typing import NamedTuple, Self

import torch
from torch.distributed.tensor import DTensor

logger = logging.getLogger("fusedrl")

SKIP_REASONS = ("param", "small", "duplicate", "paused", "backward", "device", "layout")


@functools.cache
def log_cpu_noop() -> None:
    """Once per process: offloading on the CPU saves no memory (host to host copies), it only costs the copies."""
    logger.warning("fusedrl: activation offloading on the CPU saves no memory: the activations already live in host "
                   "memory, so each one is only copied to another host buffer and back (time, no savings). It pays "
                   "off on CUDA; set activation_offloading=False for CPU runs")


class OffloadStats(NamedTuple):
    """Counters since construction; ``stash_size`` and ``tracker_size`` are current sizes (0 after a backward)."""

    num_offloaded: int  # tensors copied to the host
    bytes_offloaded: int  # bytes of those copies
    num_fetched: int  # host -> device copies made in backward (prefetches included)
    num_prefetched: int  # of those, started before the backward asked for the tensor
    num_from_stash: int  # tensors the backward got straight from the forward stash, with no copy back
    skipped: dict[str, int]  # tensors kept on the device, by reason (SKIP_REASONS)
    stash_size: int  # forward copies whose device tensor is still referenced
    tracker_size: int  # offloaded tensors autograd still holds


class _Ticket:
    """What the forward hands autograd for one offloaded tensor; autograd frees it after the backward used it."""

    __slots__ = ("__weakref__", "copied", "copy_src", "device", "fetched", "host", "id", "kept", "size", "source",
                 "source_ref", "stride", "uses")

    def __init__(self, ticket_id: int, size: torch.Size, stride: tuple[int, ...]):
        self.id, self.size, self.stride = ticket_id, size, stride
        self.host = None  # host buffer, 1-D, restored with as_strided(size, stride)
        self.source = None  # the device tensor while in the stash
        self.copy_src = None  # the 1-D device tensor the side stream reads (kept alive with source)
        self.source_ref = None  # weakref to the saved tensor: while alive, its storage address is not reused
        self.device = None  # the fetched (or stash-served) device tensor, until the backward takes it
        self.copied = None  # CUDA event: host copy done
        self.fetched = None  # CUDA event: copy back done
        self.uses = 1  # saves sharing this ticket whose unpack is still to come
        self.kept = False  # device is the stash's reference, not a copy back


class ActivationOffloader:
    """Offload saved activations of the forward run inside ``with offloader:`` (see the module docstring).

    module: parameters and buffers of this module are never offloaded, nor tensors sharing their storage (module
        docstring, "Parameters"); ``Parameter`` objects and their views are recognised without it.
        device: the device whose tensors are offloaded (``cuda`` or ``cpu``; default the
        current CUDA device if there is one). min_bytes: smaller tensors stay on the device. max_in_flight: forward
        copies allowed in flight before the compute stream waits for the oldest. prefetch: tickets fetched ahead
        in the backward. pin_memory: host buffers in page-locked memory (default: on CUDA), needed for asynchronous
        copies.
    """

    def __init__(self, module: torch.nn.Module | None = None, *, device: torch.device | str | None = None,
                 min_bytes: int = 2**20, max_in_flight: int = 4, prefetch: int = 2, pin_memory: bool | None = None):
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {min_bytes}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1 (the copy in flight needs its source), got {max_in_flight}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (0 fetches each tensor when asked), got {prefetch}")
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"activation offloading supports cuda and cpu devices, got {device}; set "
                             "activation_offloading=False")
        if device.type == "cpu":
            log_cpu_noop()
        self.module, self.device = module, device
        self.min_bytes, self.max_in_flight, self.prefetch = min_bytes, max_in_flight, prefetch
        self.pin_memory = device.type == "cuda" if pin_memory is None else pin_memory
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._hooks = None
        self._paused = 0
        self._param_ptrs: frozenset[int] = frozenset()
        self._next_id = 0
        self._stash: collections.OrderedDict[int, _Ticket] = collections.OrderedDict()
        self._tracker: dict[int, weakref.ref] = {}  # ticket id (ascending) -> ticket, until autograd frees it
        self._by_key: dict[tuple, weakref.ref] = {}  # storage key -> ticket, for duplicates within one context
        self._counts: collections.Counter[str] = collections.Counter()

    # --- public ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        if self._hooks is not None:
            raise RuntimeError("this ActivationOffloader is already active; nest paused() instead of re-entering")
        self._param_ptrs = self._storage_ptrs(self.module)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        hooks, self._hooks = self._hooks, None
        hooks.__exit__(*exc)
        self._drain_stash()
        self._by_key.clear()

    @contextlib.contextmanager
    def paused(self):
        """Tensors saved inside stay on the device (the trainer wraps the fused LM head / loss call in this)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def stats(self) -> OffloadStats:
        counts = self._counts
        return OffloadStats(counts["offloaded"], counts["bytes"], counts["fetched"], counts["prefetched"],
                            counts["from_stash"], {reason: counts[reason] for reason in SKIP_REASONS},
                            len(self._stash), len(self._tracker))

    # --- forward --------------------------------------------------------------------------------------------------

    def _pack(self, tensor: torch.Tensor):
        reason = self._skip_reason(tensor)
        if reason is not None:
            self._counts[reason] += 1
            return tensor
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
               tensor.dtype, tensor._version)
        ticket = self._duplicate_of(key)
        if ticket is not None:
            self._counts["duplicate"] += 1
            ticket.uses += 1
            return ticket
        ticket = self._offload(tensor)
        self._by_key[key] = weakref.ref(ticket)
        return ticket

    def _skip_reason(self, tensor: torch.Tensor) -> str | None:
        if self._paused:
            return "paused"
        if torch._C._current_graph_task_id() != -1:
            return "backward"
        if isinstance(tensor, torch.nn.Parameter):
            return "param"
        if type(tensor) is not torch.Tensor or tensor.layout != torch.strided or tensor.is_conj() or tensor.is_neg():
            return "layout"
        if tensor.device != self.device:
            return "device"
        if tensor.numel() == 0 or tensor.numel() * tensor.element_size() < self.min_bytes:
            return "small"
        if self._is_weight(tensor):
            return "param"
        return None

    def _is_weight(self, tensor: torch.Tensor) -> bool:
        """At pack time: a parameter or a view of one, an autocast copy of one, or an alias of a parameter or buffer
        storage read at ``__enter__``."""
        base = tensor._base if tensor._base is not None else tensor
        if isinstance(base, torch.nn.Parameter) or self._is_weight_source(self._autocast_source(base)):
            return True
        return tensor.untyped_storage().data_ptr() in self._param_ptrs

    def _is_weight_source(self, source: torch.Tensor | None) -> bool:
        return source is not None and (isinstance(source, torch.nn.Parameter)
                                       or source.untyped_storage().data_ptr() in self._param_ptrs)

    @staticmethod
    def _autocast_source(tensor: torch.Tensor) -> torch.Tensor | None:
        """The leaf that ``tensor`` is autocast's low-precision copy of (grad_fn ``ToCopyBackward0`` of a leaf), else
        None. Such a copy of a trainable parameter is a new tensor, but weight-sized and rebuilt by the next forward
        anyway, so not worth the bandwidth; linear layers save a transposed view of it, hence the caller's base."""
        grad_fn = tensor.grad_fn
        if grad_fn is None or type(grad_fn).__name__ != "ToCopyBackward0":
            return None
        source = getattr(grad_fn.next_functions[0][0], "variable", None)
        return source if isinstance(source, torch.Tensor) else None

    def _duplicate_of(self, key: tuple) -> _Ticket | None:
        ref = self._by_key.get(key)
        ticket = ref() if ref is not None else None
        # The address identifies the storage only while the first saved tensor is alive (else it may be reused).
        if ticket is None or ticket.source_ref() is None:
            return None
        return ticket

    def _offload(self, tensor: torch.Tensor) -> _Ticket:
        if len(self._stash) >= self.max_in_flight:
            self._release(self._stash.popitem(last=False)[1])
        source = tensor.detach()
        # Copy the storage span the view covers and restore the exact strides in the backward, so kernels see the
        # same layout (bitwise-identical results). A view with gaps (span > numel) is copied contiguously instead.
        span = 1 + sum((n - 1) * s for n, s in zip(source.shape, source.stride()))
        if span <= source.numel():
            copy_src, stride = source.as_strided((span,), (1,), source.storage_offset()), source.stride()
        else:
            copy_src, stride = source.contiguous().view(-1), _contiguous_strides(source.shape)
        ticket = _Ticket(self._next_id, source.shape, stride)
        self._next_id += 1
        if self._stream is None:
            ticket.host = copy_src.clone()
        else:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the producer kernels come first
            with torch.cuda.stream(self._stream):
                ticket.host = torch.empty(copy_src.shape, dtype=copy_src.dtype, pin_memory=self.pin_memory)
                ticket.host.copy_(copy_src, non_blocking=True)
                ticket.copied = self._stream.record_event()
        ticket.source, ticket.copy_src, ticket.source_ref = source, copy_src, weakref.ref(tensor)
        self._stash[ticket.id] = ticket
        self._tracker[ticket.id] = weakref.ref(ticket)
        weakref.finalize(ticket, self._tracker.pop, ticket.id, None)
        self._counts["offloaded"] += 1
        self._counts["bytes"] += copy_src.numel() * copy_src.element_size()
        return ticket

    def _release(self, ticket: _Ticket, *, keep: bool = False) -> None:
        """Drop the stash's device reference once the copy is done: the compute stream waits for the copy, so memory
        the allocator hands it next is never still being read by the side stream. ``keep`` hands the device tensor
        to the backward instead (no copy back needed)."""
        if ticket.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(ticket.copied)
        if keep:
            ticket.device, ticket.kept = ticket.source, True
        ticket.source = ticket.copy_src = None

    def _drain_stash(self) -> None:
        # The newest activations are the first the backward needs: they stay on the device, owned by their tickets.
        while self._stash:
            self._release(self._stash.popitem(last=False)[1], keep=True)

    # --- backward -------------------------------------------------------------------------------------------------

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        ticket = packed
        if self._stash:  # the forward is over
            self._drain_stash()
        if ticket.kept:
            self._counts["from_stash"] += 1
        if ticket.device is None:
            self._fetch(ticket)
        self._prefetch_before(ticket.id)
        tensor = ticket.device
        if ticket.fetched is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ticket.fetched)
            tensor.record_stream(compute)  # allocated on the side stream, used and freed on the compute stream
        ticket.uses -= 1
        if ticket.uses <= 0:  # autograd owns it now; a retained graph fetches it again from the host copy
            ticket.device, ticket.fetched, ticket.kept = None, None, False
        return tensor

    def _fetch(self, ticket: _Ticket) -> None:
        if self._stream is None:
            flat = ticket.host.clone()
        else:
            with torch.cuda.stream(self._stream):
                flat = ticket.host.to(self.device, non_blocking=True)
                ticket.fetched = self._stream.record_event()
        ticket.device = flat.as_strided(ticket.size, ticket.stride)
        self._counts["fetched"] += 1

    def _prefetch_before(self, ticket_id: int) -> None:
        """Start fetching the ``prefetch`` live tickets saved just before ``ticket_id`` (newest first)."""
        if self.prefetch == 0:
            return
        # A snapshot: autograd frees tickets (and their finalizers pop the tracker) while we walk it.
        ids = list(self._tracker)
        wanted = self.prefetch
        for index in range(bisect.bisect_left(ids, ticket_id) - 1, -1, -1):
            ref = self._tracker.get(ids[index])
            ticket = ref() if ref is not None else None
            if ticket is None:
                continue
            if ticket.device is None:
                self._fetch(ticket)
                self._counts["prefetched"] += 1
            wanted -= 1
            if wanted == 0:
                return

    # --- helpers --------------------------------------------------------------------------------------------------

    @staticmethod
    def _storage_ptrs(module: torch.nn.Module | None) -> frozenset[int]:
        if module is None:
            return frozenset()
        ptrs = set()
        for tensor in (*module.parameters(), *module.buffers()):
            if isinstance(tensor, DTensor):
                tensor = tensor.to_local()
            if tensor.device.type != "meta":
                ptrs.add(tensor.untyped_storage().data_ptr())
        return frozenset(ptrs)


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
