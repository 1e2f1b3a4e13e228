"""Measure one (case, path) in this process: the worker ``run.py`` starts fresh for every pair, one at a time.

    python -m benchmarks.measure CASE PATH [--quick] --json FILE

Order: set the allocator for memory; build inputs; warmup iterations (the first compiles, so compile time never
enters the figures); memory iterations (peak = the largest); allocator back to glibc's usual large-block behaviour;
the timed repeats. Memory: with glibc set to unmap every freed block >= 1 MiB and its free heap trimmed (so RSS
tracks live tensors, not what the allocator kept from the warmup), write ``5`` to ``/proc/self/clear_refs`` (resets
VmHWM to the current RSS), read VmRSS as the baseline, run one forward+backward, peak = VmHWM - baseline: the
extra resident memory of one step, gradients included, inputs excluded. Paths whose autograd graph frees
logits-sized tensors in varying order (naive, TRL) peak one such tensor higher or lower from one iteration to the
next (measured: 226-320 MB for naive at the quick size), hence the max over a few.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import cases, peers, worker

# The reference machine has 2 cores; every worker uses both, and workers never run concurrently.
NUM_THREADS = 2


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 (raises AttributeError when not glibc)
        return libc
    except (OSError, AttributeError):
        return None  # not glibc: peaks then include whatever the allocator keeps, and may read high or low


def _exact_allocator(libc: ctypes.CDLL | None) -> None:
    """Make RSS follow live tensors: glibc serves blocks >= 1 MiB with mmap and unmaps them on free (munmap also
    records VmHWM), and ``malloc_trim`` returns free heap pages. With the default dynamic threshold, freed blocks up
    to 32 MiB stay in the heap, and the same path's peak varied by 60 MB between runs (measured)."""
    gc.collect()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 20)
        libc.malloc_trim(0)


def _timing_allocator(libc: ctypes.CDLL | None) -> None:
    """Back to what glibc's dynamic threshold settles at after large frees (mmap threshold 32 MiB, trim 64 MiB),
    so that timed iterations reuse heap pages as they would in training instead of page-faulting fresh mmaps."""
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _grad_norms(inputs: object) -> dict[str, float]:
    """fp64 norms of every input gradient: the runner compares them across paths to catch a peer called wrongly."""
    out = {}
    for name, value in vars(inputs).items():
        if isinstance(value, torch.Tensor) and value.grad is not None:
            out[name] = float(value.grad.double().norm())
    return out


def measure(case: cases.Case, path: str, *, quick: bool) -> dict:
    torch.set_num_threads(NUM_THREADS)
    # From the start, not just before the memory iterations: after a warmup under glibc's default dynamic threshold
    # the first exact iteration of fusedrl read 296-421 MB instead of the steady 234 MB (measured, full size).
    libc = _glibc()
    _exact_allocator(libc)
    spec = peers.PATHS[case.inputs][path]
    shape = case.quick_shape if quick else case.shape
    inputs = peers.INPUTS[case.inputs](shape, getattr(torch, case.dtype), **case.input_kwargs)
    step = functools.partial(spec.run, inputs, **case.path_kwargs)

    start = time.perf_counter()
    for _ in range(case.quick_warmup if quick else case.warmup):
        inputs.zero_grad()
        step()
    warmup_s = time.perf_counter() - start

    peaks_kb = []
    for _ in range(case.quick_memory_repeats if quick else case.memory_repeats):
        inputs.zero_grad()
        _exact_allocator(libc)
        _reset_peak_rss()
        baseline_kb = _status_kb("VmRSS")
        step()
        peaks_kb.append(_status_kb("VmHWM") - baseline_kb)
    grad_norms = _grad_norms(inputs)
    _timing_allocator(libc)

    times_s = []
    for _ in range(case.quick_repeats if quick else case.repeats):
        inputs.zero_grad()
        start = time.perf_counter()
        step()
        times_s.append(time.perf_counter() - start)
    return {
        "times_s": times_s,
        "warmup_s": warmup_s,
        "peak_mb": max(peaks_kb) / 1024,
        "peak_mb_each": [kb / 1024 for kb in peaks_kb],
        "baseline_rss_mb": baseline_kb / 1024,
        "grad_norms": grad_norms,
        "num_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = worker.parser(__doc__)
    args = parser.parse_args(argv)
    result = measure(cases.by_name(args.case), args.path, quick=args.quick)
    Path(args.json).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
