"""The reversible hook that routes each row of a PEFT LoRA model through its own adapter
(fusedrl/trainers/adapters/routing.py): values and gradients equal PEFT's one-adapter forwards row by row, on every
backend of multi_lora_linear; routes stack; install / remove leave PEFT untouched."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fusedrl
from fusedrl.trainers.adapters.routing import AdapterRouter
from tests.helpers.models import tiny_llama

NAMES = ("p0", "p1", "p2")


def lora_model(**overrides) -> torch.nn.Module:
    """Three adapters; p1 of another rank, p2 adapting q_proj only (its rows take the base at v_proj)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         **overrides), adapter_name="p0")
        model.add_adapter("p1", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], **overrides))
        model.add_adapter("p2", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], **overrides))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)
    return model


def peft_logits(model, name, input_ids):
    """Logits of ``input_ids`` with adapter ``name`` active (None: the base), and the adapters' gradients of their sum."""
    model.zero_grad()
    if name is None:
        with model.disable_adapter():
            logits = model(input_ids=input_ids).logits
    else:
        model.base_model.set_adapter(list(NAMES))  # every adapter trainable...
        model.base_model.set_adapter(name)  # ...then only `name` active (set_adapter also freezes the others)
        for key, param in model.named_parameters():
            if "lora_" in key:
                param.requires_grad_(True)
        logits = model(input_ids=input_ids).logits
    if logits.requires_grad:  # the base alone has nothing trainable
        logits.square().sum().backward()
    return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
def test_rows_routed_through_their_own_adapter_equal_peft_per_adapter(backend):
    model = lora_model()
    input_ids = torch.randint(3, 100, (4, 7), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([2, 0, 1, 0])
    expected_logits, expected_grads = [], {}
    for row, k in enumerate(ids.tolist()):
        logits, grads = peft_logits(model, NAMES[k], input_ids[row:row + 1])
        expected_logits.append(logits)
        for key, grad in grads.items():
            expected_grads[key] = expected_grads.get(key, 0) + grad
    for key, param in model.named_parameters():
        param.requires_grad_("lora_" in key)
    model.zero_grad()
    router = AdapterRouter(model, NAMES)
    router.install()
    try:
        with fusedrl.use_kernels(multi_lora=backend), router.rows(ids, keep_for_backward=False):
            logits = model(input_ids=input_ids).logits
        logits.square().sum().backward()
    finally:
        router.remove()
    torch.testing.assert_close(logits, torch.cat(expected_logits), rtol=1e-5, atol=1e-5)
    for key, grad in expected_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[key].grad, grad, rtol=1e-4, atol=1e-5)


def test_one_adapter_routes_stack_and_the_base_route():
    model = lora_model()
    input_ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = {name: peft_logits(model, name, input_ids)[0] for name in (None, "p1", "p2")}
    router = AdapterRouter(model, NAMES)
    router.install()
    try:
        with torch.no_grad(), router.rows(torch.tensor([0, 0]), keep_for_backward=False):
            with router.use("p1"):
                torch.testing.assert_close(model(input_ids=input_ids).logits, expected["p1"], rtol=1e-5, atol=1e-5)
                with router.use(None):
                    torch.testing.assert_close(model(input_ids=input_ids).logits, expected[None])
            with router.use("p2"):
                torch.testing.assert_close(model(input_ids=input_ids).logits, expected["p2"], rtol=1e-5, atol=1e-5)
            with model.disable_adapter():  # PEFT's own switch still wins
                torch.testing.assert_close(model(input_ids=input_ids).logits, expected[None])
    finally:
        router.remove()


def test_a_forward_without_a_route_or_with_other_rows_raises():
    model = lora_model()
    router = AdapterRouter(model, NAMES)
    router.install()
    try:
        with pytest.raises(RuntimeError, match="no adapter selected"):
            model(input_ids=torch.tensor([[5, 6]]))
        with pytest.raises(RuntimeError, match="routing is set for 3 rows but the forward has 1"), \
                router.rows(torch.tensor([0, 1, 2]), keep_for_backward=True):
            model(input_ids=torch.tensor([[5, 6]]))
        assert router.train_rows is not None  # kept for the backward's recompute
        router.clear_train_rows()
        with pytest.raises(ValueError, match=r"'zz' is not in the model; its adapters: \['p0', 'p1', 'p2'\]"), \
                router.use("zz"):
            pass
    finally:
        router.remove()


def test_install_and_remove_restore_peft_exactly():
    model = lora_model()
    input_ids = torch.tensor([[4, 9, 13]])
    model.set_adapter("p1")
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    router = AdapterRouter(model, NAMES)
    router.install()
    router.install()  # idempotent
    assert model.fusedrl_router is router
    router.remove()
    assert not hasattr(model, "fusedrl_router")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, before, rtol=0, atol=0)


def test_adapters_the_op_cannot_compute_are_refused():
    with pytest.raises(ValueError, match="lora_dropout=0.2"):
        AdapterRouter(lora_model(lora_dropout=0.2), NAMES).install()
    with pytest.raises(ValueError, match="DoRA"):
        AdapterRouter(lora_model(use_dora=True), NAMES).install()
