"""PEFT models with several named LoRA adapters. For the named-adapter tests (tests/trainers/test_named_adapters*.py):
each adapter's weights are drawn (std 0.3, a seed per adapter: the same model on every call), so every adapter
changes the model's outputs and no two adapters agree; ``adapter_copy`` gives the plain-PEFT expectation of a
switch. For the joint-mode tests (tests/trainers/test_joint_*.py): :func:`lora_adapters`."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tests.helpers.data import LORA


def named_adapter_model(base: torch.nn.Module, names=("policy", "anchor"), *, seed: int = 0) -> PeftModel:
    """``base`` wrapped by PEFT with LoRA adapters ``names`` (``tests.helpers.data.LORA``), the first one active."""
    model = get_peft_model(base, LoraConfig(**LORA), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**LORA))
    with torch.no_grad():
        for index, name in enumerate(names):
            generator = torch.Generator().manual_seed(seed * 100 + index)
            for param_name, param in model.named_parameters():
                if f".{name}." in param_name:  # lora_A too: PEFT draws it from the global generator
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def lora_adapters(base: torch.nn.Module, names, config: LoraConfig) -> PeftModel:
    """``base`` with LoRA adapters ``names`` (each ``config``, the first active), lora_A as PEFT draws it after seed
    1 and lora_B from N(0, 0.05), non-zero so that every adapter changes the model; the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = get_peft_model(base, config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config)
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.data.normal_(0, 0.05)
    return model


def adapter_state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Copies of the parameters of adapter ``name`` (``...lora_A.<name>.weight``, ...)."""
    return {key: param.detach().clone() for key, param in model.named_parameters() if f".{name}." in key}


def adapter_copy(model: PeftModel, name: str | None) -> torch.nn.Module:
    """A deep copy of ``model`` switched the plain PEFT way: ``set_adapter(name)``, or its base model for None."""
    clone = copy.deepcopy(model)
    if name is None:
        return clone.unload()  # the LoRA layers removed, nothing merged: the bare base
    clone.set_adapter(name)
    return clone
