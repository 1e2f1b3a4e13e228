"""Every backend of `logprobs` and `linear_logprobs` against the fp32 reference: values and every gradient.

Triton runs under TRITON_INTERPRET=1 (set in conftest), ~600x slower than torch, so its shapes are smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import fusedrl
from fusedrl.ops.logprobs.reference import linear_token_logprobs_reference, token_logprobs_reference
from tests.utils import assert_close

FAST_BACKENDS = ("compiled", "triton")


@dataclass(frozen=True)
class Case:
    name: str
    lead: tuple[int, ...]  # leading dims of labels
    vocab: int
    dtype: torch.dtype = torch.float32
    temperature: float = 1.0
    ignored: float = 0.0  # fraction of labels set to ignore_index
    extreme: bool = False  # +-1e4 logits and -inf entries

    def __str__(self) -> str:
        return self.name


def _cases(big: bool) -> list[Case]:
    realistic = Case("realistic", (2, 128) if big else (2, 8), 4096 if big else 512)
    return [
        realistic,
        Case("awkward", (3, 47) if big else (3, 5), 1237),
        Case("ignored", (2, 33) if big else (2, 6), 1237, ignored=0.4),
        Case("temperature", (2, 16) if big else (2, 4), 777, temperature=0.7),
        Case("bf16", (2, 64) if big else (2, 6), 1237, dtype=torch.bfloat16),
        Case("fp16", (2, 16) if big else (2, 4), 777, dtype=torch.float16),
        Case("extreme", (2, 16) if big else (2, 4), 777, extreme=True),
    ]


def _backend_cases():
    return [pytest.param(b, c, id=f"{b}-{c}") for b in FAST_BACKENDS for c in _cases(big=b == "compiled")]


def _labels(case: Case) -> torch.Tensor:
    labels = torch.randint(0, case.vocab, case.lead)
    if case.ignored:
        labels[torch.rand(case.lead) < case.ignored] = -100
        labels.view(-1, case.lead[-1])[0] = -100  # one fully ignored sequence
    return labels


def _logits(case: Case, labels: torch.Tensor) -> torch.Tensor:
    logits = torch.randn(*case.lead, case.vocab) * 3
    if case.extreme:
        logits[..., 0] = 1e4
        logits[..., 1] = -1e4
        logits[..., 2] = float("-inf")
        logits.view(-1, case.vocab)[0, : case.vocab // 2] = 1e4  # a row with many tied huge logits
        labels.clamp_(min=3)  # a label on a -inf logit would make log p = -inf: not finite math
    return logits.to(case.dtype)


@pytest.mark.parametrize("backend,case", _backend_cases())
def test_token_logprobs_and_entropy(backend: str, case: Case):
    labels = _labels(case)
    logits = _logits(case, labels)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    with fusedrl.use_kernels(logprobs=backend):
        logprobs, entropy = fusedrl.token_logprobs_and_entropy(ours_in, labels, temperature=case.temperature)
    ref_logprobs, ref_entropy = token_logprobs_reference(
        ref_in, labels, temperature=case.temperature, with_entropy=True
    )
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.shape == entropy.shape == labels.shape
    assert_close(logprobs, ref_logprobs, name="logprobs")
    assert_close(entropy, ref_entropy, name="entropy")
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()

    g_logprobs, g_entropy = torch.randn_like(ref_logprobs), torch.randn_like(ref_entropy)
    (logprobs * g_logprobs + entropy * g_entropy).sum().backward()
    (ref_logprobs * g_logprobs + ref_entropy * g_entropy).sum().backward()
    assert ours_in.grad.dtype == case.dtype
    assert_close(ours_in.grad, ref_in.grad, dtype=case.dtype, name="grad logits")
    ignored = labels == -100
    assert (ours_in.grad[ignored] == 0).all() and (logprobs[ignored] == 0).all()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_token_logprobs_without_entropy(backend: str):
    labels = torch.randint(0, 300, (3, 7))
    logits = torch.randn(3, 7, 300)
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    with fusedrl.use_kernels(logprobs=backend):
        logprobs = fusedrl.token_logprobs(ours_in, labels, temperature=1.3)
    ref_logprobs, _ = token_logprobs_reference(ref_in, labels, temperature=1.3)
    assert_close(logprobs, ref_logprobs, name="logprobs")
    g = torch.randn_like(logprobs)
    (logprobs * g).sum().backward()
    (ref_logprobs * g).sum().backward()
    assert_close(ours_in.grad, ref_in.grad, name="grad logits")


def _linear_inputs(case: Case, hidden_size: int, with_bias: bool):
    labels = _labels(case)
    hidden = torch.randn(*case.lead, hidden_size)
    weight = torch.randn(case.vocab, hidden_size) / hidden_size**0.5 * 3
    if case.extreme:
        hidden = hidden * 1e3  # logits of order 1e4 and beyond
    bias = torch.randn(case.vocab) if with_bias else None
    leaves = [t.to(case.dtype) for t in (hidden, weight) + ((bias,) if with_bias else ())]
    return labels, leaves


@pytest.mark.parametrize("backend,case", _backend_cases())
@pytest.mark.parametrize("with_entropy", [True, False], ids=["entropy", "logprobs"])
def test_linear_token_logprobs(backend: str, case: Case, with_entropy: bool):
    with_bias = case.name in ("awkward", "temperature")
    hidden_size = 64 if backend == "compiled" else 32
    labels, leaves = _linear_inputs(case, hidden_size, with_bias)
    ours = [t.clone().requires_grad_() for t in leaves]
    refs = [t.clone().requires_grad_() for t in leaves]

    def call(fn, tensors, **kw):
        bias = tensors[2] if with_bias else None
        return fn(tensors[0], tensors[1], labels, bias=bias, temperature=case.temperature, with_entropy=with_entropy,
                  **kw)

    with fusedrl.use_kernels(linear_logprobs=backend):
        out = call(fusedrl.linear_token_logprobs, ours)
    ref_logprobs, ref_entropy = call(linear_token_logprobs_reference, refs)
    logprobs = out.logprobs if with_entropy else out
    # bf16 hidden @ weight rounds the logits to bf16 while the reference multiplies in fp32.
    assert_close(logprobs, ref_logprobs, dtype=case.dtype, name="logprobs")
    g_logprobs = torch.randn_like(ref_logprobs)
    loss = (logprobs * g_logprobs).sum()
    ref_loss = (ref_logprobs * g_logprobs).sum()
    if with_entropy:
        assert_close(out.entropy, ref_entropy, dtype=case.dtype, name="entropy")
        g_entropy = torch.randn_like(ref_entropy)
        loss = loss + (out.entropy * g_entropy).sum()
        ref_loss = ref_loss + (ref_entropy * g_entropy).sum()
    loss.backward()
    ref_loss.backward()
    # Extreme case: hidden ~1e3 makes weight gradients ~1e3 summed over tokens in another order than the
    # reference: fp32 rounding alone gives relative differences up to ~3e-5 there.
    fp32_rtol = 1e-4 if case.extreme else 1e-5
    for name, ours_t, ref_t in zip(("hidden", "weight", "bias"), ours, refs):
        assert ours_t.grad.dtype == case.dtype
        assert_close(ours_t.grad, ref_t.grad, dtype=case.dtype, name=f"grad {name}", rtol=fp32_rtol)


@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_all_ignored_gives_zeros_and_zero_grads(backend: str):
    labels = torch.full((2, 5), -100)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    logits = torch.randn(2, 5, 40, requires_grad=True)
    with fusedrl.use_kernels(all=backend):
        out = fusedrl.linear_token_logprobs(hidden, weight, labels, with_entropy=True)
        logprobs, entropy = fusedrl.token_logprobs_and_entropy(logits, labels)
    (out.logprobs.sum() + out.entropy.sum() + logprobs.sum() + entropy.sum()).backward()
    for t in (out.logprobs, out.entropy, logprobs, entropy, hidden.grad, weight.grad, logits.grad):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradient_only_where_needed(backend: str):
    """A frozen LM head (LoRA training) gets no weight gradient, and hidden still gets the right one."""
    labels = torch.randint(0, 50, (6,))
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(50, 8)
    with fusedrl.use_kernels(linear_logprobs=backend):
        fusedrl.linear_token_logprobs(hidden, weight, labels).sum().backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    linear_token_logprobs_reference(ref_hidden, weight, labels)[0].sum().backward()
    assert weight.grad is None
    assert_close(hidden.grad, ref_hidden.grad, name="grad hidden")


def test_compiled_backend_is_deterministic():
    labels = torch.randint(0, 1237, (64,))
    hidden, weight = torch.randn(64, 32), torch.randn(1237, 32)
    runs = []
    for _ in range(2):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with fusedrl.use_kernels(linear_logprobs="compiled"):
            out = fusedrl.linear_token_logprobs(h, w, labels, with_entropy=True)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        runs.append((out.logprobs, out.entropy, h.grad, w.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Soft-capped head (Gemma 2's final_logit_softcapping): c * tanh(z / c) of the head's output, before the temperature

SOFTCAP = 2.0  # against logits of std ~3 (_linear_inputs): most entries sit on tanh's curved part or saturate


@pytest.mark.parametrize("backend,case", _backend_cases())
def test_linear_token_logprobs_soft_capped(backend: str, case: Case):
    """Log-probs, entropy and the hidden / weight / bias gradients of the capped head against the fp32 reference
    (full logits, ``soft_cap``, log-softmax); the extreme case (hidden x 1e3, logits ~1e4) saturates the cap, where
    tanh' is 0 in fp32: everything stays finite and those entries get exactly no gradient."""
    with_bias = case.name in ("awkward", "temperature", "extreme")
    hidden_size = 64 if backend == "compiled" else 32
    labels, leaves = _linear_inputs(case, hidden_size, with_bias)
    ours = [t.clone().requires_grad_() for t in leaves]
    refs = [t.clone().requires_grad_() for t in leaves]

    def call(fn, tensors):
        return fn(tensors[0], tensors[1], labels, bias=tensors[2] if with_bias else None,
                  temperature=case.temperature, with_entropy=True, softcap=SOFTCAP)

    with fusedrl.use_kernels(linear_logprobs=backend):
        out = call(fusedrl.linear_token_logprobs, ours)
    ref_logprobs, ref_entropy = call(linear_token_logprobs_reference, refs)
    assert_close(out.logprobs, ref_logprobs, dtype=case.dtype, name="logprobs")
    assert_close(out.entropy, ref_entropy, dtype=case.dtype, name="entropy")
    # Capped logits lie in [-c, c]: a log-prob is at least -2c / T - log V.
    labelled = labels != -100
    assert (out.logprobs[labelled] >= -2 * SOFTCAP / case.temperature - math.log(case.vocab) - 1e-3).all()
    g_logprobs, g_entropy = torch.randn_like(ref_logprobs), torch.randn_like(ref_entropy)
    ((out.logprobs * g_logprobs).sum() + (out.entropy * g_entropy).sum()).backward()
    ((ref_logprobs * g_logprobs).sum() + (ref_entropy * g_entropy).sum()).backward()
    for name, ours_t, ref_t in zip(("hidden", "weight", "bias"), ours, refs):
        assert torch.isfinite(ours_t.grad).all(), name
        # Extreme case: weight gradients summed over tokens of hidden ~1e3 in another order, as the uncapped test.
        assert_close(ours_t.grad, ref_t.grad, dtype=case.dtype, name=f"grad {name}",
                     rtol=1e-4 if case.extreme else None)


