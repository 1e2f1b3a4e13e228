"""Reference-model synchronisation of TR-DPO (https://arxiv.org/abs/2404.09656).

Every ``sync_steps`` optimizer steps the reference moves toward the policy::

    ref <- alpha * policy + (1 - alpha) * ref        (alpha = 1.0 is a hard copy, done with copy_ so it is exact)

Parameters are paired by name, never by position, so a model whose parameter order differs fails loudly instead of
mixing the wrong tensors. Buffers are not mixed (nor are they in TRL); Llama-family models have none that train.

Distributed storage goes through one hook, ``gather(sources, targets)``: a context manager that yields the tensors to
update, ``(source_views, target_views)``, or None when this process does not write; whatever it must do to make the
writes stick (broadcast, re-shard) it does on exit. The default, :func:`default_gather`, handles

- plain tensors: yields them as they are;
- DeepSpeed ZeRO-3 partitioned parameters (``deepspeed.zero.GatheredParameters``; imported only when a parameter
  carries ``ds_id``, so deepspeed stays optional): a partitioned reference is written by rank 0 and DeepSpeed
  re-partitions it on exit, a replicated reference is written by every rank;
- FSDP2 ``DTensor`` parameters: nothing to gather when policy and reference are sharded alike, the element-wise
  update runs shard by shard (:func:`mix_into_`), after every FSDP2 unit of both is put back to its shards (a unit
  left gathered by its last forward would take the writes in a copy that its next reshard drops); a DTensor policy
  with a plain reference is read with ``full_tensor()``.

A trainer can pass its own ``gather`` (FSDP2 with differing meshes, a ZeRO-3 variant gathering in larger groups)
without touching the callback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from transformers import TrainerCallback

Views = tuple[list[torch.Tensor], list[torch.Tensor]]
GatherFn = Callable[[list[torch.Tensor], list[torch.Tensor]], contextlib.AbstractContextManager[Views | None]]


def _is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def default_gather(sources: list[torch.Tensor], targets: list[torch.Tensor]) -> Iterator[Views | None]:
    """Yields ``(sources, targets)`` as full tensors, or None on a process that must not write."""
    if not any(_is_zero3_partitioned(p) for p in (*sources, *targets)):
        yield sources, targets
        return
    import deepspeed  # a ZeRO-3 parameter exists, so deepspeed is installed

    # Sources are only read (modifier_rank=None: no broadcast back). Partitioned targets: rank 0's write is broadcast
    # and re-partitioned on exit, so only rank 0 writes. A replicated (unpartitioned) target, e.g. a reference kept
    # outside DeepSpeed, is a copy per rank: every rank writes its own. GatheredParameters skips plain tensors.
    with (
        deepspeed.zero.GatheredParameters(sources, modifier_rank=None),
        deepspeed.zero.GatheredParameters(targets, modifier_rank=0),
    ):
        writes = deepspeed.comm.get_rank() == 0 or not any(_is_zero3_partitioned(p) for p in targets)
        yield (sources, targets) if writes else None


def _operand(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``source`` in the layout of ``target`` for an element-wise update."""
    from torch.distributed.tensor import DTensor

    source_dt, target_dt = isinstance(source, DTensor), isinstance(target, DTensor)
    if source_dt and not target_dt:
        source = source.full_tensor()
    elif target_dt and not source_dt:
        raise ValueError(
            "the reference is sharded (DTensor) but the policy is not; pass a `gather` hook that yields matching views"
        )
    elif source_dt and (source.device_mesh != target.device_mesh or source.placements != target.placements):
        raise ValueError(
            f"policy and reference are sharded differently ({source.placements} vs {target.placements}); "
            "pass a `gather` hook that yields matching views"
        )
    return source.to(device=target.device)


