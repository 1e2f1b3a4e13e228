"""Every backend of `policy_loss` and `linear_policy_loss` against the reference: values, metrics and gradients.

The reference (``ops/policy/reference.py``) is checked here against hand-derived numbers and against TRL 1.16's
own ``GRPOTrainer._compute_loss`` run on the same tensors. Triton runs under TRITON_INTERPRET=1 (conftest).
"""

from __future__ import annotations

import math
import types
from collections import defaultdict
from functools import partial

import pytest
import torch

import fusedrl
from fusedrl.ops import policy as ops
from fusedrl.ops.logprobs.reference import soft_cap, token_logprobs_reference
from fusedrl.ops.policy import compiled
from fusedrl.ops.policy.reference import high_entropy_mask, policy_loss_reference, value_loss_reference
from tests.utils import assert_close, spy_policy_backends

FAST_BACKENDS = ("compiled", "triton")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
METRICS = ("kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "entropy")


def _inputs(num_rows=3, num_cols=47, *, spread=0.3, adv_per_token=False):
    """Log-probs around -1, old/ref within ``spread`` of them (a few tokens clip at eps 0.2), one fully masked row."""
    logps = torch.randn(num_rows, num_cols) - 1.0
    old = logps + spread * torch.randn(num_rows, num_cols)
    ref = logps + spread * torch.randn(num_rows, num_cols)
    adv = torch.randn(num_rows, num_cols) if adv_per_token else torch.randn(num_rows)
    mask = torch.rand(num_rows, num_cols) > 0.3
    mask[1] = False
    entropy = torch.rand(num_rows, num_cols) * 3
    return logps, old, ref, adv, mask, entropy


def _run(backend, logps, old, adv, mask, **options):
    leaf = logps.clone().requires_grad_()
    with fusedrl.use_kernels(policy_loss=backend):
        out = fusedrl.policy_loss(leaf, old, adv, mask, **options)
    out.loss.backward()
    return out, leaf.grad


def _compare(backend, logps, old, adv, mask, **options):
    expected, grad_expected = _run("reference", logps, old, adv, mask, **options)
    actual, grad_actual = _run(backend, logps, old, adv, mask, **options)
    assert_close(actual.loss, expected.loss, name="loss")
    assert_close(grad_actual, grad_expected, name="grad logps")
    for name in METRICS:
        want, got = getattr(expected, name), getattr(actual, name)
        assert (want is None) == (got is None), name
        if want is not None:
            assert_close(got, want, name=name)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_backends_match_reference(backend, level, loss_type):
    """Asymmetric eps, dual clip, k3 KL and the top-entropy mask together, on an awkward shape (3, 47)."""
    logps, old, ref, adv, mask, entropy = _inputs()
    _compare(backend, logps, old, adv, mask, ref_logps_BT=ref, beta=0.04, epsilon_low=0.2, epsilon_high=0.28,
             delta=1.25, importance_sampling_level=level, loss_type=loss_type, max_completion_length=64,
             entropy_BT=entropy, top_entropy_quantile=0.4)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("estimator", ("k1", "k2", "k3"))
def test_kl_estimators(backend, level, estimator):
    logps, old, ref, adv, mask, _ = _inputs(4, 33, spread=0.8)
    _compare(backend, logps, old, adv, mask, ref_logps_BT=ref, beta=0.3, kl_estimator=estimator,
             importance_sampling_level=level, loss_type="bnpo")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("case", ("on_policy", "adv_per_token", "no_ref", "dapo_normaliser", "no_clip_range"))
def test_variants(backend, level, case):
    logps, old, ref, adv, mask, entropy = _inputs(adv_per_token=case == "adv_per_token", spread=1.0)
    options = {"ref_logps_BT": ref, "beta": 0.1, "entropy_BT": entropy, "importance_sampling_level": level}
    if case == "on_policy":
        old = None
    if case == "no_ref":
        options.update(ref_logps_BT=None, beta=0.0)
    if case == "dapo_normaliser":
        options.update(loss_type="dapo", num_items_in_batch=torch.tensor(123.0))
    if case == "no_clip_range":
        options.update(epsilon_low=0.0, epsilon_high=0.0, delta=1.0)
    _compare(backend, logps, old, adv, mask, **options)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_changing_scalars_in_one_process(backend):
    """The compiled function must not reuse a graph built for other clip bounds, dual clip or beta (the scalars
    travel as a tensor because torch 2.13 reused one; see compiled.scalar_params)."""
    logps, old, ref, adv, mask, _ = _inputs(spread=0.8)
    for eps_high, delta, beta in ((0.2, None, 0.1), (0.28, None, 0.1), (0.28, 1.1, 0.1), (0.2, 1.1, 0.5)):
        _compare(backend, logps, old, adv, mask, ref_logps_BT=ref, beta=beta, epsilon_high=eps_high, delta=delta)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_realistic_shape_long_rows(backend):
    """Rows longer than one Triton block (T = 1500 > 1024 positions per loop step), 8 sequences."""
    logps, old, ref, adv, mask, entropy = _inputs(8, 1500)
    for level in ("token", "sequence"):
        _compare(backend, logps, old, adv, mask, ref_logps_BT=ref, beta=0.04, importance_sampling_level=level,
                 loss_type="grpo", entropy_BT=entropy, top_entropy_quantile=0.2)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_extreme_values_stay_finite(backend):
    """Log-ratios of +-30 (ratios 1e-13 .. 1e13), KL gaps of 40, log-probs near -1e4, and garbage on padding:
    -inf old log-probs and NaN reference log-probs where the mask is 0. The fast backends select masked positions
    out (so they stay finite); they must equal the reference run on the same inputs with the padding cleaned."""
    logps, old, ref, adv, mask, entropy = _inputs()
    logps = logps - 1e4
    old = logps + 30.0 * torch.sign(torch.randn_like(logps))
    ref = logps + 40.0 * torch.sign(torch.randn_like(logps))
    dirty_old = old.masked_fill(~mask, -math.inf)
    dirty_ref = ref.masked_fill(~mask, math.nan)
    for level in ("token", "sequence"):
        options = {"beta": 0.01, "importance_sampling_level": level, "kl_estimator": "k2", "entropy_BT": entropy}
        expected, grad_expected = _run("reference", logps, old, adv, mask, ref_logps_BT=ref, **options)
        actual, grad_actual = _run(backend, logps, dirty_old, adv, mask, ref_logps_BT=dirty_ref, **options)
        assert torch.isfinite(actual.loss) and torch.isfinite(grad_actual).all()
        assert_close(actual.loss, expected.loss, name="loss", rtol=1e-5)
        assert_close(grad_actual, grad_expected, name="grad logps")


def test_hand_derived_token_level():
    """old = 0, logps = [ln 1.5, ln 0.5], eps 0.2, one sequence, dapo (mean over the 2 tokens).
    A = +1: ratios 1.5 (clipped to 1.2) and 0.5 -> loss = -(1.2 + 0.5) / 2 = -0.85; d/dlogp = [0, -0.5 / 2].
    A = -1: min(-1.5, -1.2) = -1.5 and min(-0.5, -0.8) = -0.8 -> loss = (1.5 + 0.8) / 2 = 1.15;
    d/dlogp = [1.5 / 2, 0]; token 2 is low-clipped (0.5 < 0.8, A < 0): clip_ratio_low = 0.5."""
    logps = torch.tensor([[math.log(1.5), math.log(0.5)]])
    mask = torch.ones(1, 2)
    for backend in ("reference", *FAST_BACKENDS):
        out, grad = _run(backend, logps, torch.zeros(1, 2), torch.tensor([1.0]), mask)
        assert_close(out.loss, torch.tensor(-0.85), name=backend)
        assert_close(grad, torch.tensor([[0.0, -0.25]]), name=backend)
        out, grad = _run(backend, logps, torch.zeros(1, 2), torch.tensor([-1.0]), mask)
        assert_close(out.loss, torch.tensor(1.15), name=backend)
        assert_close(grad, torch.tensor([[0.75, 0.0]]), name=backend)
        assert_close(out.clip_ratio_low, torch.tensor(0.5), name=backend)
        assert_close(out.clip_ratio_high, torch.tensor(0.0), name=backend)


def test_hand_derived_sequence_level_aggregations():
    """GSPO, 2 rows. Row 0: 2 tokens with log-ratios [ln 2, 0] -> r = exp(ln 2 / 2) = 1.414 > 1.2, A = +1: clipped,
    per-token loss -1.2, no gradient. Row 1: 1 token, log-ratio 0 -> r = 1, A = -1: per-token loss +1, gradient
    -A r / n = 1 times the token weight. grpo: (-1.2 + 1) / 2 = -0.1, token weight 1 / (2 * 1) -> grad 0.5;
    bnpo: (2 * -1.2 + 1) / 3 = -0.46667, grad 1/3; dr_grpo (L = 4): (-2.4 + 1) / 8 = -0.175, grad 1/8.
    k3 KL of a gap d = ln 2: exp(-d) + d - 1 = ln 2 - 0.5 = 0.19315 (the kl metric with ref = logps - ln 2)."""
    logps = torch.tensor([[math.log(2.0), 0.0], [0.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0])
    cases = {"grpo": (-0.1, 0.5), "bnpo": (-1.4 / 3, 1 / 3), "dr_grpo": (-0.175, 0.125)}
    for backend in ("reference", *FAST_BACKENDS):
        for loss_type, (loss, grad_token) in cases.items():
            out, grad = _run(backend, logps, torch.zeros(2, 2), adv, mask, importance_sampling_level="sequence",
                             loss_type=loss_type, max_completion_length=4, ref_logps_BT=logps - math.log(2.0))
            assert_close(out.loss, torch.tensor(loss), name=f"{backend} {loss_type}")
            assert_close(grad, torch.tensor([[0.0, 0.0], [grad_token, 0.0]]), name=f"{backend} {loss_type}")
            assert_close(out.kl, torch.tensor(math.log(2.0) - 0.5), name=f"{backend} kl")
            # One of the two sequences is high-clipped: shares of sequences at sequence level.
            assert_close(out.clip_ratio_high, torch.tensor(0.5), name=f"{backend} clip")


def _trl_loss(logps, old, ref, adv, mask, entropy, *, loss_type, level, beta, eps_low, eps_high, delta, quantile,
              max_completion_length, num_items):
    """TRL 1.16's ``GRPOTrainer._compute_loss`` on given tensors: a stand-in ``self`` with one process, no vLLM
    and no gradient accumulation, whose model call returns our log-probs and entropies."""
    from trl import GRPOTrainer

    accelerator = types.SimpleNamespace(
        num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
        pad_across_processes=lambda x, dim, pad_index: x, reduce=lambda x, reduction: x,
    )
    fake = types.SimpleNamespace(
        accelerator=accelerator, top_entropy_quantile=quantile, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        use_vllm=False, model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        args=types.SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=1),
    )
    fake.get_high_entropy_mask = partial(GRPOTrainer.get_high_entropy_mask, fake)
    fake._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropy, None)
    num_rows = logps.shape[0]
    inputs = {"prompt_ids": torch.zeros(num_rows, 1, dtype=torch.long), "prompt_mask": torch.ones(num_rows, 1),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(num_items))}
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reference_matches_trl(level, loss_type):
    pytest.importorskip("trl")
    logps, old, ref, adv, mask, entropy = _inputs(4, 29)
    options = {"beta": 0.04, "eps_low": 0.2, "eps_high": 0.28, "delta": 1.3, "quantile": 0.5, "max_completion_length": 32,
                   "num_items": 57.0}
    leaf = logps.clone().requires_grad_()
    trl_loss, metrics = _trl_loss(leaf, old, ref, adv, mask, entropy, loss_type=loss_type, level=level, **options)
    trl_loss.backward()
    ours = logps.clone().requires_grad_()
    out = policy_loss_reference(
        ours, old, adv, mask, ref_logps_BT=ref, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, delta=1.3,
        importance_sampling_level=level, loss_type=loss_type, max_completion_length=32, num_items_in_batch=57.0,
        entropy_BT=entropy, top_entropy_quantile=0.5,
    )
    out.loss.backward()
    assert_close(out.loss, trl_loss.detach(), name="loss")
    assert_close(ours.grad, leaf.grad, name="grad")
    for ours_name, trl_name in (("kl", "kl"), ("entropy", "entropy"), ("clip_ratio_low", "clip_ratio/low_mean"),
                                ("clip_ratio_high", "clip_ratio/high_mean"),
                                ("clip_ratio_region", "clip_ratio/region_mean")):
        assert_close(getattr(out, ours_name), torch.tensor(metrics[trl_name][0]), name=ours_name)


