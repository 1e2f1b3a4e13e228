"""Every backend of ``fusedrl.gae`` against the reference loop, and the loop against GAE written per row by hand.

Triton runs under TRITON_INTERPRET=1 (set in conftest), a Python-level step per position, so its rows are short.
"""

from __future__ import annotations

import logging
import subprocess

import pytest
import torch

import fusedrl
from fusedrl.ops import dispatch as registry
from fusedrl.ops import gae as ops
from fusedrl.ops.gae import compiled as scan
from fusedrl.ops.gae.reference import gae_reference
from tests.utils import assert_close

BACKENDS = ("reference", "compiled", "triton")
MASKS = ("none", "right", "left", "gaps", "empty_row")
GAMMA_LAM = [(1.0, 1.0), (0.99, 0.95), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, 0.9)]


def _per_row_gae(rewards, values, mask, gamma, lam):
    """GAE the textbook way on each row's real positions taken out as plain Python lists (fp64), put back in place:
    an implementation independent of the reference's carried-state formulation."""
    advantages = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        real = [t for t in range(rewards.shape[1]) if mask[b, t]]
        r = [float(rewards[b, t]) for t in real]
        v = [float(values[b, t]) for t in real] + [0.0]
        running = 0.0
        for k in reversed(range(len(real))):
            running = r[k] + gamma * v[k + 1] - v[k] + gamma * lam * running
            advantages[b, real[k]] = running
    returns = torch.where(mask, advantages + values.double(), 0.0)
    return advantages, returns


def _mask(kind: str, B: int, T: int) -> torch.Tensor:
    lengths = torch.randint(1, T + 1, (B,))
    steps = torch.arange(T)
    if kind == "none":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "right":
        return steps < lengths[:, None]
    if kind == "left":
        return steps >= (T - lengths)[:, None]
    mask = torch.rand(B, T) > 0.35  # random gaps, runs of padding of any length
    if kind == "empty_row":
        mask[1] = False
        mask[-1, :3] = False  # and a row that starts with padding
    return mask


def _inputs(B: int, T: int, kind: str):
    return torch.randn(B, T), torch.randn(B, T) * 2, _mask(kind, B, T)


def _run(backend, rewards, values, mask, gamma, lam):
    with fusedrl.use_kernels(gae=backend):
        return fusedrl.gae(rewards, values, mask, gamma=gamma, lam=lam)


def test_hand_value():
    """Docstring example: gamma 1, lam 0.5, mask [1, 0, 1], rewards [0, 9, 1], values [0.5, 9, 1]. Real positions
    0 and 2: delta_2 = 1 + 1 * 0 - 1 = 0, A_2 = 0; delta_0 = 0 + 1 * v_2 - 0.5 = 0.5 (the padding's 9s are never
    read), A_0 = 0.5 + 0.5 * A_2 = 0.5. Returns = A + v at real positions: [1.0, 0, 1.0]."""
    rewards, values = torch.tensor([[0.0, 9.0, 1.0]]), torch.tensor([[0.5, 9.0, 1.0]])
    mask = torch.tensor([[True, False, True]])
    for backend in BACKENDS:
        out = _run(backend, rewards, values, mask, 1.0, 0.5)
        assert torch.equal(out.advantages, torch.tensor([[0.5, 0.0, 0.0]])), backend
        assert torch.equal(out.returns, torch.tensor([[1.0, 0.0, 1.0]])), backend


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM, ids=lambda v: str(v))
def test_reference_matches_per_row_gae(kind, gamma, lam):
    rewards, values, mask = _inputs(3, 47, kind)
    advantages, returns = gae_reference(rewards, values, mask, gamma=gamma, lam=lam)
    expected_adv, expected_ret = _per_row_gae(rewards, values, mask, gamma, lam)
    assert_close(advantages, expected_adv.float(), name="advantages")
    assert_close(returns, expected_ret.float(), name="returns")
    assert torch.equal(advantages[~mask], torch.zeros_like(advantages[~mask]))


