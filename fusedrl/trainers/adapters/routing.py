"""Per-row adapter routing for a PEFT LoRA model: the reversible hook that swaps each LoRA ``Linear.forward`` for
``fusedrl.multi_lora_linear`` while several adapters train together (joint mode, ``adapters/joint.py``).

PEFT runs one set of active adapters for a whole batch, and refuses its per-row ``adapter_names`` batches in training
mode. The router replaces the forward of every LoRA ``Linear`` of the model by one that reads a *route*:

- ``("rows", ids_R)``: row r of the batch goes through adapter ``names[ids_R[r]]`` (one forward, one backward, each
  adapter's gradient from its own rows only): the joint training forward;
- ``("one", name)``: every row through adapter ``name`` (any adapter of the model, trained or not), or through the
  bare base for ``None``: reference passes, generation, evaluation of one adapter.

Routes stack (:meth:`AdapterRouter.use`, :meth:`AdapterRouter.rows`); a forward reads the top one. The rows of a
training forward are also kept after their block closes (:attr:`AdapterRouter.train_rows`) because gradient
checkpointing re-runs that forward inside ``backward()``, after ``compute_loss`` returned; the trainer clears them
when the step ends. A forward with no route raises: in joint mode no forward may silently mix adapters.

Install with :meth:`install`, undo with :meth:`remove` (the original bound forwards come back, nothing else was
changed); ``peft_model.fusedrl_router`` points at the installed router, which ``fusedrl.use_adapter`` delegates to.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from fusedrl.ops.multi_lora import multi_lora_linear

ROUTER_ATTRIBUTE = "fusedrl_router"


def lora_linear_layers(peft_model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every PEFT LoRA ``Linear`` of the model."""
    from peft.tuners.lora.layer import Linear

    return [module for module in peft_model.modules() if isinstance(module, Linear)]


def check_routable(peft_model: torch.nn.Module, names: Sequence[str]) -> None:
    """Refuse adapters whose forward ``multi_lora_linear`` does not compute (it is plain LoRA with dropout 0)."""
    from peft.tuners.lora.layer import Linear, LoraLayer

    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        present = [name for name in names if name in module.lora_A]
        if not present:
            continue
        where = f"{module_name} ({type(module).__name__})"
        if not isinstance(module, Linear) or getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"model_adapter_name: training several adapters together routes LoRA Linear layers only; "
                             f"{where} is not one. Restrict target_modules to nn.Linear projections")
        if not isinstance(module.base_layer, torch.nn.Linear):
            raise TypeError(f"model_adapter_name: the base layer of {where} is {type(module.base_layer).__name__}, "
                             "not nn.Linear (quantized bases are not routed); train the adapters one at a time")
        for name in present:
            if name in module.lora_variant:
                raise ValueError(f"model_adapter_name: adapter {name!r} uses a LoRA variant (DoRA...) at {where}; "
                                 "several adapters train together as plain LoRA only (use_dora=False)")
            dropout = module.lora_dropout[name]
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                raise ValueError(f"model_adapter_name: adapter {name!r} has lora_dropout={dropout.p} at {where}; "
                                 "rows routed through multi_lora_linear take no dropout, set lora_dropout=0")
            if module.merged:
                raise ValueError(f"model_adapter_name: {where} has merged adapters; unmerge them first")


