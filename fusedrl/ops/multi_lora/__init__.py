"""Public multi-adapter LoRA linear (``fusedrl.multi_lora_linear``), its input checks and its torch.library
registration.

Legend: N rows (the leading dims of x flattened), I input features (H_in), O output features (H_out), K adapters,
R rank.

Backends of the ``multi_lora`` op (``reference.py`` states the semantics):
- ``reference``: ``reference.multi_lora_linear_reference``, a loop over the adapters in fp32 torch autograd;
- ``compiled``: the ``fusedrl::multi_lora`` custom op running ``compiled.multi_lora_fwd`` (``torch.compile`` of one
  dense masked matmul over all adapters), with its backward ``fusedrl::multi_lora_backward``;
- ``triton``: the same custom ops running ``triton.py``: rows grouped by adapter, one launch per phase for all
  adapters; a kernel that fails to build falls back to ``compiled`` (``dispatch.define_op``).
Both custom ops have fake implementations, so a ``torch.compile(fullgraph=True)`` region captures a layer as one node
per direction. Benchmarks: ``benchmarks/ops/multi_lora.py``.
"""

from __future__ import annotations

import math
import numbers

import torch

from fusedrl.ops import checks, dispatch
from fusedrl.ops.multi_lora.reference import multi_lora_linear_reference

dispatch.register_op("multi_lora", "a linear layer with one of K stacked LoRA adapters per row (multi_lora_linear)")

_COMPILED = "fusedrl.ops.multi_lora.compiled"
_TRITON = "fusedrl.ops.multi_lora.triton"


def _fake_forward(x, weight, bias, lora_A, lora_B, scaling, adapter_ids):
    num_rows = x.shape[0]
    return x.new_empty((num_rows, weight.shape[0])), x.new_empty((num_rows, lora_A.shape[1]), dtype=torch.float32)


def _fake_backward(grad_y, x, weight, lora_A, lora_B, scaling, adapter_ids, hidden, x_grad, lora_grad):
    return (x.new_empty(x.shape if x_grad else (0,)), lora_A.new_empty(lora_A.shape if lora_grad else (0,)),
            lora_B.new_empty(lora_B.shape if lora_grad else (0,)))


_backward_op = dispatch.define_op(
    "multi_lora_backward", op="multi_lora", compiled=f"{_COMPILED}:multi_lora_bwd", triton=f"{_TRITON}:multi_lora_bwd",
    fake=_fake_backward,
)


def _setup(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, scaling, adapter_ids = inputs
    _, hidden = output
    ctx.mark_non_differentiable(hidden)
    ctx.save_for_backward(x, weight, lora_A, lora_B, scaling, adapter_ids, hidden)


def _backward(ctx, grad_y, _grad_hidden):
    x_grad = ctx.needs_input_grad[0]
    lora_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
    if not (x_grad or lora_grad):
        return (None,) * 7
    x, weight, lora_A, lora_B, scaling, adapter_ids, hidden = ctx.saved_tensors
    grad_x, grad_A, grad_B = _backward_op(grad_y, x, weight, lora_A, lora_B, scaling, adapter_ids, hidden, x_grad,
                                          lora_grad, ctx.backend)
    return (grad_x if x_grad else None, None, None, grad_A if ctx.needs_input_grad[3] else None,
            grad_B if ctx.needs_input_grad[4] else None, None, None)


_forward_op = dispatch.define_op(
    "multi_lora", op="multi_lora", compiled=f"{_COMPILED}:multi_lora_fwd", triton=f"{_TRITON}:multi_lora_fwd",
    fake=_fake_forward, backward=_backward, setup_context=_setup,
)


def _autocast_inputs(*tensors):
    """The float inputs cast to the autocast dtype when autocast is on for their device, as autocast casts the
    inputs of PEFT's three ``nn.Linear`` calls; the custom ops themselves run with autocast off."""
    device_type = tensors[0].device.type if isinstance(tensors[0], torch.Tensor) else "cpu"
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in checks.FLOAT_DTYPES else t
                 for t in tensors)


