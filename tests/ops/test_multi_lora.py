"""Every backend of ``fusedrl.multi_lora_linear`` against the reference loop (values and every gradient), the
reference against PEFT's own LoRA layer, the Triton grouping and its split reduction, the errors, and the custom ops
under opcheck and ``torch.compile(fullgraph=True)``.

Shapes: "awkward" is 37 rows of 48 -> 53 features, rank 3, 3 adapters, ids drawn per row in {-1, 0, 2} (unsorted;
adapter 1 has no row); "realistic" is 5 sequences of 75 tokens, 128 -> 192 features, rank 16, 4 adapters, one per
sequence and the last sequence on the bare base (id -1), 75 rows per adapter (two Triton tiles of 64); "grouped" is 21
rows with the ids non-decreasing (5 base-only rows, 7 of adapter 0, 9 of adapter 2; adapter 1 has no row), the
layout of the trainers' joint mode, which the compiled backend runs segmented (segmented.py). Triton runs under
TRITON_INTERPRET=1 (conftest).
"""

from __future__ import annotations

import pytest
import torch

import fusedrl
from fusedrl.ops import multi_lora as ops
from fusedrl.ops.multi_lora import triton as lora_triton
from tests.utils import assert_close, count_calls

BACKENDS = ("reference", "compiled", "triton")
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "bf16_x_fp32_adapters": (torch.bfloat16, torch.float32)}  # PEFT keeps adapters fp32 on a bf16 base
# (shape, dtypes): the mixed case once, on the awkward shape.
CASES = [("awkward", "fp32"), ("awkward", "bf16"), ("awkward", "bf16_x_fp32_adapters"), ("realistic", "fp32"),
         ("realistic", "bf16"), ("grouped", "fp32"), ("grouped", "bf16_x_fp32_adapters")]


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    # The compiled backend's functions keep torch's budget of 8 graphs each; start and leave this module with none.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(shape: str, dtypes: str = "fp32", *, scale: float = 1.0) -> dict:
    x_dtype, lora_dtype = DTYPES[dtypes]
    gen = torch.Generator().manual_seed(3)
    if shape == "awkward":
        lead, num_in, num_out, rank, num_adapters = (37,), 48, 53, 3, 3
        adapter_ids = torch.tensor([-1, 0, 2])[torch.randint(0, 3, lead, generator=gen)]
        scaling = torch.tensor([0.5, 2.0, 1.5])
    elif shape == "grouped":
        lead, num_in, num_out, rank, num_adapters = (21,), 48, 53, 3, 3
        adapter_ids = torch.tensor([-1] * 5 + [0] * 7 + [2] * 9)
        scaling = torch.tensor([0.5, 2.0, 1.5])
    else:
        lead, num_in, num_out, rank, num_adapters = (5, 75), 128, 192, 16, 4
        adapter_ids = torch.tensor([0, 1, 2, 3, -1]).unsqueeze(1).expand(lead).contiguous()
        scaling = 2.0  # PEFT's lora_alpha = 2 r for every adapter
    return {
        "x": (torch.randn(*lead, num_in, generator=gen) * scale).to(x_dtype),
        "weight": (torch.randn(num_out, num_in, generator=gen) / num_in**0.5).to(x_dtype),
        "bias": torch.randn(num_out, generator=gen).to(x_dtype),
        "lora_A": (torch.randn(num_adapters, rank, num_in, generator=gen) / num_in**0.5).to(lora_dtype),
        "lora_B": (torch.randn(num_adapters, num_out, rank, generator=gen) / rank**0.5).to(lora_dtype),
        "scaling": scaling,
        "adapter_ids": adapter_ids,
    }


def _run(backend: str, inputs: dict, upstream: torch.Tensor, *, trained=("x", "lora_A", "lora_B")):
    """``(y, {name: gradient})`` of ``<y, upstream>`` w.r.t. the ``trained`` inputs, on fresh leaves."""
    leaves = {name: inputs[name].clone().requires_grad_() for name in trained}
    with fusedrl.use_kernels(multi_lora=backend):
        y = fusedrl.multi_lora_linear(**{**inputs, **leaves})
    grads = torch.autograd.grad((y.float() * upstream).sum(), list(leaves.values()))
    return y.detach(), dict(zip(leaves, grads))


