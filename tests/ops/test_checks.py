"""Bad input fails fast with a ValueError that names the argument."""

from __future__ import annotations

import pytest
import torch

import fusedrl

V, H = 11, 4


def _logits(**kw):
    base = {"logits": torch.randn(2, 3, V), "labels": torch.randint(0, V, (2, 3))}
    base.update(kw)
    return lambda: fusedrl.token_logprobs(base["logits"], base["labels"], **base.get("kw", {}))


def _linear(**kw):
    base = {"hidden": torch.randn(2, 3, H), "weight": torch.randn(V, H), "labels": torch.randint(0, V, (2, 3))}
    extra = kw.pop("kw", {})
    base.update(kw)
    return lambda: fusedrl.linear_token_logprobs(base["hidden"], base["weight"], base["labels"], **extra)


@pytest.mark.parametrize(
    "call,match",
    [
        (_logits(logits=torch.randn(2, 3, V).double()), "logits must be float32, bfloat16 or float16"),
        (_logits(logits=torch.randn(0, 3, V), labels=torch.zeros(0, 3, dtype=torch.long)), "logits is empty"),
        (_logits(labels=torch.randint(0, V, (2, 4))), r"labels shape \(2, 4\) must equal logits.shape"),
        (_logits(labels=torch.rand(2, 3)), "labels must be an int64"),
        (_logits(labels=torch.full((2, 3), V)), r"labels must lie in \[0, 11\) or equal ignore_index=-100; found 11"),
        (_logits(labels=torch.full((2, 3), -1)), "found -1"),
        (_logits(kw={"temperature": 0.0}), "temperature must be a finite number > 0"),
        (_logits(kw={"temperature": float("nan")}), "temperature must be a finite number > 0"),
        (_linear(weight=torch.randn(V, H + 1)), r"weight must be \[V, H\] with H = hidden.shape\[-1\] = 4"),
        (_linear(weight=torch.randn(V, H).bfloat16()), "weight .* must match hidden"),
        (_linear(kw={"bias": torch.randn(V + 1)}), r"bias must be \[V\] = \[11\]"),
        (_linear(labels=torch.randint(0, V, (3, 2))), r"labels shape \(3, 2\) must equal hidden.shape"),
        (_linear(hidden=torch.randn(0, H), labels=torch.zeros(0, dtype=torch.long)), "hidden is empty"),
    ],
    ids=["dtype", "empty", "shape", "label-dtype", "label-high", "label-negative", "temp-zero", "temp-nan",
         "weight-shape", "weight-dtype", "bias-shape", "linear-labels", "linear-empty"],
)
@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_bad_input(call, match, backend):
    with fusedrl.use_kernels(all=backend), pytest.raises(ValueError, match=match):
        call()


def test_custom_ignore_index_is_honoured():
    logits = torch.randn(4, V)
    labels = torch.tensor([1, 0, 3, 0])
    logprobs = fusedrl.token_logprobs(logits, labels, ignore_index=0)
    assert logprobs[1] == 0 and logprobs[3] == 0 and (logprobs[[0, 2]] < 0).all()
