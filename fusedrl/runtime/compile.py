"""Every torch.compile setting fusedrl uses, in one place, applied when first needed (never at import).

Three things are compiled, each at a clear boundary and always with ``fullgraph=True``:

- kernels (``fusedrl.ops.compiler.compile_kernel``): a chunk of row statistics, a loss tail; pure tensor math inside
  the fused ops. The options of every ``torch.compile`` call live there (``compile_options``), below the runtime.
- the loss region (:func:`compile_region`, a trainer's ``compile=True``): final hidden states -> fused head -> loss,
  one graph per trainer; the fused ops appear in it as opaque custom ops.
- transformer blocks (:func:`compile_blocks`, ``compile_blocks=True``): each decoder layer, compiled in place. All
  layers share one graph (same code, parameters are graph inputs), so compile time does not grow with depth.

Recompilation is bounded by compiling with symbolic shapes from the first call (``dynamic=True``): a batch of another
sequence length reuses the graph. tests/runtime/test_compile_capture.py checks that five different lengths compile each
boundary at most :data:`MAX_COMPILES_PER_BOUNDARY` times.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from fusedrl.ops import dispatch
from fusedrl.ops.compiler import compile_options

F = TypeVar("F", bound=Callable)

# Documented bound, checked by the tests: graphs per boundary for any mix of sequence lengths and batch sizes. Shapes
# never recompile; what does is the grad mode (training forward vs the no-grad reference / eval forward) and, for
# blocks, whether the batch has padding: transformers passes the layers a mask tensor then and None otherwise
# (plain causal attention). 2 x 2 = 4 for blocks; a loss region runs in one grad mode, 1 (2 if also evaluated).
MAX_COMPILES_PER_BOUNDARY = 4


@functools.cache
def _compiled_region(fn: F) -> F:
    return torch.compile(fn, **compile_options())


def compile_region(fn: F) -> F:
    """Compile a trainer's loss region (hidden states -> loss); one artifact per function, shared by every trainer
    instance of the class.

    Each call resolves every op's backend first (``dispatch.pinned_selection``, on the device of the first tensor
    argument): an explicit request that cannot be met raises before anything runs, and the traced ops read the
    resolved backends from a global that Dynamo guards on, so a call under another selection (a caller's
    ``use_kernels`` after a first ``train()``) recompiles instead of reusing a graph traced for other backends.
    """
    compiled = _compiled_region(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
        with dispatch.pinned_selection(device):
            return compiled(*args, **kwargs)

    return run


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of ``model``: modules whose class is named in transformers' ``_no_split_modules`` (the
    decoder layer classes, e.g. ``LlamaDecoderLayer``), outermost first; PEFT and DDP wrappers are looked through."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks: list[torch.nn.Module] = []
    prefixes: list[str] = []
    for name, module in model.named_modules():
        # A block inside a block (a composite model's sub-encoder layers) is compiled as part of the outer one.
        if type(module).__name__ in names and not any(name.startswith(prefix) for prefix in prefixes):
            blocks.append(module)
            prefixes.append(f"{name}.")
    if not blocks:
        raise ValueError(f"compile_blocks=True: {type(model).__name__} names no decoder layer class in "
                         "_no_split_modules; set compile_blocks=False")
    return blocks


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile each transformer block of ``model`` in place (``nn.Module.compile``: parameter names, state dicts and
    checkpoints are unchanged; ``module.forward`` itself is untouched). Activation checkpointing keeps working: the
    layer's checkpoint wrapper is traced as torch's checkpoint operator. Returns the number of blocks."""
    blocks = decoder_blocks(model)
    _configure_dynamo_for_blocks()
    for block in blocks:
        block.compile(**compile_options())
    return len(blocks)


@functools.cache
def _configure_dynamo_for_blocks() -> None:
    """The process-wide Dynamo settings fusedrl changes, applied the first time blocks are compiled.

    ``recompile_limit`` (torch default 8) counts graphs per code object, and every decoder layer of every model in
    the process runs the same code object (the layer class's forward): a model's 4 (grad mode x padded batch, see
    MAX_COMPILES_PER_BOUNDARY) plus those of a value model with other inputs, or of a second trainer on a model of
    another width (parameter shapes are static), add up past 8, and with ``fullgraph=True`` the ninth is an error.
    32 leaves room for a few models in one process while still stopping a real recompile loop.

    ``skip_fwd_side_effects_in_bwd_under_checkpoint``: transformers >= 5.25 wraps attention forwards with the
    ``kernels`` package's ``use_kernelized_func``, which under compile sets and then resets a module-level variable
    in every layer call (``CompileableContextVar``). Inside an activation-checkpointed layer Dynamo refuses any
    forward side effect that the backward recompute would not replay ("HOP: Unsafe side effect"), so
    ``compile_blocks=True`` with gradient checkpointing failed. That side effect is a set/reset pair that leaves
    the variable as it found it, so not replaying it in the recompute changes nothing. Older torch releases without
    the setting never met this wrapper (it came with transformers 5.25), hence the ``hasattr``.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


@contextlib.contextmanager
def eager_generation() -> Iterator[None]:
    """Run compiled blocks eagerly inside the block (``torch.compiler.set_stance("force_eager")``): sampling with a
    KV cache changes the cache's state and strides at every decoding step, each a guard failure and a recompile,
    and ``fullgraph=True`` turns the ninth into an error. Generation is a no-grad loop of small steps, where a
    training-shaped graph would not pay off anyway."""
    with torch.compiler.set_stance("force_eager"):
        yield
