"""The LM-head ops, GAE and the policy loss on a CUDA device: the Triton and compiled paths against the fp32 reference,
values and every gradient, fp32 and bf16 (fp16 for the head), at realistic shapes (a 32000-row head over 2048
tokens, Qwen's 151936-row vocabulary, 4096-step GAE rows) and awkward ones (vocabulary 32011, hidden 1000, ignored
positions, extreme logits).

tests/ops/ makes the same comparisons at small shapes with Triton under the interpreter; here Triton's compiler and
Inductor build the kernels for this GPU (conftest.py). Every request is explicit (``use_kernels(op=backend)``), so a
Triton kernel that fails to build raises here instead of falling back to ``compiled``. Inputs are drawn on the CPU
(seeded by tests/conftest.py) and moved to the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import fusedrl
from fusedrl.ops.gae.reference import gae_reference
from fusedrl.ops.logprobs.reference import linear_token_logprobs_reference, token_logprobs_reference
from fusedrl.ops.policy.reference import policy_loss_reference
from tests.utils import assert_close

pytestmark = pytest.mark.cuda


@dataclass(frozen=True)
class Case:
    name: str
    lead: tuple[int, ...]  # leading dims of labels
    vocab: int
    hidden: int  # H of the hidden-state op
    dtype: torch.dtype = torch.float32
    temperature: float = 1.0
    ignored: float = 0.0  # fraction of labels set to ignore_index
    extreme: bool = False  # +-1e4 logits and -inf entries (hidden x 1e3 for the hidden-state op)
    bias: bool = False

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("realistic-fp32", (4, 512), 32000, 1024),
    Case("realistic-bf16", (4, 512), 32000, 1024, dtype=torch.bfloat16),
    Case("awkward-ignored", (3, 47), 32011, 1000, temperature=0.7, ignored=0.4, bias=True),
    Case("awkward-bf16", (3, 47), 32011, 1000, dtype=torch.bfloat16, ignored=0.4, bias=True),
    Case("fp16", (2, 64), 32000, 512, dtype=torch.float16),
    Case("qwen-vocab-bf16", (2, 128), 151936, 1024, dtype=torch.bfloat16),
    Case("extreme", (2, 16), 32000, 256, extreme=True),
]


def _labels(case: Case) -> torch.Tensor:
    labels = torch.randint(0, case.vocab, case.lead)
    if case.ignored:
        labels[torch.rand(case.lead) < case.ignored] = -100
        labels.view(-1, case.lead[-1])[0] = -100  # one fully ignored sequence
    if case.extreme:
        labels.clamp_(min=3)  # a label on a -inf logit would make log p = -inf: not finite math
    return labels


def _logits(case: Case) -> torch.Tensor:
    logits = torch.randn(*case.lead, case.vocab) * 3
    if case.extreme:
        logits[..., 0] = 1e4
        logits[..., 1] = -1e4
        logits[..., 2] = float("-inf")
        logits.view(-1, case.vocab)[0, : case.vocab // 2] = 1e4  # a row with many tied huge logits
    return logits.to(case.dtype)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_token_logprobs_and_entropy(device, backend, needs_dtype, case):
    needs_dtype(case.dtype)
    labels = _labels(case).to(device)
    logits = _logits(case).to(device)
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    with fusedrl.use_kernels(logprobs=backend):
        logprobs, entropy = fusedrl.token_logprobs_and_entropy(ours_in, labels, temperature=case.temperature)
    ref_logprobs, ref_entropy = token_logprobs_reference(ref_in, labels, temperature=case.temperature,
                                                         with_entropy=True)
    assert logprobs.dtype == entropy.dtype == torch.float32 and logprobs.shape == labels.shape
    assert_close(logprobs, ref_logprobs, name="logprobs")
    assert_close(entropy, ref_entropy, name="entropy")
    g_logprobs, g_entropy = torch.randn_like(ref_logprobs), torch.randn_like(ref_entropy)
    (logprobs * g_logprobs + entropy * g_entropy).sum().backward()
    (ref_logprobs * g_logprobs + ref_entropy * g_entropy).sum().backward()
    assert ours_in.grad.dtype == case.dtype and torch.isfinite(ours_in.grad).all()
    assert_close(ours_in.grad, ref_in.grad, dtype=case.dtype, name="grad logits")
    ignored = labels == -100
    assert (ours_in.grad[ignored] == 0).all() and (logprobs[ignored] == 0).all()


@pytest.mark.parametrize("with_entropy", [True, False], ids=["entropy", "logprobs"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_linear_token_logprobs(device, backend, needs_dtype, case, with_entropy):
    needs_dtype(case.dtype)
    labels = _labels(case).to(device)
    hidden = torch.randn(*case.lead, case.hidden) * (1e3 if case.extreme else 1.0)  # logits of order 1e4
    weight = torch.randn(case.vocab, case.hidden) / case.hidden**0.5 * 3
    leaves = [hidden, weight] + ([torch.randn(case.vocab)] if case.bias else [])
    leaves = [t.to(device=device, dtype=case.dtype) for t in leaves]
    ours = [t.clone().requires_grad_() for t in leaves]
    refs = [t.clone().requires_grad_() for t in leaves]

    def call(fn, tensors):
        return fn(tensors[0], tensors[1], labels, bias=tensors[2] if case.bias else None,
                  temperature=case.temperature, with_entropy=with_entropy)

    with fusedrl.use_kernels(linear_logprobs=backend):
        out = call(fusedrl.linear_token_logprobs, ours)
    ref_logprobs, ref_entropy = call(linear_token_logprobs_reference, refs)
    logprobs = out.logprobs if with_entropy else out
    # Half types: hidden @ weight rounds the logits to the input dtype while the reference multiplies in fp32.
    assert_close(logprobs, ref_logprobs, dtype=case.dtype, name="logprobs")
    g_logprobs = torch.randn_like(ref_logprobs)
    loss, ref_loss = (logprobs * g_logprobs).sum(), (ref_logprobs * g_logprobs).sum()
    if with_entropy:
        assert_close(out.entropy, ref_entropy, dtype=case.dtype, name="entropy")
        g_entropy = torch.randn_like(ref_entropy)
        loss = loss + (out.entropy * g_entropy).sum()
        ref_loss = ref_loss + (ref_entropy * g_entropy).sum()
    loss.backward()
    ref_loss.backward()
    # Extreme: hidden ~1e3 makes weight gradients ~1e3 summed over tokens in another order than the reference;
    # fp32 rounding alone gives relative differences up to ~3e-5 there (tests/ops/test_logprobs.py, same bound).
    fp32_rtol = 1e-4 if case.extreme else 1e-5
    for name, ours_t, ref_t in zip(("hidden", "weight", "bias"), ours, refs):
        assert ours_t.grad.dtype == case.dtype
        assert_close(ours_t.grad, ref_t.grad, dtype=case.dtype, name=f"grad {name}", rtol=fp32_rtol)


@pytest.mark.parametrize("kind", ["right", "gaps"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)], ids=str)
def test_gae_long_rows(device, backend, kind, gamma, lam):
    """B 256 x T 4096 in fp32 against the fp64 reference loop. With gamma = lam = 1 an advantage is a suffix sum of
    up to 4096 deltas, so fp32 carries rounding of a few ulps of max|A|: rtol 1e-5 and atol 2e-5 * max|A|, as the
    CPU test of the compiled path (tests/ops/test_gae.py)."""
    num_rows, num_steps = 256, 4096
    rewards, values = torch.randn(num_rows, num_steps), torch.randn(num_rows, num_steps) * 2
    if kind == "right":
        mask = torch.arange(num_steps) < torch.randint(1, num_steps + 1, (num_rows, 1))
    else:
        mask = torch.rand(num_rows, num_steps) > 0.35
        mask[1] = False  # an empty row
    rewards, values, mask = rewards.to(device), values.to(device), mask.to(device)
    exact_adv, exact_ret = gae_reference(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    with fusedrl.use_kernels(gae=backend):
        out = fusedrl.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert out.advantages.dtype == torch.float32
    for name, got, exact in (("advantages", out.advantages, exact_adv), ("returns", out.returns, exact_ret)):
        atol = 2e-5 * float(exact.abs().max())
        assert_close(got.double(), exact, dtype=torch.float32, rtol=1e-5, atol=atol, name=name)
    assert (out.advantages[~mask] == 0).all() and (out.returns[~mask] == 0).all()


def test_gae_reads_bf16_in_fp32(device, backend, needs_dtype):
    needs_dtype(torch.bfloat16)
    rewards, values = torch.randn(64, 1000).bfloat16().to(device), torch.randn(64, 1000).bfloat16().to(device)
    mask = (torch.rand(64, 1000) > 0.2).to(device)
    expected, _ = gae_reference(rewards, values, mask, gamma=0.99, lam=0.95)
    with fusedrl.use_kernels(gae=backend):
        out = fusedrl.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert out.advantages.dtype == torch.float32
    assert_close(out.advantages, expected, name="advantages")


def _policy_inputs(num_rows: int, num_cols: int, *, spread: float = 0.3):
    """Log-probs around -1, old/ref within ``spread`` of them (some tokens clip at eps 0.2), one fully masked row."""
    logps = torch.randn(num_rows, num_cols) - 1.0
    old = logps + spread * torch.randn(num_rows, num_cols)
    ref = logps + spread * torch.randn(num_rows, num_cols)
    mask = torch.rand(num_rows, num_cols) > 0.3
    mask[1] = False
    return logps, old, ref, torch.randn(num_rows), mask, torch.rand(num_rows, num_cols) * 3


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_policy_loss(device, backend, loss_type, level):
    """16 completions x 1024 positions (several Triton blocks per row): asymmetric eps, dual clip, k3 KL and the
    top-entropy mask together; loss, metrics and the log-prob gradient against the reference on the device."""
    logps, old, ref, adv, mask, entropy = (t.to(device) for t in _policy_inputs(16, 1024))
    options = {"ref_logps_BT": ref, "beta": 0.04, "epsilon_low": 0.2, "epsilon_high": 0.28, "delta": 1.25,
               "importance_sampling_level": level, "loss_type": loss_type, "max_completion_length": 1024,
               "entropy_BT": entropy, "top_entropy_quantile": 0.4}
    results = {}
    for name in ("reference", backend):
        leaf = logps.clone().requires_grad_()
        with fusedrl.use_kernels(policy_loss=name):
            out = fusedrl.policy_loss(leaf, old, adv, mask, **options)
        out.loss.backward()
        results[name] = (out, leaf.grad)
    (expected, grad_expected), (actual, grad_actual) = results["reference"], results[backend]
    assert_close(actual.loss, expected.loss, name="loss")
    assert_close(grad_actual, grad_expected, name="grad logps")
    for name in ("kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "entropy"):
        assert_close(getattr(actual, name), getattr(expected, name), name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_policy_loss(device, backend, needs_dtype, dtype):
    """GRPO from hidden states, 16 completions x 256 tokens, H 1024, V 32000, temperature 0.7, k3 KL and the
    entropy mask, against full fp32 logits -> reference log-probs -> reference loss; gradients of hidden and weight.
    Both backends of both ops (head and loss) are the one requested."""
    needs_dtype(dtype)
    num_rows, num_cols, hidden_size, vocab = 16, 256, 1024, 32000
    hidden = torch.randn(num_rows, num_cols, hidden_size).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5 * 3).to(device, dtype)
    ids = torch.randint(0, vocab, (num_rows, num_cols)).to(device)
    mask = (torch.rand(num_rows, num_cols) > 0.2).to(device)
    mask[2] = False
    with torch.no_grad():  # old and reference log-probs near the policy's, so ratios straddle the clip range
        base, _ = linear_token_logprobs_reference(hidden, weight, ids.masked_fill(~mask, -100), temperature=0.7)
    old = base + 0.2 * torch.randn(num_rows, num_cols).to(device)
    ref = base + 0.2 * torch.randn(num_rows, num_cols).to(device)
    adv = (torch.randn(num_rows) + 0.5).to(device)  # loss ~ -mean(A) ~ -0.5: a relative bf16 bound means something
    options = {"ref_logps_BT": ref, "beta": 0.04, "loss_type": "grpo", "top_entropy_quantile": 0.5}

    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    logps, entropy = linear_token_logprobs_reference(leaves[0], leaves[1], ids.masked_fill(~mask, -100),
                                                     temperature=0.7, with_entropy=True)
    expected = policy_loss_reference(logps, old, adv, mask, entropy_BT=entropy.detach(), **options)
    expected.loss.backward()
    fast = [t.clone().requires_grad_() for t in (hidden, weight)]
    with fusedrl.use_kernels(policy_loss=backend, linear_logprobs=backend):
        out = fusedrl.linear_policy_loss(fast[0], fast[1], ids, mask, old, adv, temperature=0.7, **options)
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach()))
    assert_close(out.loss, expected.loss, dtype=dtype, name="loss")
    assert_close(out.logps, logps, dtype=dtype, name="logps")
    assert_close(out.entropy, entropy, dtype=dtype, name="entropy")
    assert_close(out.mean_entropy, expected.entropy, dtype=dtype, name="mean entropy")
    # fp32: the [V, H] gradient sums 3300 tokens in another order than the reference's one GEMM (tests/ops uses the
    # same bound for this op).
    for name, got, want in zip(("hidden", "weight"), fast, leaves):
        assert got.grad.dtype == dtype
        assert_close(got.grad, want.grad, dtype=dtype, name=f"grad {name}", rtol=1e-4, atol=1e-5)