def _check_layer(x, weight, bias, lora_A, lora_B) -> None:
    checks.check_float("x", x, min_dim=2)
    num_in = x.shape[-1]
    checks.check_float("weight", weight, min_dim=2)
    if weight.dim() != 2 or weight.shape[1] != num_in:
        raise ValueError(f"weight must be [H_out, H_in] with H_in = x.shape[-1] = {num_in}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match x ({x.dtype}, {x.device}), as "
                         "nn.Linear requires; under autocast both are cast")
    if bias is not None:
        checks.check_float("bias", bias)
        if bias.shape != weight.shape[:1] or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias must be None or [H_out] = [{weight.shape[0]}] of {weight.dtype} on "
                             f"{weight.device}, got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        name = "weight" if weight.requires_grad else "bias"
        raise ValueError(f"{name} requires grad, but multi_lora_linear keeps the base layer frozen (LoRA trains "
                         f"lora_A and lora_B only; PEFT freezes the base); pass {name}.detach() or freeze it")
    checks.check_float("lora_A", lora_A, min_dim=3)
    if lora_A.dim() != 3 or lora_A.shape[2] != num_in:
        raise ValueError(f"lora_A must be [K, r, H_in] with H_in = x.shape[-1] = {num_in} (the adapters' "
                         f"lora_A.weight stacked), got {tuple(lora_A.shape)}")
    checks.check_float("lora_B", lora_B, min_dim=3)
    num_adapters, rank, _ = lora_A.shape
    expected = (num_adapters, weight.shape[0], rank)
    if lora_B.shape != expected:
        raise ValueError(f"lora_B must be [K, H_out, r] = {list(expected)} (lora_A is {list(lora_A.shape)}, weight "
                         f"{list(weight.shape)}), got {tuple(lora_B.shape)}")
    if lora_B.dtype != lora_A.dtype or lora_A.device != x.device or lora_B.device != x.device:
        raise ValueError(f"lora_A ({lora_A.dtype}, {lora_A.device}) and lora_B ({lora_B.dtype}, {lora_B.device}) "
                         f"must share a dtype and sit on x's device ({x.device})")


def _checked_scaling(scaling, num_adapters: int, device: torch.device) -> torch.Tensor:
    """fp32 ``[K]`` from a number or a 0-d / ``[K]`` float tensor (a constant: PEFT's ``lora_alpha / r``)."""
    if isinstance(scaling, torch.Tensor):
        if not scaling.is_floating_point() or scaling.shape not in ((), (num_adapters,)) or scaling.device != device:
            raise ValueError(f"scaling must be a number or a float tensor [K] = [{num_adapters}] on {device}, got "
                             f"{scaling.dtype} {tuple(scaling.shape)} on {scaling.device}")
        if scaling.requires_grad and torch.is_grad_enabled():
            raise ValueError("scaling requires grad, but it is a constant of each adapter (lora_alpha / r) and gets "
                             "no gradient; pass scaling.detach()")
        return scaling.detach().float().expand(num_adapters).contiguous()
    # A chained comparison rejects NaN and inf alike, and Dynamo folds it.
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not -math.inf < scaling < math.inf:
        raise ValueError(f"scaling must be a finite number or a float tensor [K], got {scaling!r}")
    return torch.full((num_adapters,), float(scaling), dtype=torch.float32, device=device)