def test_entropy_keep_matches_reference_quantile_bitwise():
    """The sort-based mask of the fast paths equals torch.quantile's (TRL's) exactly, ties and all."""
    for trial in range(60):
        entropy = torch.rand(3, 47) * 3
        if trial % 2:
            entropy = torch.round(entropy * 2) / 2  # many ties at the threshold
        mask = torch.rand(3, 47) > 0.3
        quantile = float(torch.rand(()))
        keep = compiled.high_entropy_keep(entropy, mask.float(), quantile)
        assert torch.equal(keep.bool(), high_entropy_mask(entropy, mask, quantile)), trial
    assert not compiled.high_entropy_keep(torch.rand(2, 3), torch.zeros(2, 3), 0.2).any()


@pytest.mark.parametrize("backend", ("reference", *FAST_BACKENDS))
def test_a_given_entropy_threshold_replaces_the_local_quantile(backend):
    """``entropy_threshold`` (the quantile a trainer gathered over every process): the policy term keeps exactly the
    masked-in tokens at or above it; the local quantile handed back as the threshold gives the default loss; with
    ``top_entropy_quantile`` 1 it is refused."""
    torch.manual_seed(3)
    logps = (torch.randn(4, 9) * 0.3 - 2.0).requires_grad_()
    old, adv = logps.detach() + torch.randn(4, 9) * 0.1, torch.randn(4)
    mask = torch.rand(4, 9) > 0.2
    entropy = torch.rand(4, 9) * 3
    options = {"entropy_BT": entropy, "top_entropy_quantile": 0.4, "loss_type": "grpo"}
    with fusedrl.use_kernels(policy_loss=backend):
        default = ops.policy_loss(logps, old, adv, mask, **options)
        local = torch.quantile(entropy[mask], 0.6)
        handed_back = ops.policy_loss(logps, old, adv, mask, entropy_threshold=local, **options)
        assert torch.equal(handed_back.loss, default.loss)
        high = ops.policy_loss(logps, old, adv, mask, entropy_threshold=torch.tensor(2.5), **options)
    kept = mask & (entropy >= 2.5)
    expected = policy_loss_reference(logps, old, adv, mask & kept, loss_type="grpo")  # the kept tokens' term only
    (grad_high,) = torch.autograd.grad(high.loss, logps)
    (grad_expected,) = torch.autograd.grad(expected.loss, logps)
    assert torch.equal(grad_high != 0, kept & (grad_expected != 0))
    with pytest.raises(ValueError, match="entropy_threshold .* needs top_entropy_quantile < 1"):
        ops.policy_loss(logps, old, adv, mask, entropy_BT=entropy, entropy_threshold=torch.tensor(1.0))


