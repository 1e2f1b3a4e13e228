"""The fused LM-head ops on a sharded head (FSDP2, DeepSpeed ZeRO-3) and the reference model's sharding.

The fused ops read ``lm_head.weight`` themselves instead of calling the head module, so they see whatever the
sharding engine leaves there outside a module forward:

- ZeRO-3 frees a partitioned weight after each module forward (``weight.numel() == 0``) and gathers it again before
  that module's backward; only the module's own hooks do that.
- FSDP2 keeps the sharded ``DTensor`` outside the forward of the unit that owns it. ``weight.full_tensor()`` gathers
  it, but its backward hands each rank only its own rank-local gradient slice, with no reduction across ranks
  (checked on 2 gloo processes: the shards' gradients were off by 3.2 on a 6 x 4 head), so it is only used where no
  gradient is needed (the reference).

ZeRO-3: the gathered weight comes out of the head module's own forward (:func:`whole_head`): DeepSpeed's pre-forward
hook gathers the weight, the forward returns a copy of it (``weight + anchor``, ``anchor`` a zero scalar input that
requires grad), DeepSpeed frees its gathered weight as usual, and the copy lives as long as the autograd graph needs
it. In the backward DeepSpeed's hooks on the outputs gather the parameter again, the gradient of the copy flows to the
parameter and through DeepSpeed's reduce-scatter into the partitions, and the hook on ``anchor`` (its gradient comes
out of the same add) tells DeepSpeed the module's backward is done, so it frees the parameter. Cost: one ``[V, H]``
copy held from the forward to the backward, what ``GatheredParameters`` around both would hold. The module's forward
is swapped for that one call and restored after it (an instance attribute, removed in ``finally``).

FSDP2: accelerate shards the final norm and the head as one unit (``fully_shard([norm, lm_head])``) and reshards it
after the forward. Its gather for the backward hangs on the head's output (logits), which the fused loss never uses:
the loss's gradient enters through the final hidden states, so the norm's backward would read freed storage (a
segfault on CPU, checked). The anchor trick is wrong here too: the anchor's gradient arrives before the norm's
backward and would reshard the whole unit early. So the unit that owns the head (and the root unit) is gathered after
the forward and told not to reshard after later forwards (torch's own default for a root unit); the fused ops then
read the plain gathered parameters, their gradients land in the gathered gradients, and FSDP2 reduce-scatters them and
reshards after the backward as usual.

Legend: V vocabulary, H hidden.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor


class HeadWeights(NamedTuple):
    weight_VH: torch.Tensor
    bias_V: torch.Tensor | None


def is_zero3_param(param: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 manages (it carries a ``ds_id``)."""
    return hasattr(param, "ds_id")


def _is_fsdp2_unit(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _copy_forward(head: torch.nn.Module, anchor: torch.Tensor) -> HeadWeights:
    # x + 0.0 is exact, and a new tensor: the engine may free or reshard the parameter storage when forward returns.
    weight, bias = head.weight, head.bias
    return HeadWeights(weight + anchor.to(weight.dtype), None if bias is None else bias + anchor.to(bias.dtype))


def _gathered_by_forward(head: torch.nn.Module) -> HeadWeights:
    anchor = torch.zeros((), device=head.weight.device, requires_grad=torch.is_grad_enabled())
    own = head.__dict__.get("forward")
    head.forward = lambda anchor_: _copy_forward(head, anchor_)
    try:
        return HeadWeights(*head(anchor))
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def whole_head(head: torch.nn.Module) -> HeadWeights:
    """The whole ``(weight_VH, bias_V)`` of the linear ``head``, differentiable into its parameters wherever they
    live (see the module docstring). Call it after the model forward and use the result in the same step."""
    if is_zero3_param(head.weight):
        return _gathered_by_forward(head)
    if _is_fsdp2_unit(head) and torch.is_grad_enabled():
        _keep_gathered(head)
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        if torch.is_grad_enabled() and weight.requires_grad:
            raise ValueError("lm_head.weight is an FSDP2 DTensor outside any forward of its FSDP unit, where "
                             "gathering it cannot reduce its gradient across ranks; shard lm_head in a unit of its "
                             "own or leave it in the root unit")
        return HeadWeights(weight.full_tensor(), bias.full_tensor() if isinstance(bias, DTensor) else bias)
    return HeadWeights(weight, bias)


def _keep_gathered(unit: torch.nn.Module) -> None:
    unit.set_reshard_after_forward(False, recurse=False)
    unit.unshard()


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether some parameter of ``model`` is sharded across processes (FSDP2 DTensor, DeepSpeed ZeRO-3): then every
    forward is collective, and every process must run as many as the others."""
    return any(isinstance(param, DTensor) or is_zero3_param(param) for param in model.parameters())


def keep_root_unsharded(model: torch.nn.Module) -> None:
    """Call after a forward of ``model`` (with grad) whose gradient enters through tensors taken from inside it (the
    final hidden states caught on the decoder trunk, runtime/hidden.py) rather than through its outputs: gathers the
    FSDP2 root unit and keeps it gathered until FSDP2 reshards it after the backward (see the module docstring)."""
    from torch.distributed.fsdp import FSDPModule

    if not torch.is_grad_enabled():
        return
    root = next((module for module in model.modules() if isinstance(module, FSDPModule)), None)
    if root is not None:
        _keep_gathered(root)


# --- the reference model -------------------------------------------------------------------------------------------


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of ``accelerator`` (None without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.zero_stage


def is_fsdp2(accelerator) -> bool:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return plugin is not None and getattr(plugin, "fsdp_version", 1) == 2


def prepare_reference(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """The frozen reference ``model`` sharded like the policy, ready for no-grad forwards.

    - ZeRO-3: a DeepSpeed inference engine with the policy's ZeRO settings (parameters partitioned; no optimizer,
      scheduler or optimizer offload). ZeRO-1/2 shard only optimizer state and gradients, which a frozen model has
      none of, so there the reference is a plain replica, as under DDP.
    - FSDP2: accelerate's FSDP2 wrapping of the policy (one unit per decoder layer plus the root), so each rank holds
      1/world of the reference.
    - otherwise: accelerate's evaluation-mode preparation (device placement).
    """
    if zero_stage(accelerator) == 3:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        config["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # DeepSpeedEngine.eval returns None, unlike Module.eval
        return engine
    if is_fsdp2(accelerator):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model).eval()
    return accelerator.prepare_model(model, evaluation_mode=True)
