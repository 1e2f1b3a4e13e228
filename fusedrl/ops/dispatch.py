"""Kernel selection: which backend runs each fused op.

Every op has the same three backends:
- ``reference``: readable pure torch with fp32 accumulation; the ground truth the others are tested against.
- ``compiled``: ``torch.compile`` of a chunked formulation; runs on CPU and GPU.
- ``triton``: fused Triton kernels; CUDA, or CPU tensors when ``TRITON_INTERPRET=1`` (the tests use that).

Selection, highest priority first:
1. ``with fusedrl.use_kernels(logprobs="triton"):`` (``all=`` sets every op); innermost block wins.
2. :func:`configure_kernels` (trainer configs and the ``--kernels`` CLI flag call it).
3. ``FUSEDRL_KERNELS="logprobs=triton,linear_logprobs=compiled"``, read each time a call resolves, never at import.
4. The default: ``triton`` on CUDA, ``compiled`` elsewhere.

An explicit request that cannot be met raises ``ValueError`` naming the valid choices; only the default falls back
(logged once with the reason).

Run-time fallback (:func:`run_with_fallback`): a Triton kernel can still fail when it is first compiled for a shape
or dtype (a compiler error, a launch needing more shared memory or registers than the GPU has, a failed C build of
the launcher stub). Every Triton launch site calls ``run_with_fallback(op, triton_fn, fallback_fn, *args)``
inside its custom op (forward and backward): on such a failure a default selection runs ``fallback_fn`` (the
compiled backend), logs the reason once per op and routes later calls of that op to ``compiled`` for the rest of
the process; an explicit ``triton`` request re-raises instead. The explicit request is looked up where the launch
fails, so a backward running outside the ``use_kernels`` block that chose Triton falls back rather than raising.
New ops (GAE, policy losses) wrap their launches the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
import subprocess
import types
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import torch

logger = logging.getLogger("fusedrl")

BACKENDS = ("reference", "compiled", "triton")
ENV_VAR = "FUSEDRL_KERNELS"
ALL = "all"

# Op name -> one line of what it computes; later issues register more ops (preference, gae, ...).
_OPS: dict[str, str] = {}

# An immutable empty default: use_kernels always sets a fresh merged dict, never mutates the current one.
_context_selection: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "fusedrl_kernels", default=types.MappingProxyType({})
)
_configured_selection: dict[str, str] = {}
_logged_fallbacks: set[tuple[str, str]] = set()
# Op -> why its Triton kernel failed at run time; the default selection then runs it on `compiled`.
_failed_triton: dict[str, str] = {}

R = TypeVar("R")


def register_op(name: str, description: str) -> None:
    """Declare an op that can be selected by name; every op offers all of :data:`BACKENDS`."""
    _OPS[name] = description


def registered_ops() -> tuple[str, ...]:
    return tuple(_OPS)


def _checked(selection: Mapping[str, str], source: str) -> dict[str, str]:
    """Validate op and backend names; ``all`` expands to every registered op."""
    out: dict[str, str] = {}
    for op, backend in selection.items():
        if backend not in BACKENDS:
            raise ValueError(
                f"{source}: unknown backend {backend!r} for {op!r}; choose one of {', '.join(BACKENDS)}"
            )
        if op == ALL:
            out.update({name: backend for name in _OPS})
        elif op in _OPS:
            out[op] = backend
        else:
            raise ValueError(
                f"{source}: unknown op {op!r}; choose one of {', '.join((ALL, *_OPS))}"
            )
    return out


def parse_kernel_spec(spec: str, *, source: str = "--kernels") -> dict[str, str]:
    """Parse ``"logprobs=triton,linear_logprobs=compiled"`` (or ``"all=reference"``) into a selection."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        op, sep, backend = item.partition("=")
        if not sep or not op.strip() or not backend.strip():
            raise ValueError(f"{source}: expected OP=BACKEND pairs separated by commas, got {item!r}")
        pairs[op.strip()] = backend.strip()
    return _checked(pairs, source)