def test_hand_value():
    """H_in = H_out = 1, K = 2, r = 1 (the docstring's example): weight 2, bias 0, A = (1, 3), B = (5, 7), scaling
    (0.5, 1), x = 1 on every row, ids (1, -1, 0). y = 2 + 1 * 3 * 7 = 23, 2, 2 + 0.5 * 1 * 5 = 4.5. With upstream 1:
    dx = 2 + s B A = 23, 2, 4.5; dA_0 = s_0 B_0 x = 2.5, dA_1 = 7; dB_0 = s_0 A_0 x = 0.5, dB_1 = 3."""
    inputs = {"x": torch.ones(3, 1), "weight": torch.tensor([[2.0]]), "bias": torch.zeros(1),
              "lora_A": torch.tensor([1.0, 3.0]).view(2, 1, 1), "lora_B": torch.tensor([5.0, 7.0]).view(2, 1, 1),
              "scaling": torch.tensor([0.5, 1.0]), "adapter_ids": torch.tensor([1, -1, 0])}
    for backend in BACKENDS:
        y, grads = _run(backend, inputs, torch.ones(3, 1))
        assert_close(y, torch.tensor([[23.0], [2.0], [4.5]]), name=f"{backend} y")
        assert_close(grads["x"], torch.tensor([[23.0], [2.0], [4.5]]), name=f"{backend} dx")
        assert_close(grads["lora_A"], torch.tensor([2.5, 7.0]).view(2, 1, 1), name=f"{backend} dA")
        assert_close(grads["lora_B"], torch.tensor([0.5, 3.0]).view(2, 1, 1), name=f"{backend} dB")


@pytest.mark.parametrize("backend", ("compiled", "triton"))
@pytest.mark.parametrize(("shape", "dtypes"), CASES, ids=[f"{s}-{d}" for s, d in CASES])
def test_backends_match_reference(backend, shape, dtypes):
    """Values and the gradients of x, lora_A and lora_B against the reference on the same inputs, in the inputs'
    dtypes; the adapter with no rows (awkward: adapter 1) gets an exact zero gradient from every backend."""
    inputs = _inputs(shape, dtypes)
    upstream = torch.randn(*inputs["x"].shape[:-1], inputs["weight"].shape[0])
    (want_y, want), (y, got) = (_run(name, inputs, upstream) for name in ("reference", backend))
    x_dtype = inputs["x"].dtype
    assert y.dtype == x_dtype and y.shape == want_y.shape
    assert_close(y, want_y, dtype=x_dtype, atol=1e-5 * float(want_y.abs().max()), name="y")
    for name, grad in got.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_close(grad, want[name], dtype=grad.dtype, atol=1e-5 * float(want[name].abs().max()), name=name)
    if shape in ("awkward", "grouped"):
        assert not got["lora_A"][1].any() and not got["lora_B"][1].any()


@pytest.mark.parametrize(("shape", "segmented"), [("grouped", True), ("awkward", False), ("realistic", False)])
def test_compiled_backend_segments_grouped_rows_only(shape, segmented, monkeypatch):
    """Rows grouped by adapter (ids non-decreasing) take one matmul per adapter, forward and backward; any other
    order takes the dense masked graph."""
    calls = count_calls(monkeypatch, {name: f"fusedrl.ops.multi_lora.compiled:{name}"
                                      for name in ("segmented_fwd", "segmented_bwd")})
    inputs = _inputs(shape)
    _run("compiled", inputs, torch.randn(*inputs["x"].shape[:-1], inputs["weight"].shape[0]))
    assert [calls["segmented_fwd"], calls["segmented_bwd"]] == ([1, 1] if segmented else [0, 0])


@pytest.mark.parametrize("backend", ("compiled", "triton"))
def test_frozen_inputs_get_no_gradient(backend):
    """x that needs no gradient (the first adapted layer) and adapters that need none (a reference adapter): the
    other gradients are unchanged."""
    inputs = _inputs("awkward")
    upstream = torch.randn(37, 53)
    for trained in (("lora_A", "lora_B"), ("x",)):
        (_, want), (_, got) = (_run(name, inputs, upstream, trained=trained) for name in ("reference", backend))
        for name in trained:
            assert_close(got[name], want[name], atol=1e-5 * float(want[name].abs().max()), name=name)


