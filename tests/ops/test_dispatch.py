"""Backend selection: priority order, when the environment is read, and the error messages."""

from __future__ import annotations

import logging

import pytest
import torch

import fusedrl
from fusedrl.ops import dispatch as registry


@pytest.fixture(autouse=True)
def _clean_selection(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.configure_kernels(None)
    yield
    registry.configure_kernels(None)


def _backends(device="cpu", ops=("logprobs", "linear_logprobs")):
    """The selection for the ops these tests set (every registered op has its own folder and tests)."""
    return {op: backend for op, backend in fusedrl.kernel_backends(device).items() if op in ops}


def test_defaults_compiled_on_cpu_triton_on_cuda():
    assert set(fusedrl.kernel_backends("cpu").values()) == {"compiled"}
    assert set(fusedrl.kernel_backends("cpu")) >= {"logprobs", "linear_logprobs"}
    assert registry.resolve("logprobs", "cuda") == "triton"


def test_priority_context_over_config_over_env(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "logprobs=reference,linear_logprobs=reference")
    assert _backends() == {"logprobs": "reference", "linear_logprobs": "reference"}
    fusedrl.configure_kernels("logprobs=compiled")
    assert _backends() == {"logprobs": "compiled", "linear_logprobs": "reference"}
    with fusedrl.use_kernels(all="triton"):
        assert set(fusedrl.kernel_backends("cpu").values()) == {"triton"}
        with fusedrl.use_kernels(logprobs="reference"):
            assert registry.resolve("logprobs", "cpu") == "reference"
            assert registry.resolve("linear_logprobs", "cpu") == "triton"
    assert registry.resolve("logprobs", "cpu") == "compiled"


def test_env_is_read_at_call_time_not_import(monkeypatch):
    assert registry.resolve("linear_logprobs", "cpu") == "compiled"
    monkeypatch.setenv(registry.ENV_VAR, "linear_logprobs=reference")
    assert registry.resolve("linear_logprobs", "cpu") == "reference"


def test_selection_changes_what_runs(monkeypatch):
    """The reference backend builds full fp32 logits in autograd; the compiled one is a single custom op."""
    logits = torch.randn(4, 50, requires_grad=True)
    labels = torch.randint(0, 50, (4,))
    with fusedrl.use_kernels(logprobs="reference"):
        ref = fusedrl.token_logprobs(logits, labels)
    with fusedrl.use_kernels(logprobs="compiled"):
        fast = fusedrl.token_logprobs(logits, labels)
    assert type(ref.grad_fn).__name__ == "WhereBackward0"
    assert "fusedrl_token_logprobs" in type(fast.grad_fn.next_functions[0][0]).__name__
    torch.testing.assert_close(ref, fast)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: fusedrl.use_kernels(logprobs="cuda").__enter__(), "unknown backend 'cuda'.*reference, compiled, triton"),
        (lambda: fusedrl.use_kernels(logprob="triton").__enter__(), "unknown op 'logprob'.*all, .*logprobs"),
        (lambda: fusedrl.configure_kernels("logprobs"), "OP=BACKEND"),
        (lambda: fusedrl.configure_kernels("logprobs=fast"), "--kernels: unknown backend 'fast'"),
        (lambda: registry.resolve("gea", "cpu"), "unknown op 'gea'"),
    ],
    ids=["bad-backend", "bad-op", "malformed", "bad-config", "unregistered"],
)
def test_bad_requests_name_the_choices(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_env_names_the_variable(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "logprobs=gpu")
    with pytest.raises(ValueError, match="FUSEDRL_KERNELS: unknown backend 'gpu'"):
        registry.resolve("logprobs", "cpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with (
        fusedrl.use_kernels(logprobs="triton"),
        pytest.raises(ValueError, match="TRITON_INTERPRET=1.*choose one of reference, compiled"),
    ):
        registry.resolve("logprobs", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fusedrl.use_kernels(logprobs="triton"):
        assert registry.resolve("logprobs", "cpu") == "triton"


def test_default_falls_back_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(registry, "triton_importable", lambda: False)
    monkeypatch.setattr(registry, "_logged_fallbacks", set())
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        assert registry.resolve("logprobs", "cuda") == "compiled"
        assert registry.resolve("logprobs", "cuda") == "compiled"
    messages = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert messages == [
        "fusedrl: logprobs falls back to the compiled backend: triton is not installed (pip install triton, Linux only)"
    ]
    with fusedrl.use_kernels(logprobs="triton"), pytest.raises(ValueError, match="triton is not installed"):
        registry.resolve("logprobs", "cuda")