@torch.no_grad()
def mix_into_(target: torch.Tensor, source: torch.Tensor, alpha: float) -> None:
    """``target <- alpha * source + (1 - alpha) * target`` in place.

    alpha == 1 is ``copy_`` (bitwise exact, and a NaN in the old target does not survive). Low-precision targets are
    mixed in fp32 and rounded once: in bf16, ``mul_`` then ``add_`` rounds twice (8 mantissa bits each), and with the
    small alphas of EMA-style syncing (0.01) the update can round away entirely.
    """
    source = _operand(source, target)
    if alpha == 1.0:
        target.copy_(source)
    elif target.dtype == torch.float32 or target.dtype == torch.float64:
        target.mul_(1.0 - alpha).add_(source.to(target.dtype), alpha=alpha)
    else:
        target.copy_(target.float().mul_(1.0 - alpha).add_(source.float(), alpha=alpha))


def _unwrap(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    while True:  # DDP / DataParallel (.module), torch.compile (._orig_mod)
        for attribute in ("module", "_orig_mod"):
            inner = getattr(model, attribute, None)
            if isinstance(inner, torch.nn.Module):
                model = inner
                break
        else:
            return model


def _active_adapter(model: torch.nn.Module) -> str:
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise ValueError(f"the policy has {len(active)} active adapters; pass policy_adapter= to choose one")
        active = active[0]
    if not isinstance(active, str):
        raise TypeError("a reference adapter name needs a PEFT policy (a model with an active adapter)")
    return active


def _reshard_fsdp2(model: torch.nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back to its shards. A unit that does not reshard after its forward (the root
    unit never does) keeps plain gathered tensors as its parameters after a no-grad forward, and a write into those
    is lost when the unit reshards (a checkpoint's ``state_dict`` does): on 2 processes, TR-DPO's reference head then
    fell back to its pre-sync values after a save at step 2 (loss off by 2e-4 at step 3). Writing into the shards,
    the next forward gathers the synced values. A no-op without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def adapter_pairs(
    model: torch.nn.Module, policy_adapter: str, ref_adapter: str
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, policy_param, ref_param)`` for every parameter of adapter ``policy_adapter`` of a PEFT model.

    PEFT names adapter parameters ``...lora_A.<adapter>.weight`` (and ``modules_to_save.<adapter>.weight``), so the
    reference counterpart is the same name with the adapter component swapped.
    """
    if policy_adapter == ref_adapter:
        raise ValueError(f"the reference adapter {ref_adapter!r} is the policy adapter itself")
    params = dict(model.named_parameters())
    pairs = []
    for name, param in params.items():
        parts = name.split(".")
        if policy_adapter not in parts:
            continue
        ref_name = ".".join(ref_adapter if part == policy_adapter else part for part in parts)
        if ref_name not in params:
            raise ValueError(f"reference adapter {ref_adapter!r} has no parameter {ref_name!r} (policy has {name!r})")
        pairs.append((name, param, params[ref_name]))
    if not pairs:
        raise ValueError(f"no parameters of adapter {policy_adapter!r} found on the policy")
    return pairs


def module_pairs(policy: torch.nn.Module, ref: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, policy_param, ref_param)`` for every parameter; both models must have the same parameter names."""
    if policy is ref:
        raise ValueError("the reference model is the policy itself; pass a separate copy (or a reference adapter name)")
    policy_params, ref_params = dict(policy.named_parameters()), dict(ref.named_parameters())
    if policy_params.keys() != ref_params.keys():
        only_policy = sorted(policy_params.keys() - ref_params.keys())[:3]
        only_ref = sorted(ref_params.keys() - policy_params.keys())[:3]
        raise ValueError(
            f"policy and reference parameter names differ (only in policy: {only_policy}, only in reference: "
            f"{only_ref}); for a PEFT policy whose reference is an adapter, pass the adapter's name as ref_model"
        )
    return [(name, param, ref_params[name]) for name, param in policy_params.items()]


class SyncRefModelCallback(TrainerCallback):
    """Moves the reference toward the policy every ``sync_steps`` optimizer steps (TR-DPO), at ``on_step_end``.

    Args:
        ref_model: a separate reference model with the policy's parameter names, or the name of a PEFT adapter on the
            policy that serves as the reference (the policy is its active adapter, or ``policy_adapter``).
        accelerator: used to unwrap the trained model; without it DDP/compile wrappers are peeled off by attribute.
        sync_steps: defaults to ``args.ref_model_sync_steps`` (TRL's DPOConfig name, 512 there).
        alpha: defaults to ``args.ref_model_mixup_alpha`` (TRL's DPOConfig name, 0.6 there).
        gather: the distributed-storage hook (see the module docstring); :func:`default_gather` if None.
    """

    def __init__(
        self,
        ref_model: torch.nn.Module | str,
        accelerator=None,
        *,
        policy_adapter: str | None = None,
        sync_steps: int | None = None,
        alpha: float | None = None,
        gather: GatherFn | None = None,
    ):
        if not isinstance(ref_model, (torch.nn.Module, str)):
            raise TypeError(f"ref_model must be a module or a PEFT adapter name, not {type(ref_model).__name__}")
        self.ref_model = ref_model
        self.accelerator = accelerator
        self.policy_adapter = policy_adapter
        self.sync_steps = sync_steps
        self.alpha = alpha
        self.gather = gather or default_gather
        self.num_syncs = 0

    def _settings(self, args) -> tuple[int, float]:
        sync_steps = self.sync_steps if self.sync_steps is not None else getattr(args, "ref_model_sync_steps", None)
        alpha = self.alpha if self.alpha is not None else getattr(args, "ref_model_mixup_alpha", None)
        if sync_steps is None or alpha is None:
            raise ValueError(
                "SyncRefModelCallback needs sync_steps and alpha: pass them, or use training arguments with "
                "ref_model_sync_steps and ref_model_mixup_alpha"
            )
        if not (isinstance(sync_steps, int) and sync_steps >= 1):
            raise ValueError(f"sync_steps must be a positive int, got {sync_steps!r}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        return sync_steps, float(alpha)

    def on_train_begin(self, args, state, control, **kwargs):
        self._settings(args)  # fail at the start of training, not after `sync_steps` steps

    def pairs(self, model: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """The ``(name, policy_param, ref_param)`` pairs a sync updates."""
        policy = _unwrap(model, self.accelerator)
        if isinstance(self.ref_model, str):
            return adapter_pairs(policy, self.policy_adapter or _active_adapter(policy), self.ref_model)
        return module_pairs(policy, _unwrap(self.ref_model, self.accelerator))

    @torch.no_grad()
    def sync(self, model: torch.nn.Module, alpha: float) -> None:
        """One update of the reference from ``model`` (the policy). Every process must call it (gathers are
        collective)."""
        _reshard_fsdp2(_unwrap(model, self.accelerator))
        if isinstance(self.ref_model, torch.nn.Module):
            _reshard_fsdp2(_unwrap(self.ref_model, self.accelerator))
        for name, policy_param, ref_param in self.pairs(model):
            # One pair per gather bounds ZeRO-3's peak to the largest parameter's full size; gathering both models at
            # once (as TRL does) holds two full copies on every GPU, 28 GB for a 7B model in bf16.
            with self.gather([policy_param], [ref_param]) as views:
                if views is None:  # another process writes this pair
                    continue
                (source,), (target,) = views
                if source.shape != target.shape:  # checked gathered: ZeRO-3 shards are shape (0,) outside
                    raise ValueError(f"{name}: policy shape {tuple(source.shape)} != reference {tuple(target.shape)}")
                mix_into_(target, source, alpha)
        self.num_syncs += 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        sync_steps, alpha = self._settings(args)
        if state.global_step % sync_steps == 0:
            if model is None:
                raise ValueError("SyncRefModelCallback.on_step_end needs the trained model (model=...)")
            self.sync(model, alpha)