def _check_ids(adapter_ids, x: torch.Tensor, num_adapters: int) -> None:
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in (torch.int64, torch.int32):
        got = adapter_ids.dtype if isinstance(adapter_ids, torch.Tensor) else type(adapter_ids).__name__
        raise ValueError(f"adapter_ids must be an int64 (or int32) tensor, got {got}")
    if adapter_ids.shape != x.shape[:-1] or adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids must be x.shape[:-1] = {tuple(x.shape[:-1])} on {x.device} (one adapter per "
                         f"row), got {tuple(adapter_ids.shape)} on {adapter_ids.device}")
    # Data-dependent (one host sync); skipped while torch.compile traces, where it would break the graph.
    if torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in torch.stack([adapter_ids.min(), adapter_ids.max()]).tolist())
    if low < -1 or high >= num_adapters:
        raise ValueError(f"adapter_ids must lie in [-1, {num_adapters}) (-1: base layer only), got values in "
                         f"[{low}, {high}]")


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    adapter_ids: torch.Tensor,
) -> torch.Tensor:
    """A linear layer with K LoRA adapters stacked, each row through its own: ``y [..., H_out]`` in x's dtype,

        y[n] = x[n] @ weight.T + bias + scaling[k] * (x[n] @ lora_A[k].T) @ lora_B[k].T,   k = adapter_ids[n],

    and ``y[n] = x[n] @ weight.T + bias`` where ``k = -1`` (the bare base, e.g. a reference row). That is PEFT's LoRA
    ``Linear.forward`` (dropout 0) with adapter k active, for every row at once.

    x: ``[..., H_in]`` fp32 / bf16 / fp16; weight: ``[H_out, H_in]`` and bias ``[H_out]`` (or None), the frozen base
    layer in x's dtype; lora_A: ``[K, r, H_in]`` and lora_B: ``[K, H_out, r]``, the adapters' ``lora_A.weight`` and
    ``lora_B.weight`` stacked, in one float dtype (fp32 adapters on a bf16 base are fine; adapters of smaller rank
    zero-padded to r give the same result); scaling: a number (every adapter) or a float ``[K]`` tensor, PEFT's
    ``lora_alpha / r`` per adapter; adapter_ids: int64 (or int32) ``x.shape[:-1]``, each in ``[-1, K)``.

    Gradients flow to x and to lora_A / lora_B in their own dtypes (an adapter with no rows gets zeros). The base layer
    is frozen: weight or bias requiring grad raises (detach them); scaling is a constant. Computation is fp32 (the
    base matmul in x's dtype with fp32 accumulation, as ``nn.Linear``); inside an autocast region every float input
    is cast to the autocast dtype first, as autocast casts PEFT's three ``nn.Linear`` calls. Bad input raises
    ValueError naming the argument.

    Example (H_in = H_out = 1, K = 2, r = 1): weight 2, bias 0, lora_A [[[1]], [[3]]], lora_B [[[5]], [[7]]],
    scaling [0.5, 1], x [[1], [1], [1]], ids [1, -1, 0] -> y [[2 + 21], [2], [2 + 2.5]] = [[23], [2], [4.5]].
    """
    x, weight, bias, lora_A, lora_B = _autocast_inputs(x, weight, bias, lora_A, lora_B)
    _check_layer(x, weight, bias, lora_A, lora_B)
    num_adapters = lora_A.shape[0]
    scaling_K = _checked_scaling(scaling, num_adapters, x.device)
    _check_ids(adapter_ids, x, num_adapters)
    x_NI = x.reshape(-1, x.shape[-1])
    adapter_ids_N = adapter_ids.reshape(-1).long()
    backend = dispatch.traced_backend("multi_lora", x.device)
    if backend == "reference":
        # Autocast off, as inside the custom ops: the inputs already carry its dtype, and left on it would turn the
        # reference's fp32 matmuls into bf16 ones.
        with torch.autocast(x.device.type, enabled=False):
            y_NO = multi_lora_linear_reference(x_NI, weight, bias, lora_A, lora_B, scaling_K, adapter_ids_N)
    else:
        y_NO, _ = _forward_op(x_NI.contiguous(), weight.contiguous(), bias, lora_A.contiguous(), lora_B.contiguous(),
                              scaling_K, adapter_ids_N.contiguous(), backend)
    return y_NO.view(*x.shape[:-1], weight.shape[0])