@pytest.mark.parametrize("softcap", [None, 1.5], ids=["plain", "capped"])
@pytest.mark.parametrize("backend", ("reference", *FAST_BACKENDS))
def test_linear_policy_loss_matches_full_logits(backend, softcap):
    """Hidden states + head with bias and temperature 0.7 against full fp32 logits -> log_softmax -> reference loss;
    gradients of hidden, weight and bias. Capped: the logits are ``1.5 tanh(z / 1.5)`` of the head's output z
    (std ~1.2 here, so the cap bends most of them) before the temperature."""
    num_rows, num_cols, hidden_size, vocab = 3, 13, 16, 37
    hidden = torch.randn(num_rows, num_cols, hidden_size)
    weight = torch.randn(vocab, hidden_size) * 0.3
    bias = torch.randn(vocab) * 0.1
    ids = torch.randint(0, vocab, (num_rows, num_cols))
    mask = torch.rand(num_rows, num_cols) > 0.2
    mask[2] = False
    old = torch.randn(num_rows, num_cols) * 0.2 - 3.5
    ref = torch.randn(num_rows, num_cols) * 0.2 - 3.5
    adv = torch.randn(num_rows)
    options = {"ref_logps_BT": ref, "beta": 0.05, "loss_type": "grpo", "top_entropy_quantile": 0.5}

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    labels = ids.masked_fill(~mask, -100)
    logits = soft_cap(leaves[0] @ leaves[1].T + leaves[2], softcap)
    logps, entropy = token_logprobs_reference(logits, labels, temperature=0.7, with_entropy=True)
    expected = policy_loss_reference(logps, old, adv, mask, entropy_BT=entropy.detach(), **options)
    expected.loss.backward()

    fast = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with fusedrl.use_kernels(policy_loss=backend, linear_logprobs="reference" if backend == "reference" else backend):
        out = fusedrl.linear_policy_loss(fast[0], fast[1], ids, mask, old, adv, bias=fast[2], temperature=0.7,
                                         softcap=softcap, **options)
    out.loss.backward()
    assert_close(out.loss, expected.loss, name="loss")
    assert_close(out.logps, logps, name="logps")
    assert_close(out.entropy, entropy, name="entropy")
    assert_close(out.mean_entropy, expected.entropy, name="mean entropy")
    for name, got, want in zip(("hidden", "weight", "bias"), fast, leaves):
        assert_close(got.grad, want.grad, name=f"grad {name}", rtol=1e-4, atol=1e-5)


