"""The fused LM-head ops on a sharded head (FSDP2, DeepSpeed ZeRO-3) and the reference model's sharding.

The fused ops read ``lm_head.weight`` themselves instead of calling the head module, so they see whatever the
sharding engine leaves there outside a module forward:

- ZeRO-3 frees a partitioned weight after each module forward (``weight.numel() == 0``) and gathers it again before
  that module's backward; only the module's own hooks do that.
- FSDP2 keeps the sharded ``DTensor`` outside the forward of the module that owns it. ``weight.full_tensor()`` gathers
  it, but its backward hands each rank only its own rank-local gradient slice, with no reduction across ranks
  (checked on 2 gloo processes: the shards' gradients were off by 3.2 on a 6 x 4 head), so it is only used where no
  gradient is needed. The head of the root FSDP2 unit (accelerate's default wrapping: one unit per decoder layer, the
  head in the root) stays unsharded from the model forward until the backward ends, so it is a plain tensor there.

The gathered weight therefore comes out of the head module's own forward when the head is partitioned by ZeRO-3 or
is its own FSDP2 unit (:func:`whole_head`): the engine's pre-forward hook gathers the weight, the forward returns a
copy of it (``weight + anchor``, ``anchor`` a zero scalar input that requires grad), the engine frees its gathered
weight as usual, and the copy lives as long as the autograd graph needs it. In the backward the engine's hooks on
the outputs gather the parameter again, the gradient of the copy flows to the parameter and through the engine's own
reduce-scatter into the shards, and the hook on the ``anchor`` input (its gradient comes out of the same add) tells the
engine the module's backward is done, so it frees the parameter again. Cost: one ``[V, H]`` copy held from the
forward to the backward, the memory ``GatheredParameters`` around both would hold. The module's forward is swapped
for that one call and restored after it (an instance attribute, removed in ``finally``): the head keeps its class,
parameters and hooks.

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
    live: the parameters themselves when unsharded (DDP, ZeRO-1/2, the root unit of FSDP2 after the model forward),
    else a copy gathered by the head's own forward (see the module docstring). Call it after the model forward and
    use the result in the same step."""
    weight, bias = head.weight, head.bias
    if is_zero3_param(weight) or _is_fsdp2_unit(head):
        return _gathered_by_forward(head)
    if isinstance(weight, DTensor):
        if torch.is_grad_enabled() and weight.requires_grad:
            raise ValueError("lm_head.weight is an FSDP2 DTensor outside any forward of its FSDP unit, where "
                             "gathering it cannot reduce its gradient across ranks; shard lm_head as its own unit "
                             "(fully_shard(model.lm_head)) or leave it in the root unit")
        return HeadWeights(weight.full_tensor(), bias.full_tensor() if isinstance(bias, DTensor) else bias)
    return HeadWeights(weight, bias)


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
    if is_fsdp2(accelerator) and not __import__('os').environ.get('DBG_NOREF'):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model).eval()
    return accelerator.prepare_model(model, evaluation_mode=True)


def reshard_reference(model: torch.nn.Module) -> None:
    """Free the gathered parameters FSDP2 keeps after a no-grad forward of its root unit (it frees them only after
    a backward, which a reference never runs), so the reference holds 1/world of its weights between steps and a
    sync writes the sharded parameters, not a stale gathered copy."""
    for module in model.modules():
        if _is_fsdp2_unit(module):
            module.reshard()