def test_reference_matches_peft():
    """Two PEFT LoRA adapters of ranks 4 and 2 on one nn.Linear (random B: init_lora_weights=False), each row's
    output under ``set_adapter`` against multi_lora_linear with the adapters stacked, rank 2 zero-padded to 4; the
    bare base (id -1) under ``disable_adapter``."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    base = torch.nn.Sequential(torch.nn.Linear(12, 9))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                      init_lora_weights=False), adapter_name="math")
    model.add_adapter("code", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    lora_A, lora_B = torch.zeros(2, 4, 12), torch.zeros(2, 9, 4)
    for k, name in enumerate(("math", "code")):
        rank = layer.r[name]
        lora_A[k, :rank], lora_B[k, :, :rank] = layer.lora_A[name].weight, layer.lora_B[name].weight
    x, adapter_ids = torch.randn(7, 12), torch.tensor([0, 1, -1, 1, 0, 0, -1])
    expected = torch.empty(7, 9)
    with torch.no_grad():
        for k, name in enumerate(("math", "code")):
            model.set_adapter(name)
            expected[adapter_ids == k] = model(x)[adapter_ids == k]
        with model.disable_adapter():
            expected[adapter_ids == -1] = model(x)[adapter_ids == -1]
        y = ops.multi_lora_linear_reference(x, layer.base_layer.weight, layer.base_layer.bias, lora_A, lora_B,
                                            torch.tensor([layer.scaling["math"], layer.scaling["code"]]), adapter_ids)
    assert_close(y, expected)


def test_grouping_tiles():
    """ids (2, -1, 0, 2, 0, 2), K = 3, tiles of 2 rows: the stable sort puts the base row first and keeps each
    adapter's rows in order; adapter 1 has none; G = 6 // 2 + 3 = 6 tiles, adapter 0 one, adapter 2 two."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora_triton, "BLOCK_M", 2)
        groups = lora_triton.group_rows(torch.tensor([2, -1, 0, 2, 0, 2]), 3)
    assert groups.order.tolist() == [1, 2, 4, 0, 3, 5]
    assert groups.seg_start.tolist() == [1, 3, 3] and groups.seg_count.tolist() == [2, 0, 3]
    assert groups.tile_adapter.tolist() == [0, 2, 2, -1, -1, -1]
    assert groups.tile_start[:3].tolist() == [1, 3, 5] and groups.tile_end[:3].tolist() == [3, 6, 6]
    assert all(t.dtype == torch.int32 for t in groups)


def test_triton_split_reduction_is_deterministic(monkeypatch):
    """ROWS_PER_SPLIT lowered so each adapter's reduction splits in 3 (37 // (3 * 4)): the partial sums match the
    reference, and two backward passes give the same bits (fixed-order sums, no atomics)."""
    monkeypatch.setattr(lora_triton, "ROWS_PER_SPLIT", 4)
    assert lora_triton.num_splits(37, 3) == 3
    inputs = _inputs("awkward")
    upstream = torch.randn(37, 53)
    _, want = _run("reference", inputs, upstream)
    (_, first), (_, second) = (_run("triton", inputs, upstream) for _ in range(2))
    for name in first:
        assert_close(first[name], want[name], atol=1e-5 * float(want[name].abs().max()), name=name)
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("backend", ("compiled", "triton"))
def test_extreme_inputs_stay_finite(backend):
    """x of +-1e4 scale (a diverged activation): finite values and gradients, equal to the reference's relative to
    their size."""
    inputs = _inputs("awkward", scale=1e4)
    upstream = torch.randn(37, 53)
    (want_y, want), (y, got) = (_run(name, inputs, upstream) for name in ("reference", backend))
    for name, value, expected in (("y", y, want_y), *((n, got[n], want[n]) for n in got)):
        assert torch.isfinite(value).all(), name
        assert_close(value, expected, atol=1e-5 * float(expected.abs().max()), name=name)