def test_linear_policy_loss_on_policy_and_without_entropy():
    """old_logps=None is on-policy (ratio 1): the loss is -mean(A) over tokens for dapo; no entropy requested ->
    mean_entropy None."""
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    ids, mask, adv = torch.randint(0, 11, (2, 5)), torch.ones(2, 5), torch.tensor([0.5, -2.0])
    out = fusedrl.linear_policy_loss(hidden, weight, ids, mask, None, adv, compute_entropy=False)
    assert_close(out.loss, torch.tensor(0.75))
    assert out.mean_entropy is None


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fullgraph_compile_and_opcheck(backend):
    logps, old, ref, adv, mask, entropy = _inputs()

    def step(leaf):
        out = fusedrl.policy_loss(leaf, old, adv, mask, ref_logps_BT=ref, beta=0.04, entropy_BT=entropy,
                                  top_entropy_quantile=0.3, importance_sampling_level="sequence", loss_type="grpo")
        return out.loss, out.kl, out.clip_ratio_region

    torch._dynamo.reset()
    with fusedrl.use_kernels(policy_loss=backend):
        compiled, eager = logps.clone().requires_grad_(), logps.clone().requires_grad_()
        torch.compile(step, fullgraph=True)(compiled)[0].backward()
        step(eager)[0].backward()
    assert_close(compiled.grad, eager.grad, name="grad")
    for sequence in (False, True):
        args = (logps.clone().requires_grad_(), old, adv, mask.float(), torch.full((3,), 0.01), (entropy > 1).float(),
                ref, 0.04, 0.2, 0.28, 1.5, sequence, "k3", "clip", [0.0] * 4, backend)
        torch.library.opcheck(ops._policy_rows_op, args)


