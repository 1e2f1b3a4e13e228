"""The loss types cispo / sapo / luspo / vespo and the entropy bonus of `policy_loss` and `linear_policy_loss` on
every backend (reference, compiled, triton, and the fused head of the GRPO trainer) against the reference: values,
metrics and gradients (of the log-probs and of the entropies); the reference against hand-derived numbers and
against TRL 1.16's own ``GRPOTrainer._compute_loss`` on the same tensors. Triton runs under TRITON_INTERPRET=1
(conftest), so shapes are small; the awkward one is (3, 47) with a fully masked row.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

import fusedrl
from fusedrl.ops import policy as ops
from fusedrl.ops.policy import compiled
from fusedrl.ops.policy.reference import policy_loss_reference
from tests.utils import assert_close

FAST_BACKENDS = ("compiled", "triton")
NEW_TYPES = ("cispo", "sapo", "luspo", "vespo")
METRICS = ("kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "entropy", "phi_mean",
           "bonus_entropy_sum", "bonus_tokens")
# Non-default parameters of every loss type, so a parameter that does not reach a backend shows.
TYPE_PARAMS = {"sapo_temperature_pos": 0.8, "sapo_temperature_neg": 1.3, "vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5,
               "vespo_k_neg": 2.5, "vespo_lambda_neg": 1.5}


def _inputs(num_rows=3, num_cols=47, *, spread=0.3, adv_per_token=False):
    """Log-probs around -1, old/ref within ``spread`` of them, entropies in [0, 3), one fully masked row."""
    logps = torch.randn(num_rows, num_cols) - 1.0
    old = logps + spread * torch.randn(num_rows, num_cols)
    ref = logps + spread * torch.randn(num_rows, num_cols)
    adv = torch.randn(num_rows, num_cols) if adv_per_token else torch.randn(num_rows)
    mask = torch.rand(num_rows, num_cols) > 0.3
    mask[1] = False
    return logps, old, ref, adv, mask, torch.rand(num_rows, num_cols) * 3


def _run(backend, logps, old, adv, mask, entropy=None, **options):
    """Loss, its metrics and the gradients of logps and (when given) the entropies on ``backend``."""
    leaf = logps.clone().requires_grad_()
    entropy_leaf = None if entropy is None else entropy.clone().requires_grad_()
    with fusedrl.use_kernels(policy_loss=backend):
        out = fusedrl.policy_loss(leaf, old, adv, mask, entropy_BT=entropy_leaf, **options)
    out.loss.backward()
    return out, leaf.grad, None if entropy_leaf is None else entropy_leaf.grad


def _compare(backend, logps, old, adv, mask, entropy=None, **options):
    expected, grad_expected, entropy_grad_expected = _run("reference", logps, old, adv, mask, entropy, **options)
    actual, grad_actual, entropy_grad_actual = _run(backend, logps, old, adv, mask, entropy, **options)
    assert_close(actual.loss, expected.loss, name="loss")
    assert_close(grad_actual, grad_expected, name="grad logps")
    assert (entropy_grad_actual is None) == (entropy_grad_expected is None)
    if entropy_grad_expected is not None:
        assert_close(entropy_grad_actual, entropy_grad_expected, name="grad entropy")
    for name in METRICS:
        want, got = getattr(expected, name), getattr(actual, name)
        assert (want is None) == (got is None), name
        if want is not None:
            assert_close(got, want, name=name)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_backends_match_reference(backend, level, loss_type):
    """k3 KL, a cispo cap near 1 (ratios on both sides), dual clip (luspo), the top-entropy mask and the entropy
    bonus together, on the awkward shape."""
    logps, old, ref, adv, mask, entropy = _inputs()
    _compare(backend, logps, old, adv, mask, entropy, ref_logps_BT=ref, beta=0.04, epsilon_high=1.05, delta=1.3,
             importance_sampling_level=level, loss_type=loss_type, num_items_in_batch=40.0, top_entropy_quantile=0.4,
             entropy_coef=0.3, **TYPE_PARAMS)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("loss_type", NEW_TYPES)
@pytest.mark.parametrize("case", ("on_policy", "adv_per_token", "no_ref_k2", "tensor_coef", "long_rows"))
def test_variants(backend, loss_type, case):
    """On-policy (ratio 1), [B, T] advantages (VESPO's weight and SAPO's temperature per token), no KL / the k2
    estimator, a 0-d tensor entropy coefficient (what the trainer passes), rows longer than one Triton block."""
    logps, old, ref, adv, mask, entropy = _inputs(4, 1100 if case == "long_rows" else 33,
                                                  adv_per_token=case == "adv_per_token", spread=0.6)
    options = {"ref_logps_BT": ref, "beta": 0.1, "loss_type": loss_type, "epsilon_high": 1.1, **TYPE_PARAMS}
    if case == "on_policy":
        old = None
    if case == "no_ref_k2":
        options.update(ref_logps_BT=None, beta=0.0, kl_estimator="k2")
    if case == "tensor_coef":
        options.update(entropy_coef=torch.tensor(0.25), importance_sampling_level="sequence")
    _compare(backend, logps, old, adv, mask, entropy, **options)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("loss_type", ("cispo", "sapo", "vespo"))
def test_extreme_values_stay_finite(backend, loss_type):
    """Log-ratios of +-30 per token (VESPO's sums clamp at 20 / ln 1e-8, its weight underflows to 0; CISPO's ratio
    1e13 is capped; SAPO's gate saturates) and garbage on padding (-inf old, NaN reference log-probs) that the fast
    backends select out: they must equal the reference on the cleaned inputs."""
    logps, old, ref, adv, mask, entropy = _inputs()
    old = logps + 30.0 * torch.sign(torch.randn_like(logps))
    options = {"beta": 0.01, "loss_type": loss_type, "epsilon_high": 5.0, "entropy_coef": 0.1}
    for level in ("token", "sequence"):
        expected, grad_expected, _ = _run("reference", logps, old, adv, mask, entropy, ref_logps_BT=ref,
                                          importance_sampling_level=level, **options)
        actual, grad_actual, _ = _run(backend, logps, old.masked_fill(~mask, -math.inf), adv, mask, entropy,
                                      ref_logps_BT=ref.masked_fill(~mask, math.nan),
                                      importance_sampling_level=level, **options)
        assert torch.isfinite(actual.loss) and torch.isfinite(grad_actual).all()
        assert_close(actual.loss, expected.loss, name=f"{level} loss", rtol=1e-5)
        assert_close(grad_actual, grad_expected, name=f"{level} grad")


def test_hand_derived_values():
    """One row, mask [1, 1], old = 0, A = +1, dapo-style mean over the 2 tokens unless said.
    cispo, logps [ln 1.5, ln 0.5], cap 1.2: capped ratios [1.2, 0.5], loss -(1.2 ln 1.5 + 0.5 ln 0.5) / 2 =
    -0.069992, d/dlogp = -[1.2, 0.5] / 2; one token of two above the cap: clip_ratio_high 0.5.
    sapo, same logps, tau = 1: gates sigma(+-0.5) sum to 1 -> loss -4 / 2 = -2; d/dlogp = -4 s (1 - s) r / 2 =
    [-0.705011, -0.235004]. With A = -1 (tau_neg = 1.05): loss (4 / 1.05) / 2 = 1.904762, d/dlogp [0.700605,
    0.233535].
    vespo, logps [0.1, 0.2]: log w = 0.3, phi = exp(3 + 2 * 0.3 - 3 e^0.3) = 0.637898; loss -phi (0.1 + 0.2) / 2
    = -0.095685; d/dlogp = -phi / 2 = -0.318949 each; phi_mean 0.637898.
    luspo, two rows on-policy, masks [1, 1] and [1, 0], A = [1, -1]: row sums -2 and +1, mean -0.5 (grpo: 0);
    d/dlogp -A / B: [[-0.5, -0.5], [0.5, 0]]."""
    ln = math.log
    mask, zeros = torch.ones(1, 2), torch.zeros(1, 2)
    for backend in ("reference", *FAST_BACKENDS):
        out, grad, _ = _run(backend, torch.tensor([[ln(1.5), ln(0.5)]]), zeros, torch.tensor([1.0]), mask,
                            loss_type="cispo", epsilon_high=1.2)
        assert_close(out.loss, torch.tensor(-0.0699923), name=f"{backend} cispo")
        assert_close(grad, torch.tensor([[-0.6, -0.25]]), name=f"{backend} cispo grad")
        assert_close(out.clip_ratio_high, torch.tensor(0.5), name=f"{backend} cispo clip")
        for adv, loss, expected_grad in ((1.0, -2.0, [-0.7050111, -0.2350037]),
                                         (-1.0, 4 / 1.05 / 2, [0.7006049, 0.2335350])):
            out, grad, _ = _run(backend, torch.tensor([[ln(1.5), ln(0.5)]]), zeros, torch.tensor([adv]), mask,
                                loss_type="sapo")
            assert_close(out.loss, torch.tensor(loss), name=f"{backend} sapo {adv}")
            assert_close(grad, torch.tensor([expected_grad]), name=f"{backend} sapo grad {adv}")
        out, grad, _ = _run(backend, torch.tensor([[0.1, 0.2]]), zeros, torch.tensor([1.0]), mask, loss_type="vespo")
        assert_close(out.loss, torch.tensor(-0.0956847), name=f"{backend} vespo")
        assert_close(grad, torch.full((1, 2), -0.3189491), name=f"{backend} vespo grad")
        assert_close(out.phi_mean, torch.tensor(0.6378983), name=f"{backend} phi")
        two_rows = torch.tensor([[1, 1], [1, 0]])
        out, grad, _ = _run(backend, torch.full((2, 2), -1.0), None, torch.tensor([1.0, -1.0]), two_rows,
                            loss_type="luspo")
        assert_close(out.loss, torch.tensor(-0.5), name=f"{backend} luspo")
        assert_close(grad, torch.tensor([[-0.5, -0.5], [0.5, 0.0]]), name=f"{backend} luspo grad")


def test_entropy_bonus_hand_derived():
    """coef 0.5, entropies [1, 3] on mask [1, 1]: H = 2, the loss drops by 1.0 and d/d entropy = -0.5 / 2 each.
    With top_entropy_quantile 0.5 the threshold is the median 2: only the second token counts, H = 3, drop 1.5,
    d/d entropy [0, -0.5]. entropy_coef = 0 leaves the loss bitwise unchanged and sends no gradient."""
    logps, mask, adv = torch.tensor([[-1.0, -2.0]]), torch.ones(1, 2), torch.tensor([1.0])
    entropy = torch.tensor([[1.0, 3.0]])
    for backend in ("reference", *FAST_BACKENDS):
        plain, _, _ = _run(backend, logps, None, adv, mask, entropy)
        out, _, entropy_grad = _run(backend, logps, None, adv, mask, entropy, entropy_coef=0.5)
        assert_close(out.loss, plain.loss - 1.0, name=backend)
        assert_close(entropy_grad, torch.tensor([[-0.25, -0.25]]), name=backend)
        assert (float(out.bonus_entropy_sum), float(out.bonus_tokens)) == (4.0, 2.0)
        out, _, entropy_grad = _run(backend, logps, None, adv, mask, entropy, entropy_coef=0.5,
                                    top_entropy_quantile=0.5)
        assert (float(out.bonus_entropy_sum), float(out.bonus_tokens)) == (3.0, 1.0)
        assert_close(entropy_grad, torch.tensor([[0.0, -0.5]]), name=backend)
        zero, _, entropy_grad = _run(backend, logps, None, adv, mask, entropy, entropy_coef=0.0)
        assert torch.equal(zero.loss, plain.loss) and entropy_grad is None


def _trl_loss(logps, old, ref, adv, mask, entropy, *, loss_type, level, beta, eps_high, delta, quantile, num_items,
              entropy_coef):
    """TRL 1.16's ``GRPOTrainer._compute_loss`` on given tensors: a stand-in ``self`` with one process, no vLLM, no
    accumulation and a static entropy coefficient, whose model call returns our log-probs and entropies."""
    from trl import GRPOTrainer

    accelerator = types.SimpleNamespace(
        num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x, sync_gradients=True,
        pad_across_processes=lambda x, dim, pad_index: x, reduce=lambda x, reduction: x,
    )
    args = types.SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=1, **TYPE_PARAMS)
    fake = types.SimpleNamespace(
        accelerator=accelerator, top_entropy_quantile=quantile, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high,
        use_vllm=False, model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=64, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        _entropy_bonus_enabled=entropy_coef != 0.0, aux_loss_enabled=False, args=args,
        _metrics=defaultdict(lambda: defaultdict(list)), get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    fake.get_high_entropy_mask = lambda *a: GRPOTrainer.get_high_entropy_mask(fake, *a)
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropy, None)
    num_rows = logps.shape[0]
    inputs = {"prompt_ids": torch.zeros(num_rows, 1, dtype=torch.long), "prompt_mask": torch.ones(num_rows, 1),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(num_items))}
    return GRPOTrainer._compute_loss(fake, None, inputs), fake._metrics["train"]


@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("loss_type", (*NEW_TYPES, "dapo"))
def test_reference_matches_trl(level, loss_type):
    """Loss, the gradients of log-probs and entropies, and every metric TRL logs for the loss type (kl, entropy,
    clip_ratio/*, cispo_clip_ratio, vespo/phi_seq_mean, policy_loss) with the k3 KL, the top-entropy mask and the
    entropy bonus."""
    pytest.importorskip("trl")
    logps, old, ref, adv, mask, entropy = _inputs(4, 29)
    options = {"beta": 0.04, "eps_high": 1.05, "delta": 1.3, "quantile": 0.5, "num_items": 57.0, "entropy_coef": 0.2}
    trl_leaves = [logps.clone().requires_grad_(), entropy.clone().requires_grad_()]
    trl_loss, metrics = _trl_loss(trl_leaves[0], old, ref, adv, mask, trl_leaves[1], loss_type=loss_type,
                                  level=level, **options)
    trl_loss.backward()
    ours = [logps.clone().requires_grad_(), entropy.clone().requires_grad_()]
    out = policy_loss_reference(
        ours[0], old, adv, mask, ref_logps_BT=ref, beta=0.04, epsilon_high=1.05, delta=1.3,
        importance_sampling_level=level, loss_type=loss_type, max_completion_length=64, num_items_in_batch=57.0,
        entropy_BT=ours[1], top_entropy_quantile=0.5, entropy_coef=0.2, **TYPE_PARAMS,
    )
    out.loss.backward()
    assert_close(out.loss, trl_loss.detach(), name="loss")
    for name, mine, theirs in zip(("grad logps", "grad entropy"), ours, trl_leaves):
        assert_close(mine.grad, theirs.grad, name=name)
    policy_loss = out.loss.detach() + 0.2 * out.bonus_entropy_sum / out.bonus_tokens
    expected = {"kl": out.kl, "entropy": out.entropy, "policy_loss": policy_loss}
    if loss_type == "cispo":
        expected["cispo_clip_ratio"] = out.clip_ratio_high
    elif loss_type == "vespo":
        expected["vespo/phi_seq_mean"] = out.phi_mean
    elif loss_type != "sapo":
        expected.update({"clip_ratio/low_mean": out.clip_ratio_low, "clip_ratio/high_mean": out.clip_ratio_high,
                         "clip_ratio/region_mean": out.clip_ratio_region})
    assert set(expected) | {"entropy_coef", "clip_ratio/low_min", "clip_ratio/high_max"} >= set(metrics)
    for name, value in expected.items():
        assert_close(value, torch.tensor(metrics[name][0]), name=name)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_fused_head_matches_reference(backend, level, loss_type):
    """The GRPO trainer's path: ``linear_policy_loss(fused=True)`` with the ratio-weighted KL and the entropy bonus
    (its gradient reaches hidden, weight and bias through the fused head's entropy gradient) against full fp32
    logits through the reference; then RLOO's summed log-probs on the same loss type."""
    num_rows, num_cols, hidden_size, vocab = 3, 11, 16, 37
    hidden, weight, bias = torch.randn(num_rows, num_cols, hidden_size), torch.randn(vocab, hidden_size) * 0.3, \
        torch.randn(vocab) * 0.1
    ids, mask = torch.randint(0, vocab, (num_rows, num_cols)), torch.rand(num_rows, num_cols) > 0.2
    mask[2] = False
    old, ref, adv = torch.randn(num_rows, num_cols) * 0.2 - 3.5, torch.randn(num_rows, num_cols) * 0.2 - 3.5, \
        torch.randn(num_rows)
    cases = [({"ratio_weighted": True, "ref_logps_BT": ref, "beta": 0.05, "importance_sampling_level": level}, old),
             ({"sum_log_probs": True}, (old * mask).sum(-1, keepdim=True))]
    for options, old_logps in cases:
        options.update(loss_type=loss_type, epsilon_high=1.05, entropy_coef=0.3, num_items_in_batch=20.0,
                       **TYPE_PARAMS)
        results = {}
        for name, fused in (("reference", False), (backend, True)):
            leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
            with fusedrl.use_kernels(policy_loss=name, linear_logprobs=name):
                out = fusedrl.linear_policy_loss(leaves[0], leaves[1], ids, mask, old_logps, adv, bias=leaves[2],
                                                 temperature=0.7, fused=fused, **options)
            out.loss.backward()
            results[name] = (out, [leaf.grad for leaf in leaves])
        (expected, expected_grads), (actual, actual_grads) = results["reference"], results[backend]
        for field in ("loss", "logps", "entropy", "mean_entropy", *METRICS):
            want, got = getattr(expected, field), getattr(actual, field)
            assert (want is None) == (got is None), field
            if want is not None:
                assert_close(got, want, name=field, rtol=1e-5, atol=2e-5)
        for name, got, want in zip(("hidden", "weight", "bias"), actual_grads, expected_grads):
            assert_close(got, want, name=f"grad {name}", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ("reference", *FAST_BACKENDS))
def test_ratio_weighted_kl_luspo_aggregation(backend):
    """luspo's aggregation of the ratio-weighted KL (row sums, mean over rows). One row of mask [1, 1], old = ref =
    0, logps [ln 2, 0]: k3 terms [ln 2 - 0.5, 0] times ratios [2, 1] -> loss 2 ln 2 - 1 = 0.386294 (a dapo mean
    would halve it); a fully masked second row adds 0 but halves the mean: 0.193147."""
    leaf = torch.tensor([[math.log(2.0), 0.0], [0.0, 0.0]], requires_grad=True)
    with fusedrl.use_kernels(policy_loss=backend):
        out = ops.ratio_weighted_kl(leaf, torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([[1, 1], [0, 0]]),
                                    loss_type="luspo")
    assert_close(out.loss, torch.tensor(math.log(2.0) - 0.5))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("objective", compiled.OBJECTIVES)
def test_fullgraph_compile_and_opcheck(backend, objective):
    """A loss region compiled with fullgraph=True taking the entropy coefficient as a 0-d tensor (as the trainer's
    adaptive controller passes it), equal to eager for two values; opcheck of the custom op on every objective at
    both levels."""
    loss_type = {"clip": "luspo", "cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}[objective]
    logps, old, ref, adv, mask, entropy = _inputs()

    def step(leaf, coef):
        out = fusedrl.policy_loss(leaf, old, adv, mask, ref_logps_BT=ref, beta=0.04, entropy_BT=entropy,
                                  entropy_coef=coef, loss_type=loss_type, epsilon_high=1.1, **TYPE_PARAMS)
        return out.loss

    torch._dynamo.reset()
    with fusedrl.use_kernels(policy_loss=backend):
        traced, eager = logps.clone().requires_grad_(), logps.clone().requires_grad_()
        compiled_step = torch.compile(step, fullgraph=True)
        for coef in (0.1, 0.4):
            assert_close(compiled_step(traced, torch.tensor(coef)), step(eager, torch.tensor(coef)), name="loss")
    params = compiled.objective_params(objective, epsilon_high=1.1, **TYPE_PARAMS)
    for sequence in (False, True):
        args = (logps.clone().requires_grad_(), old, adv, mask.float(), torch.full((3,), 0.01), (entropy > 1).float(),
                ref, 0.04, 0.2, 0.28, 1.5, sequence, "k3", objective, params, backend)
        torch.library.opcheck(ops._policy_rows_op, args)


@pytest.mark.parametrize(("options", "fragment"), [
    ({"loss_type": "gspo"}, "loss_type must be one of"),
    ({"loss_type": "sapo", "sapo_temperature_pos": 0.0}, "sapo_temperature_pos must be a finite number > 0"),
    ({"loss_type": "vespo", "vespo_k_neg": math.nan}, "vespo_k_neg must be a finite number"),
    ({"entropy_coef": 0.1}, "entropy_coef != 0 adds an entropy bonus: pass entropy_BT"),
    ({"entropy_coef": math.inf, "entropy_BT": torch.zeros(3, 6)}, "entropy_coef must be a finite number"),
    ({"entropy_coef": torch.zeros(2), "entropy_BT": torch.zeros(3, 6)}, "one-element float tensor"),
], ids=["loss_type", "sapo_temperature", "vespo_k", "coef_without_entropy", "coef_inf", "coef_shape"])
def test_bad_input_names_the_argument(options, fragment):
    with pytest.raises(ValueError, match=fragment):
        fusedrl.policy_loss(torch.zeros(3, 6), None, torch.zeros(3), torch.ones(3, 6), **options)