def test_unmasked_matches_trl_loop():
    """Without padding the semantics are TRL's PPO loop (next value 0 after the last position)."""
    rewards, values, mask = _inputs(2, 9, "none")
    gamma, lam = 0.9, 0.8
    last, trl = torch.zeros(2), []
    for t in reversed(range(9)):
        next_values = values[:, t + 1] if t < 8 else 0.0
        last = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lam * last
        trl.append(last)
    expected = torch.stack(trl[::-1], dim=1)
    assert_close(fusedrl.gae(rewards, values, mask, gamma=gamma, lam=lam).advantages, expected)


@pytest.mark.parametrize("backend", ("compiled", "triton"))
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM, ids=lambda v: str(v))
def test_backends_match_reference(backend, kind, gamma, lam):
    B, T = (3, 47) if backend == "triton" else (5, 300)  # 300: several blocks of 64 and a partial one
    rewards, values, mask = _inputs(B, T, kind)
    expected = gae_reference(rewards, values, mask, gamma=gamma, lam=lam)
    out = _run(backend, rewards, values, mask, gamma, lam)
    assert out.advantages.dtype == torch.float32 and out.advantages.shape == (B, T)
    assert_close(out.advantages, expected[0], name="advantages")
    assert_close(out.returns, expected[1], name="returns")
    assert torch.equal(out.advantages[~mask], torch.zeros_like(out.advantages[~mask]))
    assert torch.equal(out.returns[~mask], torch.zeros_like(out.returns[~mask]))


@pytest.mark.parametrize("kind", ("right", "gaps"))
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.999, 0.99), (0.99, 0.95)], ids=lambda v: str(v))
def test_compiled_long_rows_fp32(kind, gamma, lam):
    """T = 4096 in fp32 against the fp64 loop. With gamma = lam = 1 the advantage is a plain suffix sum of ~4096
    deltas (|A| up to ~150 here), so both fp32 paths carry rounding of a few ulps of that magnitude: tolerance
    rtol 1e-5 on values and atol 2e-5 * max|A|."""
    rewards, values, mask = _inputs(4, 4096, kind)
    exact, _ = gae_reference(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    out = _run("compiled", rewards, values, mask, gamma, lam)
    loop, _ = gae_reference(rewards, values, mask, gamma=gamma, lam=lam)
    atol = 2e-5 * float(exact.abs().max())
    assert_close(out.advantages.double(), exact, dtype=torch.float32, rtol=1e-5, atol=atol, name="compiled")
    assert_close(loop.double(), exact, dtype=torch.float32, rtol=1e-5, atol=atol, name="fp32 loop")


def test_compacted_and_contiguous_variants_agree():
    """The compiled op picks the scatter-free variant for one-run masks; the general variant gives the same."""
    rewards, values, mask = _inputs(4, 200, "right")
    assert int(scan.max_runs(mask)) == 1 and int(scan.max_runs(_mask("gaps", 4, 200))) > 1
    tables = scan.discount_tables(0.99, 0.95, 200, rewards.device)
    gamma = torch.tensor(0.99)
    contiguous = scan.gae_contiguous(rewards, values, mask, gamma, *tables)
    compacted = scan.gae_compacted(rewards, values, mask, gamma, *tables)
    for a, b in zip(contiguous, compacted):
        assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_variants(backend):
    """bf16 inputs are read in fp32; a float 0/1 mask equals its bool; non-contiguous views are fine; inputs that
    require grad give detached outputs."""
    rewards, values, mask = _inputs(3, 20, "gaps")
    expected = gae_reference(rewards, values, mask, gamma=0.99, lam=0.95)
    out = _run(backend, rewards.T.contiguous().T, values.requires_grad_(), mask.float(), 0.99, 0.95)
    assert not out.advantages.requires_grad and out.advantages.grad_fn is None
    assert_close(out.advantages, expected[0])
    half = _run(backend, rewards.bfloat16(), values.detach().bfloat16(), mask, 0.99, 0.95)
    ref_half = gae_reference(rewards.bfloat16(), values.detach().bfloat16(), mask, gamma=0.99, lam=0.95)
    assert half.advantages.dtype == torch.float32
    assert_close(half.advantages, ref_half[0])


# ---------------------------------------------------------------------------------------------------------------
# torch.compile capture, opcheck, fallback, errors


def _ppo_region(rewards, values, mask):
    # PPO's use: GAE, then whitened advantages over the real positions.
    out = fusedrl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    return fusedrl.masked_whiten(out.advantages, mask), out.returns


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_graph_breaks(backend):
    rewards, values, mask = _inputs(3, 8, "right")
    with fusedrl.use_kernels(gae=backend):
        explanation = torch._dynamo.explain(_ppo_region)(rewards, values, mask)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        torch._dynamo.reset()
        advantages, returns = torch.compile(_ppo_region, fullgraph=True, backend="aot_eager")(rewards, values, mask)
    with fusedrl.use_kernels(gae="reference"):
        expected = _ppo_region(rewards, values, mask)
    assert_close(advantages, expected[0], name="whitened")
    assert_close(returns, expected[1], name="returns")
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ("compiled", "triton"))
def test_opcheck(backend):
    rewards, values, mask = _inputs(3, 11, "gaps")
    torch.library.opcheck(ops._gae_op, (rewards, values, mask, 0.99, 0.95, backend))
    torch.library.opcheck(ops._gae_op, (rewards, values, torch.ones_like(mask), 1.0, 1.0, backend))