def test_value_loss_and_kl_penalty():
    """v = 1, old = 0, R = 2, clip 0.2: v_clip = 0.2, max((1-2)^2, (0.2-2)^2) = 3.24 -> 1.62 and no gradient (the
    clipped branch wins); v = 0.1 is inside the clip range: 0.5 * 1.9^2 = 1.805, d/dv = v - R = -1.9.
    Masked mean over the two tokens of the first row only."""
    values = torch.tensor([[1.0, 0.1], [7.0, 7.0]], requires_grad=True)
    old, returns = torch.zeros(2, 2), torch.full((2, 2), 2.0)
    mask = torch.tensor([[1, 1], [0, 0]])
    loss = fusedrl.value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert_close(loss, torch.tensor((1.62 + 1.805) / 2))
    loss.backward()
    assert_close(values.grad, torch.tensor([[0.0, -1.9 / 2], [0.0, 0.0]]))
    assert_close(loss.detach(), value_loss_reference(values, old, returns, mask).detach())
    d = torch.tensor([0.5, -1.0])
    assert_close(fusedrl.kl_penalty(d, torch.zeros(2), "k1"), d)
    assert_close(fusedrl.kl_penalty(d, torch.zeros(2), "k2"), torch.tensor([0.125, 0.5]))
    assert_close(fusedrl.kl_penalty(d, torch.zeros(2)), torch.tensor([math.exp(-0.5) - 0.5, math.e - 2.0]))