@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_soft_capped_head_at_1e4_hidden_scale(backend: str):
    """hidden x 1e4 puts the head's output near 1e5: the capped logits are +-c (finite), log-probs finite and >= -2c
    - log V, and the gradients finite (the saturated entries' tanh' = 1 - 1^2 = 0 in fp32, so next to no gradient
    reaches hidden and weight: what the fp32 reference gives too)."""
    labels = torch.randint(0, 300, (2, 7))
    labels[0, :2] = -100
    hidden = (torch.randn(2, 7, 16) * 1e4).requires_grad_()
    weight = torch.randn(300, 16).requires_grad_()
    with fusedrl.use_kernels(linear_logprobs=backend):
        out = fusedrl.linear_token_logprobs(hidden, weight, labels, with_entropy=True, softcap=SOFTCAP)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    ref_hidden, ref_weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref_logprobs, ref_entropy = linear_token_logprobs_reference(ref_hidden, ref_weight, labels, with_entropy=True,
                                                                softcap=SOFTCAP)
    (ref_logprobs.sum() + ref_entropy.sum()).backward()
    for t in (out.logprobs, out.entropy, hidden.grad, weight.grad):
        assert torch.isfinite(t).all()
    assert (out.logprobs >= -2 * SOFTCAP - math.log(300) - 1e-3).all()
    assert_close(out.logprobs, ref_logprobs, name="logprobs")
    assert_close(out.entropy, ref_entropy, name="entropy")
    assert_close(hidden.grad, ref_hidden.grad, name="grad hidden", atol=1e-4)
    assert_close(weight.grad, ref_weight.grad, name="grad weight", rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_soft_cap_off_is_the_plain_head_bitwise(backend: str):
    """softcap None and 0 run the uncapped kernels: log-probs, entropy and gradients bitwise equal; a cap changes
    them (so the option reaches the kernels)."""
    labels = torch.randint(0, 300, (3, 7))
    hidden, weight = torch.randn(3, 7, 16), torch.randn(300, 16) * 0.5
    runs = {}
    for softcap in (None, 0, 0.0, 1.5):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with fusedrl.use_kernels(linear_logprobs=backend):
            out = fusedrl.linear_token_logprobs(h, w, labels, with_entropy=True, softcap=softcap)
        (out.logprobs.sum() + 0.5 * out.entropy.sum()).backward()
        runs[softcap] = (out.logprobs, out.entropy, h.grad, w.grad)
    for softcap in (0, 0.0):
        assert all(torch.equal(a, b) for a, b in zip(runs[None], runs[softcap]))
    assert not torch.allclose(runs[None][0], runs[1.5][0])


@pytest.mark.parametrize("softcap", [-1.0, float("nan"), float("inf"), "30"])
def test_bad_soft_cap_names_the_argument(softcap):
    with pytest.raises(ValueError, match="softcap must be"):
        fusedrl.linear_token_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), softcap=softcap)