@contextlib.contextmanager
def use_kernels(**selection: str) -> Iterator[None]:
    """Select backends inside a block: ``with use_kernels(logprobs="triton"):`` or ``use_kernels(all="reference")``."""
    merged = {**_context_selection.get(), **_checked(selection, "use_kernels")}
    token = _context_selection.set(merged)
    try:
        yield
    finally:
        _context_selection.reset(token)


def configure_kernels(selection: str | Mapping[str, str] | None) -> dict[str, str]:
    """Set the config/CLI-level selection (replacing the previous one); returns what was set."""
    parsed = (
        parse_kernel_spec(selection)
        if isinstance(selection, str)
        else _checked(selection or {}, "kernels")
    )
    _configured_selection.clear()
    _configured_selection.update(parsed)
    return parsed


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_unavailable_reason(device: torch.device) -> str | None:
    if not triton_importable():
        return "triton is not installed (pip install triton, Linux only)"
    if device.type == "cuda" or triton_interpreting():
        return None
    return f"triton kernels need a CUDA device, or TRITON_INTERPRET=1 for {device.type} tensors"


def _requested(op: str) -> tuple[str, str] | None:
    """The explicit request for ``op`` and where it came from, or None."""
    context = _context_selection.get()
    if op in context:
        return context[op], "use_kernels"
    if op in _configured_selection:
        return _configured_selection[op], "kernels config"
    env = os.environ.get(ENV_VAR, "")
    if env:
        selection = parse_kernel_spec(env, source=ENV_VAR)
        if op in selection:
            return selection[op], ENV_VAR
    return None


def resolve(op: str, device: torch.device | str) -> str:
    """The backend that runs ``op`` for tensors on ``device``."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; choose one of {', '.join(_OPS)}")
    device = torch.device(device)
    requested = _requested(op)
    if requested is not None:
        backend, source = requested
        if backend == "triton" and (reason := _triton_unavailable_reason(device)):
            raise ValueError(
                f"{source} asks for {op}=triton but {reason}; choose one of "
                f"reference, compiled, or run on CUDA"
            )
        return backend
    backend = _default_backend(op, device)
    return "compiled" if backend == "triton" and op in _failed_triton else backend


def _default_backend(op: str, device: torch.device) -> str:
    """``triton`` on CUDA when it can run there, else ``compiled`` (logged once per op and reason)."""
    if device.type == "cuda":
        reason = _triton_unavailable_reason(device)
        if reason is None:
            return "triton"
        _log_fallback(op, reason)
    return "compiled"


def _log_fallback(op: str, reason: str) -> None:
    if (op, reason) not in _logged_fallbacks:
        _logged_fallbacks.add((op, reason))
        logger.warning("fusedrl: %s falls back to the compiled backend: %s", op, reason)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "this Triton kernel cannot be built or launched here", not "the inputs are wrong"."""
    errors: list[type[BaseException]] = [subprocess.CalledProcessError]  # the launcher stub's C build failed
    if triton_importable():
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources, PTXASError

        errors += [CompilationError, OutOfResources, PTXASError]
    return tuple(errors)


def run_with_fallback(op: str, triton_fn: Callable[..., R], fallback_fn: Callable[..., R], *args, **kwargs) -> R:
    """``triton_fn(*args, **kwargs)``; if the Triton kernel fails to compile or launch (see :func:`_compile_errors`)
    and ``op=triton`` was not requested explicitly, ``fallback_fn(*args, **kwargs)`` instead, logged once; later calls
    of ``op`` skip the failing kernel. An explicit ``triton`` request re-raises the error."""
    explicit = (_requested(op) or ("", ""))[0] == "triton"
    if op in _failed_triton and not explicit:
        return fallback_fn(*args, **kwargs)
    try:
        return triton_fn(*args, **kwargs)
    except _compile_errors() as error:
        if explicit:
            raise
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        _failed_triton[op] = f"its Triton kernel failed at run time ({type(error).__name__}: {first_line})"
        _log_fallback(op, _failed_triton[op])
        return fallback_fn(*args, **kwargs)


def kernel_backends(device: torch.device | str | None = None) -> dict[str, str]:
    """The backend each registered op would use now on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {op: resolve(op, device) for op in _OPS}
