"""The ops inside torch.compile(fullgraph=True): zero graph breaks, and the custom ops pass opcheck."""

from __future__ import annotations

import pytest
import torch

import fusedrl
from fusedrl.ops import logprobs as ops
from fusedrl.ops.logprobs.reference import linear_token_logprobs_reference


def _loss_region(hidden, weight, labels):
    # A typical RL loss region: per-token log-probs and entropy of a policy, reduced to a scalar.
    out = fusedrl.linear_token_logprobs(hidden, weight, labels, with_entropy=True)
    logits = hidden @ weight.T
    logprobs, entropy = fusedrl.token_logprobs_and_entropy(logits, labels, temperature=0.9)
    mask = (labels != -100).float()
    return ((out.logprobs + logprobs) * mask).sum() / mask.sum() - 0.01 * (out.entropy + entropy).mean()


@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
def test_zero_graph_breaks(backend):
    hidden = torch.randn(2, 6, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    labels = torch.randint(0, 97, (2, 6))
    labels[0, :2] = -100
    with fusedrl.use_kernels(all=backend):
        explanation = torch._dynamo.explain(_loss_region)(hidden, weight, labels)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(_loss_region, fullgraph=True, backend="aot_eager")
        loss = compiled(hidden, weight, labels)
        loss.backward()
    with fusedrl.use_kernels(all="reference"):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        expected = _loss_region(h, w, labels)
        expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, w.grad, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["compiled", "triton"])
def test_opcheck_custom_ops(backend):
    logits = torch.randn(5, 33, requires_grad=True)
    labels = torch.randint(0, 33, (5,))
    labels[1] = -100
    torch.library.opcheck(ops._token_logprobs_op, (logits, labels, 1.0, -100, True, backend))
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(33, 8, requires_grad=True)
    bias = torch.randn(33, requires_grad=True)
    torch.library.opcheck(ops._linear_token_logprobs_op, (hidden, weight, bias, labels, 0.5, -100, True, 0.0, backend))
    torch.library.opcheck(ops._linear_token_logprobs_op, (hidden, weight, bias, labels, 0.5, -100, True, 2.5, backend))
    torch.library.opcheck(ops._linear_token_logprobs_op, (hidden, weight, None, labels, 1.0, -100, False, 0.0, backend))


@pytest.mark.parametrize("backend", ["compiled", "triton"])
def test_opcheck_backward_ops(backend):
    """The backward custom ops on their own: a missing entropy gradient, a frozen weight (its gradient is an empty
    tensor) and no bias, which the fakes must match in shape and dtype."""
    logits = torch.randn(5, 33)
    labels = torch.randint(0, 33, (5,))
    labels[1] = -100
    _, entropy, lse = ops._token_logprobs_op(logits, labels, 1.0, -100, True, backend)
    grad = torch.randn(5)
    torch.library.opcheck(ops._token_logprobs_backward_op,
                          (grad, None, logits, labels, lse, entropy, 1.0, -100, backend))
    torch.library.opcheck(ops._token_logprobs_backward_op,
                          (grad, grad.flip(0), logits, labels, lse, entropy, 1.0, -100, backend))
    hidden, weight = torch.randn(5, 8), torch.randn(33, 8)
    _, entropy, lse = ops._linear_token_logprobs_op(hidden, weight, None, labels, 0.5, -100, True, 2.5, backend)
    args = (grad, grad.flip(0), hidden, weight, None, labels, lse, entropy, 0.5, -100, 2.5)
    torch.library.opcheck(ops._linear_token_logprobs_backward_op, (*args, [True, False, True], backend))
    grad_hidden, grad_weight, grad_bias = ops._linear_token_logprobs_backward_op(*args, [True, False, True], backend)
    assert grad_hidden.shape == hidden.shape and grad_weight.numel() == 0 and grad_bias.numel() == 0


def test_compiled_graph_matches_reference_on_varying_lengths():
    """Five sequence lengths through one compiled region: values stay right as shapes change."""
    weight = torch.randn(64, 8)
    region = torch.compile(lambda h, w, y: fusedrl.linear_token_logprobs(h, w, y), fullgraph=True,
                           backend="aot_eager")
    for length in (3, 5, 8, 13, 21):
        hidden = torch.randn(2, length, 8)
        labels = torch.randint(0, 64, (2, length))
        expected, _ = linear_token_logprobs_reference(hidden, weight, labels)
        torch.testing.assert_close(region(hidden, weight, labels), expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