def test_triton_build_failure_falls_back_to_compiled(monkeypatch, caplog):
    """A default (not explicitly requested) Triton selection whose kernel fails to build runs compiled, logged
    once; an explicit request re-raises."""
    rewards, values, mask = _inputs(3, 11, "gaps")

    def broken(*args):
        raise subprocess.CalledProcessError(1, ["cc", "launcher.c"])

    from fusedrl.ops.gae import triton as gae_triton

    monkeypatch.setattr(gae_triton, "gae_fwd", broken)
    monkeypatch.setattr(registry, "_failed_triton", {})
    monkeypatch.setattr(registry, "_logged_fallbacks", set())
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        first = ops._gae_op(rewards, values, mask, 0.99, 0.95, "triton")
        ops._gae_op(rewards, values, mask, 0.99, 0.95, "triton")
    assert_close(first[0], gae_reference(rewards, values, mask, gamma=0.99, lam=0.95)[0])
    assert len([r for r in caplog.records if "gae falls back" in r.getMessage()]) == 1
    with fusedrl.use_kernels(gae="triton"), pytest.raises(subprocess.CalledProcessError):
        ops._gae_op(rewards, values, mask, 0.99, 0.95, "triton")


@pytest.mark.parametrize("change,match", [
    ({"values": torch.zeros(3, 5)}, "values .* must match rewards"),
    ({"mask": torch.ones(3, 5, dtype=torch.bool)}, "mask .* must match rewards"),
    ({"mask": torch.ones(3, 4, dtype=torch.int64)}, "mask must be a bool or float"),
    ({"rewards": torch.zeros(12), "values": torch.zeros(12), "mask": torch.ones(12, dtype=torch.bool)},
     "rewards must have at least 2"),
    ({"rewards": torch.zeros(3, 4, 1)}, r"rewards must be \[B, T\]"),
    ({"values": torch.zeros(3, 4, dtype=torch.int64)}, "values must be float32"),
    ({"gamma": 1.5}, r"gamma must be a number in \[0, 1\]"),
    ({"lam": -0.1}, r"lam must be a number in \[0, 1\]"),
    ({"gamma": float("nan")}, "gamma must be"),
], ids=["values_shape", "mask_shape", "int_mask", "1d", "3d", "int_values", "gamma", "lam", "nan_gamma"])
def test_errors_name_the_argument(change, match):
    kwargs = {"rewards": torch.zeros(3, 4), "values": torch.zeros(3, 4), "mask": torch.ones(3, 4, dtype=torch.bool),
              "gamma": 1.0, "lam": 0.95, **change}
    with pytest.raises(ValueError, match=match):
        fusedrl.gae(kwargs.pop("rewards"), kwargs.pop("values"), kwargs.pop("mask"), **kwargs)