def test_ratio_weighted_kl_hand_derived():
    """One row, mask [1, 1], old = ref = 0, logps = [ln 2, 0], dapo over the 2 tokens. k3 = exp(-d) + d - 1 with
    d = logp - ref: [ln 2 - 0.5, 0]; ratios exp(logp - old) = [2, 1] -> loss = 2 (ln 2 - 0.5) / 2 = ln 2 - 0.5
    = 0.19315, and the kl metric (token mean) the same. d/dlogp of k3 * r = (k3' + k3) r with k3' = 1 - exp(-d):
    token 1 (0.5 + ln 2 - 0.5) * 2 / 2 = ln 2; token 2: 0."""
    for backend in ("reference", *FAST_BACKENDS):
        leaf = torch.tensor([[math.log(2.0), 0.0]], requires_grad=True)
        with fusedrl.use_kernels(policy_loss=backend):
            out = ops.ratio_weighted_kl(leaf, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2))
        out.loss.backward()
        assert_close(out.loss, torch.tensor(math.log(2.0) - 0.5), name=backend)
        assert_close(out.kl, torch.tensor(math.log(2.0) - 0.5), name=backend)
        assert_close(leaf.grad, torch.tensor([[math.log(2.0), 0.0]]), name=backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ratio_weighted_kl_backends_match_reference(backend, level, loss_type):
    """The fast backends aggregate with the custom op's per-row weights, the reference with TRL's formula: same
    values and gradients on the awkward (3, 47) shape with a fully masked row; on-policy too (ratio 1)."""
    logps, old, ref, _, mask, _ = _inputs(spread=0.8)
    options = {"importance_sampling_level": level, "loss_type": loss_type, "max_completion_length": 64,
               "num_items_in_batch": torch.tensor(57.0) if loss_type == "dapo" else None}
    for old_logps in (old, None):
        results = {}
        for name in ("reference", backend):
            leaf = logps.clone().requires_grad_()
            with fusedrl.use_kernels(policy_loss=name):
                out = ops.ratio_weighted_kl(leaf, old_logps, ref, mask, **options)
            out.loss.backward()
            results[name] = (out, leaf.grad)
        (expected, grad_expected), (actual, grad_actual) = results["reference"], results[backend]
        assert_close(actual.loss, expected.loss, name="loss")
        assert_close(actual.kl, expected.kl, name="kl")
        assert_close(grad_actual, grad_expected, name="grad logps")


@pytest.mark.parametrize("backend", ("reference", *FAST_BACKENDS))
def test_ratio_weighted_kl_fullgraph_compile(backend):
    """GRPO's loss region compiles it with fullgraph=True (a tensor dapo normaliser, as the trainer passes): same
    value and gradient as eager."""
    logps, old, ref, _, mask, _ = _inputs(spread=0.8)

    def step(leaf):
        return ops.ratio_weighted_kl(leaf, old, ref, mask, importance_sampling_level="sequence",
                                     num_items_in_batch=torch.tensor(40.0)).loss

    torch._dynamo.reset()
    with fusedrl.use_kernels(policy_loss=backend):
        traced, eager = logps.clone().requires_grad_(), logps.clone().requires_grad_()
        loss_traced = torch.compile(step, fullgraph=True)(traced)
        loss_eager = step(eager)
    loss_traced.backward()
    loss_eager.backward()
    assert_close(loss_traced, loss_eager, name="loss")
    assert_close(traced.grad, eager.grad, name="grad")


def test_ratio_weighted_kl_bad_input_names_the_argument():
    logps, mask = torch.zeros(3, 6), torch.ones(3, 6)
    with pytest.raises(ValueError, match="ref_logps_BT"):
        ops.ratio_weighted_kl(logps, None, torch.zeros(3, 5), mask)
    with pytest.raises(ValueError, match="max_completion_length"):
        ops.ratio_weighted_kl(logps, None, logps, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        ops.ratio_weighted_kl(logps, None, logps, mask, importance_sampling_level="seq")


@pytest.mark.parametrize("backend", ("reference", *FAST_BACKENDS))
def test_selection_runs_that_backend_only(backend, monkeypatch):
    """One forward and backward per level: the selected implementation runs once per call, the others never (the
    backward is the custom op's saved-gradient multiply, not a second launch)."""
    spies = spy_policy_backends(monkeypatch)
    logps, old, ref, adv, mask, _ = _inputs()
    for level in ("token", "sequence"):
        _run(backend, logps, old, adv, mask, ref_logps_BT=ref, beta=0.1, importance_sampling_level=level)
    counts = {name: spy.call_count for name, spy in spies.items()}
    assert counts == {name: 2 if name == backend else 0 for name in counts}


@pytest.mark.parametrize(("options", "fragment"), [
    ({"loss_type": "ppo"}, "loss_type"),
    ({"kl_estimator": "k4"}, "kl_estimator"),
    ({"importance_sampling_level": "seq"}, "importance_sampling_level"),
    ({"loss_type": "dr_grpo"}, "max_completion_length"),
    ({"beta": 0.1}, "ref_logps_BT"),
    ({"top_entropy_quantile": 0.5}, "entropy_BT"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
    ({"epsilon_low": -0.1}, "epsilon_low"),
    ({"delta": 0.0}, "delta"),
    ({"num_items_in_batch": 0}, "num_items_in_batch"),
    ({"advantages": torch.zeros(4)}, "advantages"),
    ({"mask_BT": torch.ones(3, 5)}, "mask_BT"),
    ({"old_logps_BT": torch.zeros(3, 5)}, "old_logps_BT"),
    ({"logps_BT": torch.zeros(3, 6, 1)}, "logps_BT"),
])
def test_bad_input_names_the_argument(options, fragment):
    args = {"logps_BT": torch.zeros(3, 6), "old_logps_BT": None, "advantages": torch.zeros(3),
            "mask_BT": torch.ones(3, 6)}
    args.update({key: options.pop(key) for key in list(options) if key in args})
    with pytest.raises(ValueError, match=fragment):
        fusedrl.policy_loss(args["logps_BT"], args["old_logps_BT"], args["advantages"], args["mask_BT"], **options)
    with pytest.raises(ValueError, match="returns_BT"):
        fusedrl.value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="estimator"):
        fusedrl.kl_penalty(torch.zeros(2), torch.zeros(2), "k5")