class AdapterRouter:
    """Routes the rows of a PEFT model's forwards through the adapters ``names`` (see the module docstring)."""

    def __init__(self, peft_model: torch.nn.Module, names: Sequence[str]) -> None:
        self.peft_model = peft_model
        self.names = tuple(names)
        self._routes: list[tuple[str, object]] = []
        self.train_rows: torch.Tensor | None = None
        self._originals: dict[torch.nn.Module, object] = {}

    # --- routes ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Every row through adapter ``name`` (None: the bare base) inside the block."""
        if name is not None and name not in self.peft_model.peft_config:
            raise ValueError(f"adapter {name!r} is not in the model; its adapters: {sorted(self.peft_model.peft_config)}")
        self._routes.append(("one", name))
        try:
            yield
        finally:
            self._routes.pop()

    @contextlib.contextmanager
    def rows(self, adapter_ids_R: torch.Tensor, *, keep_for_backward: bool) -> Iterator[None]:
        """Row r through adapter ``names[adapter_ids_R[r]]`` inside the block; ``keep_for_backward`` keeps the ids for
        the checkpoint recompute of this forward in ``backward()`` (until :meth:`clear_train_rows`)."""
        self._routes.append(("rows", adapter_ids_R))
        if keep_for_backward:
            self.train_rows = adapter_ids_R
        try:
            yield
        finally:
            self._routes.pop()

    def clear_train_rows(self) -> None:
        self.train_rows = None

    def top(self) -> tuple[str, object] | None:
        """The route a forward would take now (None: none)."""
        if self._routes:
            return self._routes[-1]
        return None if self.train_rows is None else ("rows", self.train_rows)

    # --- hook -----------------------------------------------------------------------------------------------------

    def install(self) -> None:
        if self._originals:
            return
        check_routable(self.peft_model, self.names)
        for layer in lora_linear_layers(self.peft_model):
            self._originals[layer] = layer.__dict__.get("forward")
            layer.forward = types.MethodType(_routed_forward, layer)
            layer._fusedrl_router = self
        setattr(self.peft_model, ROUTER_ATTRIBUTE, self)

    def remove(self) -> None:
        for layer, original in self._originals.items():
            del layer.forward
            if original is not None:
                layer.forward = original
            del layer._fusedrl_router
        self._originals.clear()
        if getattr(self.peft_model, ROUTER_ATTRIBUTE, None) is self:
            delattr(self.peft_model, ROUTER_ATTRIBUTE)

    @property
    def installed(self) -> bool:
        return bool(self._originals)


def _stacked_adapters(layer, names: Sequence[str]):
    """``(lora_A [K, r, I], lora_B [K, O, r], scaling [K], local index per name or -1)`` of the adapters of ``names``
    this layer has; smaller ranks are zero-padded to the largest (the padded rank adds exact zeros)."""
    present = [name for name in names if name in layer.lora_A]
    rank = max(layer.lora_A[name].weight.shape[0] for name in present)
    lora_A = [F.pad(layer.lora_A[name].weight, (0, 0, 0, rank - layer.lora_A[name].weight.shape[0]))
              for name in present]
    lora_B = [F.pad(layer.lora_B[name].weight, (0, rank - layer.lora_B[name].weight.shape[1])) for name in present]
    scaling = [float(layer.scaling[name]) for name in present]
    local = [present.index(name) if name in present else -1 for name in names]
    return torch.stack(lora_A), torch.stack(lora_B), scaling, local


def _routed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # `self` is the PEFT LoRA Linear; bound per instance by AdapterRouter.install.
    router: AdapterRouter = self._fusedrl_router
    if kwargs.get("adapter_names") is not None:
        raise ValueError("adapter_names (PEFT's mixed batches) cannot be combined with fusedrl's adapter routing; "
                         "route rows with the trainer's joint mode or fusedrl.use_adapter")
    base = self.base_layer
    if self.disable_adapters:
        return base(x)
    route = router.top()
    if route is None:
        raise RuntimeError("a forward of a model training several adapters ran with no adapter selected; wrap it in "
                           "fusedrl.use_adapter(model, name) (None: the base model)")
    kind, value = route
    if kind == "one":
        if value is None or value not in self.lora_A:
            return base(x)  # the bare base, or an adapter that does not adapt this layer
        names, ids = (value,), torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    else:
        if value.shape[0] != x.shape[0]:
            raise RuntimeError(f"adapter routing is set for {value.shape[0]} rows but the forward has {x.shape[0]}: "
                               "a forward between a joint training forward and its backward needs fusedrl.use_adapter")
        names = router.names
        ids = value.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    lora_A, lora_B, scaling, local = _stacked_adapters(self, names)
    if kind == "rows" and -1 in local:  # an adapter that does not adapt this layer: its rows take the base only
        ids = torch.tensor(local + [-1], device=x.device)[ids]
    scaling_K = torch.tensor(scaling, dtype=torch.float32, device=x.device)
    bias = None if base.bias is None else base.bias.detach()
    return multi_lora_linear(x, base.weight.detach(), bias, lora_A, lora_B, scaling_K, ids)