@pytest.mark.parametrize("backend", ("reference", "triton"))
def test_autocast_casts_inputs(backend):
    """Under bf16 autocast the layer computes as on bf16 inputs (as autocast casts PEFT's nn.Linear calls):
    bitwise the same output, in bf16; the gradients reach the fp32 leaves in fp32."""
    inputs = _inputs("awkward")
    cast = {k: v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    with fusedrl.use_kernels(multi_lora=backend):
        expected = fusedrl.multi_lora_linear(**cast)
        leaf = inputs["lora_A"].clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fusedrl.multi_lora_linear(**{**inputs, "lora_A": leaf})
    assert y.dtype == torch.bfloat16 and torch.equal(y.detach(), expected)
    y.float().sum().backward()
    assert leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all()


def _bad(case: str) -> dict:
    inputs = _inputs("awkward")
    edits = {
        "x_int": {"x": inputs["x"].long()},
        "x_1d": {"x": inputs["x"][0], "adapter_ids": inputs["adapter_ids"][0]},
        "weight_shape": {"weight": inputs["weight"][:, :40]},
        "weight_dtype": {"weight": inputs["weight"].bfloat16()},
        "weight_requires_grad": {"weight": inputs["weight"].clone().requires_grad_()},
        "bias_shape": {"bias": inputs["bias"][:5]},
        "lora_A_shape": {"lora_A": inputs["lora_A"][:, :, :40]},
        "lora_B_shape": {"lora_B": inputs["lora_B"][:, :, :2]},
        "lora_dtypes": {"lora_B": inputs["lora_B"].bfloat16()},
        "scaling_shape": {"scaling": torch.ones(2)},
        "scaling_nan": {"scaling": float("nan")},
        "scaling_bool": {"scaling": True},
        "scaling_requires_grad": {"scaling": torch.ones(3, requires_grad=True)},
        "ids_float": {"adapter_ids": inputs["adapter_ids"].float()},
        "ids_shape": {"adapter_ids": inputs["adapter_ids"][:30]},
        "ids_too_high": {"adapter_ids": torch.full((37,), 3)},
        "ids_too_low": {"adapter_ids": torch.full((37,), -2)},
    }
    return {**inputs, **edits[case]}


BAD_INPUTS = {
    "x_int": "x must be float32, bfloat16 or float16, got torch.int64",
    "x_1d": "x must have at least 2 dimension",
    "weight_shape": r"weight must be \[H_out, H_in\] with H_in = x.shape\[-1\] = 48, got \(53, 40\)",
    "weight_dtype": r"weight \(torch.bfloat16, cpu\) must match x \(torch.float32, cpu\)",
    "weight_requires_grad": "weight requires grad, but multi_lora_linear keeps the base layer frozen",
    "bias_shape": r"bias must be None or \[H_out\] = \[53\]",
    "lora_A_shape": r"lora_A must be \[K, r, H_in\] with H_in = x.shape\[-1\] = 48",
    "lora_B_shape": r"lora_B must be \[K, H_out, r\] = \[3, 53, 3\]",
    "lora_dtypes": "lora_A .* and lora_B .* must share a dtype",
    "scaling_shape": r"scaling must be a number or a float tensor \[K\] = \[3\]",
    "scaling_nan": "scaling must be a finite number",
    "scaling_bool": "scaling must be a finite number",
    "scaling_requires_grad": "scaling requires grad",
    "ids_float": "adapter_ids must be an int64 .*, got torch.float32",
    "ids_shape": r"adapter_ids must be x.shape\[:-1\] = \(37,\)",
    "ids_too_high": r"adapter_ids must lie in \[-1, 3\) .*got values in \[3, 3\]",
    "ids_too_low": r"adapter_ids must lie in \[-1, 3\) .*got values in \[-2, -2\]",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_the_argument(case):
    with pytest.raises(ValueError, match=BAD_INPUTS[case]):
        fusedrl.multi_lora_linear(**_bad(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_runs_that_backend_only(backend, monkeypatch):
    """Each selection runs its own implementation (spied where each backend's entry point is looked up)."""
    counts = count_calls(monkeypatch, {
        "reference": "fusedrl.ops.multi_lora:multi_lora_linear_reference",
        "compiled": "fusedrl.ops.multi_lora.compiled:multi_lora_fwd",
        "triton": "fusedrl.ops.multi_lora.triton:multi_lora_fwd",
        "compiled_bwd": "fusedrl.ops.multi_lora.compiled:multi_lora_bwd",
        "triton_bwd": "fusedrl.ops.multi_lora.triton:multi_lora_bwd",
    })
    _run(backend, _inputs("awkward"), torch.randn(37, 53))
    expected = dict.fromkeys(counts, 0)
    expected[backend] = 1
    if backend != "reference":
        expected[f"{backend}_bwd"] = 1
    assert counts == expected


@pytest.mark.parametrize("backend", ("compiled", "triton"))
def test_opcheck_custom_ops(backend):
    inputs = _inputs("awkward")
    x, weight, lora_A, lora_B = inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"]
    scaling, adapter_ids = inputs["scaling"], inputs["adapter_ids"]
    for bias in (inputs["bias"], None):
        args = (x.clone().requires_grad_(), weight, bias, lora_A.clone().requires_grad_(),
                lora_B.clone().requires_grad_(), scaling, adapter_ids, backend)
        torch.library.opcheck(ops._forward_op, args)
    hidden = torch.randn(37, 3)
    for x_grad, lora_grad in ((True, True), (False, True), (True, False)):
        args = (torch.randn(37, 53), x, weight, lora_A, lora_B, scaling, adapter_ids, hidden, x_grad, lora_grad,
                backend)
        torch.library.opcheck(ops._backward_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile(backend):
    """A region around the public function (a LoRA layer and a loss on its output) under
    torch.compile(fullgraph=True) matches eager, values and gradients."""
    inputs = _inputs("realistic")
    upstream = torch.randn(5, 75, 192)

    def region(x, lora_A, lora_B):
        y = fusedrl.multi_lora_linear(x, inputs["weight"], inputs["bias"], lora_A, lora_B, inputs["scaling"],
                                      inputs["adapter_ids"])
        return (torch.tanh(y) * upstream).sum()

    torch._dynamo.reset()
    with fusedrl.use_kernels(multi_lora=backend):
        results = []
        for fn in (region, torch.compile(region, fullgraph=True, backend="aot_eager")):
            leaves = [inputs[name].clone().requires_grad_() for name in ("x", "lora_A", "lora_B")]
            loss = fn(*leaves)
            results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    torch._dynamo.reset()
    (want, want_grads), (got, got_grads) = results
    assert_close(got, want, name="loss")
    for grad, expected in zip(got_grads, want_grads):
        assert_close(grad, expected, atol=1e-5 * float(expected.abs().max()))
