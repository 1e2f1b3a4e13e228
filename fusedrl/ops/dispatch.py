"""Kernel selection and the one helper that defines a fused op.

Every op has the same three backends:
- ``reference``: readable pure torch with fp32 accumulation; the ground truth the others are tested against.
- ``compiled``: ``torch.compile`` of a chunked formulation; runs on CPU and GPU.
- ``triton``: fused Triton kernels; CUDA, or CPU tensors when ``TRITON_INTERPRET=1`` (the tests use that).

Selection, highest priority first:
1. ``with fusedrl.use_kernels(logprobs="triton"):`` (``all=`` sets every op); innermost block wins.
2. The config level: a trainer's ``kernels=`` field / the ``--kernels`` flag (applied with :func:`config_kernels`
   around that trainer's steps), then the process-wide :func:`configure_kernels` (for scripts without a trainer).
3. ``FUSEDRL_KERNELS="logprobs=triton,linear_logprobs=compiled"``, read each time a call resolves, never at import.
4. The default: ``triton`` on CUDA, ``compiled`` elsewhere.

An explicit request that cannot be met raises ``ValueError`` naming the valid choices; only the default falls back
(logged once with the reason).

Traced code (:func:`traced_backend`): inside a fusedrl compiled region (``runtime.compile.compile_region``) the
backends are resolved eagerly on entry (:func:`pinned_selection`, which raises for an unmet request) and read by the
traced ops from a module global that Dynamo guards on, so a region called again under another selection recompiles
instead of reusing a graph traced for other backends. Inside a user's own ``torch.compile`` the backend resolved at
trace time is a constant of that graph. A call that the op's Triton kernel cannot serve (say, a loss type coupling
the batch when the kernel is per row) passes its reason as ``triton_unsupported`` and runs ``compiled``, logged once.

Run-time fallback (:func:`run_with_fallback`): a Triton kernel can still fail when it is first compiled for a shape
or dtype (a compiler error, a launch needing more shared memory or registers than the GPU has, a failed C build of
the launcher stub). Every Triton launch runs through :func:`define_op`'s implementation, which calls
``run_with_fallback``: on such a failure a default selection runs the compiled backend, logs the reason once per op
and routes later calls of that op to ``compiled`` for the rest of the process; an explicit ``triton`` request
re-raises instead. The explicit request is looked up where the launch fails, so a backward running outside the
``use_kernels`` block that chose Triton falls back rather than raising.

Defining an op (:func:`define_op`): one ``torch.library.custom_op`` per fused computation, whose schema is its
compiled implementation's signature plus a trailing ``backend: str``; a fake (meta) implementation; optional
autograd. The public function of an op checks its inputs, resolves the backend with :func:`traced_backend`, runs the
reference itself (plain torch, traced directly by Dynamo) and calls the custom op for ``compiled`` / ``triton``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import inspect
import logging
import os
import subprocess
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import torch

logger = logging.getLogger("fusedrl")

BACKENDS = ("reference", "compiled", "triton")
ENV_VAR = "FUSEDRL_KERNELS"
ALL = "all"

# Op name -> one line of what it computes; each op folder registers its own on import.
_OPS: dict[str, str] = {}

# An immutable empty default: use_kernels always sets a fresh merged dict, never mutates the current one.
_context_selection: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "fusedrl_kernels", default=types.MappingProxyType({})
)
# The config level: a trainer's `kernels=` field, scoped to its steps (config_kernels), over the process-wide one.
_scoped_config_selection: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "fusedrl_config_kernels", default=types.MappingProxyType({})
)
_configured_selection: dict[str, str] = {}
# Every op's backend as resolved on entry to a compiled region: read by traced code, guarded by Dynamo (a tuple of
# (op, backend) string pairs is guarded by value, so an equal selection reuses the graph and another recompiles).
_pinned_selection: tuple[tuple[str, str], ...] = ()
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


@contextlib.contextmanager
def config_kernels(selection: Mapping[str, str]) -> Iterator[None]:
    """The config-level selection of one trainer (its ``kernels=`` field) inside a block: below any caller's
    ``use_kernels``, above :func:`configure_kernels` and ``FUSEDRL_KERNELS``."""
    token = _scoped_config_selection.set(types.MappingProxyType(_checked(selection, "kernels")))
    try:
        yield
    finally:
        _scoped_config_selection.reset(token)


def configure_kernels(selection: str | Mapping[str, str] | None) -> dict[str, str]:
    """Set the process-wide config-level selection (replacing the previous one); returns what was set. Trainers
    scope their own ``kernels=`` field above it (:func:`config_kernels`); ``None`` clears it."""
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
    scoped = _scoped_config_selection.get()
    if op in scoped:
        return scoped[op], "kernels config"
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


# ---------------------------------------------------------------------------------------------------------------
# Backends inside traced code


@contextlib.contextmanager
def pinned_selection(device: torch.device | str) -> Iterator[None]:
    """Resolve every op's backend for ``device`` now (an unmet explicit request raises here, before any tracing)
    and let traced ops read it (:func:`traced_backend`) for the duration of the block."""
    global _pinned_selection
    previous = _pinned_selection
    _pinned_selection = tuple(kernel_backends(device).items())
    try:
        yield
    finally:
        _pinned_selection = previous


@torch.compiler.assume_constant_result
def _constant_backend(op: str, device: torch.device) -> str:
    # Outside a pinned region Dynamo cannot trace the selection (context variables, the environment): the backend
    # resolved at trace time becomes a constant of the graph.
    return resolve(op, device)


def traced_backend(op: str, device: torch.device, *, triton_unsupported: str | None = None) -> str:
    """The backend of ``op``; safe to call inside ``torch.compile``. In a pinned region (see
    :func:`pinned_selection`) the traced graph guards on the pinned value and recompiles when it changes.

    triton_unsupported: why this call has no Triton kernel although the op has one (e.g. a loss that couples the
    batch, where the op's kernel is per row), or None. A ``triton`` selection, explicit or default, then runs
    ``compiled`` and logs the reason once per op and reason: the selection names an op, not each of its calls.
    """
    backend = None
    if torch.compiler.is_compiling():
        for name, pinned in _pinned_selection:
            if name == op:
                backend = pinned
        if backend is None:
            backend = _constant_backend(op, device)
    else:
        backend = resolve(op, device)
    if backend == "triton" and triton_unsupported:
        return _routed_to_compiled(op, triton_unsupported)
    return backend


@torch.compiler.assume_constant_result
def _routed_to_compiled(op: str, reason: str) -> str:
    # Under torch.compile this runs once at trace time and its result is a graph constant: the log call stays out of
    # the graph (a logging call in traced code would break a fullgraph region).
    _log_fallback(op, reason)
    return "compiled"


# ---------------------------------------------------------------------------------------------------------------
# Defining an op


def _import(target: str) -> Callable:
    # Triton modules are imported on first use: triton.jit reads TRITON_INTERPRET when the module is imported.
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _autocast_off(inputs: list) -> contextlib.AbstractContextManager:
    """Autocast disabled on the device of the first tensor input. A custom op's implementation sets its own
    precision (fp32 accumulation, outputs in the inputs' dtypes); left on, the caller's autocast turned the LM head's
    matmuls bf16 against its fp32 ``out=`` buffers ("Expected out tensor to have dtype BFloat16" in the backward,
    which the autograd engine runs under the autocast state of the ``backward()`` call). The public function decides
    the input dtypes instead (``logprobs.linear_token_logprobs`` casts to the autocast dtype, as ``nn.Linear`` is)."""
    device_type = next((t.device.type for t in inputs if isinstance(t, torch.Tensor)), "cpu")
    return torch.autocast(device_type, enabled=False)


def define_op(
    name: str,
    *,
    op: str,
    compiled: Callable | str,
    triton: str,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
) -> Callable:
    """Register ``fusedrl::<name>`` and return the custom op: call it with the arguments of ``compiled`` and the
    backend (``"compiled"`` or ``"triton"``) last.

    compiled: the compiled-backend implementation, or its ``"module:function"``, then looked up on every call as
        ``triton`` is (the module attribute decides what runs: a patched or reloaded function takes effect, e.g. a
        test's spy). Its annotated signature is the op's schema (``backend: str`` is appended), so its parameters
        must be custom-op types (tensors, optional tensors, int, float, bool, str, lists of those) and it must
        return a tensor or a tuple of tensors.
    triton: ``"module:function"`` of the Triton implementation, same signature, imported on first use and run
        through :func:`run_with_fallback` (``compiled`` is the fallback).
    op: the registry op whose selection and fallback state this custom op follows (several custom ops may share one,
        e.g. a forward and its backward).
    fake: the meta implementation, same parameters as ``compiled`` (no ``backend``).
    backward, setup_context: autograd as in ``register_autograd``, without the ``backend`` input: ``backward``
        returns one gradient (or None) per parameter of ``compiled``, and ``ctx.backend`` holds the backend.
    """
    def compiled_fn() -> Callable:
        return _import(compiled) if isinstance(compiled, str) else compiled

    signature = inspect.signature(compiled_fn())
    hints = typing.get_type_hints(compiled_fn())
    parameters = [param.replace(annotation=hints[param.name]) for param in signature.parameters.values()]
    parameters.append(inspect.Parameter("backend", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str))
    schema_signature = inspect.Signature(parameters, return_annotation=hints["return"])

    def implementation(*args):
        *inputs, backend = args
        with _autocast_off(inputs):
            if backend == "compiled":
                return compiled_fn()(*inputs)
            if backend == "triton":
                return run_with_fallback(op, _import(triton), compiled_fn(), *inputs)
        raise ValueError(f"fusedrl::{name}: backend {backend!r} has no kernel here; choose compiled or triton "
                         "(the reference runs outside the custom op)")

    implementation.__signature__ = schema_signature
    implementation.__name__ = implementation.__qualname__ = name
    implementation.__annotations__ = {**{p.name: p.annotation for p in parameters}, "return": hints["return"]}
    custom_op = torch.library.custom_op(f"fusedrl::{name}", mutates_args=())(implementation)

    def fake_implementation(*args):
        return fake(*args[:-1])

    custom_op.register_fake(fake_implementation)
    if backward is not None:
        def setup(ctx, inputs, output):
            ctx.backend = inputs[-1]
            if setup_context is not None:
                setup_context(ctx, inputs[:-1], output)

        def backward_with_backend(ctx, *grads):
            return (*backward(ctx, *grads), None)

        custom_op.register_autograd(backward_with_backend, setup_context=setup)
    return custom_op
