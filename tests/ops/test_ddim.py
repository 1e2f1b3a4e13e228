"""Every backend of ``fusedrl.ddim_step_logprob`` against the reference (values and gradients), the reference
against TRL DDPO's ``scheduler_step`` written out below and against diffusers' own ``DDIMScheduler.step``, seeded
draws, the errors, and the custom ops under opcheck and ``torch.compile(fullgraph=True)``.

Schedulers are real diffusers ``DDIMScheduler``s configured as Stable Diffusion's. Triton runs under
TRITON_INTERPRET=1 (conftest).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

import fusedrl
from fusedrl.ops import ddim as ops
from tests.utils import assert_close, count_calls

BACKENDS = ("reference", "compiled", "triton")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SHAPES = {"awkward": (3, 4, 5, 7), "two_blocks": (2, 4, 17, 19)}  # 4 * 17 * 19 = 1292: two Triton blocks of 1024


def _scheduler(num_steps: int = 10, **overrides) -> DDIMScheduler:
    """Stable Diffusion's DDIM configuration (its scheduler_config.json), then set_timesteps."""
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
              "set_alpha_to_one": False, "steps_offset": 1}
    scheduler = DDIMScheduler(**{**config, **overrides})
    scheduler.set_timesteps(num_steps)
    return scheduler


def _trl_scheduler_step(scheduler, model_output, timestep, sample, eta, prev_sample=None, generator=None):
    """TRL 0.23 DDPO's ``scheduler_step`` (trl/models/modeling_sd_base.py), written out: timestep is a [B] tensor;
    the previous timestep is clamped to 0 before the final-alpha test, as TRL does."""
    def left_broadcast(t, shape):
        return t.reshape(t.shape + (1,) * (len(shape) - t.ndim)).broadcast_to(shape)

    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, scheduler.config.num_train_timesteps - 1)
    alpha_prod_t = scheduler.alphas_cumprod.gather(0, timestep.cpu())
    alpha_prod_t_prev = torch.where(prev_timestep.cpu() >= 0, scheduler.alphas_cumprod.gather(0, prev_timestep.cpu()),
                                    scheduler.final_alpha_cumprod)
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    alpha_prod_t = left_broadcast(alpha_prod_t, sample.shape)
    alpha_prod_t_prev = left_broadcast(alpha_prod_t_prev, sample.shape)
    beta_prod_t = 1 - alpha_prod_t
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        pred_epsilon = model_output
    elif prediction == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
    else:
        pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    if scheduler.config.clip_sample:
        pred_original_sample = pred_original_sample.clamp(-scheduler.config.clip_sample_range,
                                                          scheduler.config.clip_sample_range)
    std_dev_t = left_broadcast(eta * variance**0.5, sample.shape)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
    if prev_sample is None:
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        prev_sample = prev_sample_mean + std_dev_t * noise
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * std_dev_t**2) - torch.log(std_dev_t)
                - torch.log(torch.sqrt(2 * torch.as_tensor(np.pi))))
    return prev_sample.type(sample.dtype), log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def _inputs(shape, dtype=torch.float32, scale=1.0):
    model_output = (torch.randn(shape) * scale).to(dtype)
    return model_output, torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)


def _per_sample_timesteps(scheduler, num_rows):
    return scheduler.timesteps[torch.randint(0, len(scheduler.timesteps), (num_rows,))]


def _step(backend, scheduler, model_output, timestep, sample, **kwargs):
    with fusedrl.use_kernels(ddim_logprob=backend):
        return fusedrl.ddim_step_logprob(scheduler, model_output, timestep, sample, **kwargs)


def _grads(backend, scheduler, model_output, timestep, sample, up_prev, up_lp, *, draw, sample_grad, **kwargs):
    """Values and the gradients of ``<prev, up_prev> + <log_prob, up_lp>`` (prev only when drawn) w.r.t. the model
    output (and the sample)."""
    model_output = model_output.clone().requires_grad_()
    sample = sample.clone().requires_grad_(sample_grad)
    out = _step(backend, scheduler, model_output, timestep, sample, **kwargs)
    objective = (out.log_prob * up_lp).sum()
    if draw:
        objective = objective + (out.prev_sample.float() * up_prev).sum()
    leaves = (model_output, sample) if sample_grad else (model_output,)
    return out.prev_sample.detach(), out.log_prob.detach(), torch.autograd.grad(objective, leaves)


def test_hand_value():
    """a_t = 0.36 at timestep 1 of 2 training steps, one inference step: the previous timestep is -1, so
    a_p = final_alpha_cumprod = 0.64. sqrt(a_t) = 0.6, sqrt(1 - a_t) = 0.8, sqrt(a_p) = 0.8; var = 0.36 / 0.64 *
    (1 - 0.36 / 0.64) = 63 / 256 and eta = 0.36 / sqrt(var) gives std = 0.36, direction sqrt(0.36 - 0.1296) = 0.48.
    m = x = 1 (epsilon): x0 = (1 - 0.8) / 0.6 = 1/3, mean = 0.8 / 3 + 0.48 = 0.74667. Scoring prev = mean + std:
    log_prob = -1/2 - log 0.36 - log sqrt(2 pi) = -0.39729; d log_prob / d m = (prev - mean) / std^2 *
    (0.8 * -0.8 / 0.6 + 0.48) = -0.58667 / 0.36 = -1.62963. The scheduler is any object with DDIMScheduler's
    attributes."""
    scheduler = SimpleNamespace(
        alphas_cumprod=torch.tensor([0.9, 0.36]), final_alpha_cumprod=torch.tensor(0.64), num_inference_steps=1,
        config=SimpleNamespace(num_train_timesteps=2, prediction_type="epsilon", clip_sample=False,
                               clip_sample_range=1.0, thresholding=False),
    )
    eta = 0.36 / math.sqrt(63 / 256)
    mean = 0.8 / 3 + 0.48
    for backend in BACKENDS:
        model_output = torch.ones(1, 1, requires_grad=True)
        out = _step(backend, scheduler, model_output, 1, torch.ones(1, 1), eta=eta,
                    prev_sample=torch.tensor([[mean + 0.36]]))
        assert_close(out.log_prob, torch.tensor([-0.5 - math.log(0.36) - 0.5 * math.log(2 * math.pi)]), name=backend)
        out.log_prob.sum().backward()
        assert_close(model_output.grad, torch.tensor([[(0.8 * -0.8 / 0.6 + 0.48) / 0.36]]), name=backend)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", (False, True), ids=("noclip", "clip"))
@pytest.mark.parametrize("draw", (False, True), ids=("score", "draw"))
def test_reference_matches_trl_formula(prediction, clip, draw):
    """Stable Diffusion's configuration (set_alpha_to_one=False: TRL's clamp and fusedrl's final alpha agree), every
    timestep of 10 steps once per sample, values and gradients w.r.t. the model output and the sample."""
    scheduler = _scheduler(prediction_type=prediction, clip_sample=clip)
    shape = (len(scheduler.timesteps), 4, 5, 7)
    model_output, sample, given = _inputs(shape)
    timestep = scheduler.timesteps.flip(0)
    eta = 0.8
    trl_m, trl_x = model_output.clone().requires_grad_(), sample.clone().requires_grad_()
    trl_prev, trl_lp = _trl_scheduler_step(scheduler, trl_m, timestep, trl_x, eta, None if draw else given,
                                           torch.Generator().manual_seed(3) if draw else None)
    up_prev, up_lp = torch.randn(shape), torch.randn(shape[0])
    objective = (trl_lp * up_lp).sum() + ((trl_prev * up_prev).sum() if draw else 0.0)
    expected_grads = torch.autograd.grad(objective, (trl_m, trl_x))
    kwargs = {"generator": torch.Generator().manual_seed(3)} if draw else {"prev_sample": given}
    prev, log_prob, grads = _grads("reference", scheduler, model_output, timestep, sample, up_prev, up_lp,
                                   draw=draw, sample_grad=True, eta=eta, **kwargs)
    assert torch.equal(prev, trl_prev.detach() if draw else given)
    assert_close(log_prob, trl_lp.detach(), name="log_prob")
    for name, grad, expected in zip(("model_output", "sample"), grads, expected_grads):
        assert_close(grad, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), name=name)


@pytest.mark.parametrize("set_alpha_to_one", (False, True))
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", (0.0, 1.0))
def test_prev_sample_matches_diffusers_step(set_alpha_to_one, prediction, eta):
    """Every timestep down to the last one, whose previous timestep is < 0 and reads final_alpha_cumprod (1 with
    set_alpha_to_one=True, where the step is deterministic), against diffusers' own step given an equally seeded
    generator: the noise is diffusers' randn_tensor's (eta = 0 draws none, in both)."""
    scheduler = _scheduler(prediction_type=prediction, set_alpha_to_one=set_alpha_to_one, clip_sample=True)
    model_output, sample, _ = _inputs((2, 4, 5, 7))
    for seed, timestep in enumerate(scheduler.timesteps.tolist()):
        expected = scheduler.step(model_output, timestep, sample, eta=eta,
                                  generator=torch.Generator().manual_seed(seed)).prev_sample
        for backend in BACKENDS:
            out = _step(backend, scheduler, model_output, timestep, sample, eta=eta,
                        generator=torch.Generator().manual_seed(seed))
            assert_close(out.prev_sample, expected, name=f"{backend} t={timestep}")


def test_last_step_with_alpha_one_is_deterministic():
    """set_alpha_to_one=True: the last step lands on a_p = 1, std = 0. A draw returns the mean (the log-prob is
    NaN: no density), scoring a given sample there raises, and the gradient through the draw stays finite."""
    scheduler = _scheduler(set_alpha_to_one=True)
    last = int(scheduler.timesteps[-1])
    model_output, sample, given = _inputs((2, 4, 5, 7))
    expected = scheduler.step(model_output, last, sample, eta=1.0, variance_noise=torch.randn(2, 4, 5, 7)).prev_sample
    for backend in BACKENDS:
        leaf = model_output.clone().requires_grad_()
        out = _step(backend, scheduler, leaf, last, sample, eta=1.0, generator=torch.Generator().manual_seed(0))
        assert_close(out.prev_sample, expected, name=backend)
        assert torch.isnan(out.log_prob).all()
        (grad,) = torch.autograd.grad(out.prev_sample.sum(), leaf)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        with pytest.raises(ValueError, match="timestep: .*set_alpha_to_one"):
            _step(backend, scheduler, model_output, last, sample, eta=1.0, prev_sample=given)


@pytest.mark.parametrize("backend", ("compiled", "triton"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", (False, True), ids=("noclip", "clip"))
@pytest.mark.parametrize("mode", ("score", "score_sample_grad", "draw"))
def test_backends_match_reference(backend, dtype, prediction, clip, mode):
    """Per-sample timesteps on an awkward latent shape: values and gradients w.r.t. the model output (and the
    sample) of every backend against the reference on the same inputs. "score" takes the forward-formed gradient
    (DDPO's training step); the other modes run the backward op. A clip range of 1.5 clips some x0 and not others."""
    scheduler = _scheduler(prediction_type=prediction, clip_sample=clip, clip_sample_range=1.5)
    shape = SHAPES["awkward"]
    model_output, sample, given = _inputs(shape, dtype)
    timestep = _per_sample_timesteps(scheduler, shape[0])
    up_prev, up_lp = torch.randn(shape), torch.randn(shape[0])
    draw = mode == "draw"
    kwargs = {"eta": 0.7, "draw": draw, "sample_grad": mode != "score"}
    results = {}
    for name in ("reference", backend):
        step_kwargs = {"generator": torch.Generator().manual_seed(5)} if draw else {"prev_sample": given}
        results[name] = _grads(name, scheduler, model_output, timestep, sample, up_prev, up_lp, **kwargs,
                               **step_kwargs)
    (prev, log_prob, grads), (want_prev, want_lp, want_grads) = results[backend], results["reference"]
    assert prev.dtype == dtype and log_prob.dtype == torch.float32 and log_prob.shape == (shape[0],)
    assert_close(prev, want_prev, dtype=dtype, name="prev_sample")
    assert_close(log_prob, want_lp, dtype=dtype, name="log_prob")
    for grad, want in zip(grads, want_grads):
        assert grad.dtype == dtype
        assert_close(grad, want, dtype=dtype, rtol=1e-5, atol=1e-5 * float(want.abs().max()), name="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_blocks_and_scalar_timestep_tensor(backend):
    """N = 1292 spans two Triton programs per sample (the partial sums of the log-prob's mean); the timestep is a
    0-d tensor, as ``for t in scheduler.timesteps`` gives."""
    scheduler = _scheduler()
    model_output, sample, given = _inputs(SHAPES["two_blocks"])
    timestep = scheduler.timesteps[3]
    leaf = model_output.clone().requires_grad_()
    out = _step(backend, scheduler, leaf, timestep, sample, prev_sample=given)
    (grad,) = torch.autograd.grad(out.log_prob.sum(), leaf)
    m = model_output.clone().requires_grad_()
    _, trl_lp = _trl_scheduler_step(scheduler, m, timestep.repeat(2), sample, 1.0, given)
    (want,) = torch.autograd.grad(trl_lp.sum(), m)
    assert_close(out.log_prob, trl_lp.detach(), name="log_prob")
    assert_close(grad, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), name="grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_seeded_draws_reproduce_and_rescore(backend, dtype):
    """The same generator seed draws the same sample (bitwise, run to run); the noise is diffusers' randn_tensor's in
    the model output's dtype; scoring the returned sample again gives the log-prob of the draw (it was scored after
    rounding to the sample's dtype), and the given prev_sample comes back as the same tensor."""
    scheduler = _scheduler()
    model_output, sample, _ = _inputs(SHAPES["awkward"], dtype)
    timestep = _per_sample_timesteps(scheduler, 3)
    first, second = (_step(backend, scheduler, model_output, timestep, sample,
                           generator=torch.Generator().manual_seed(11)) for _ in range(2))
    assert torch.equal(first.prev_sample, second.prev_sample) and torch.equal(first.log_prob, second.log_prob)
    # TRL's step draws its noise with diffusers' randn_tensor in the model output's dtype.
    trl_prev, _ = _trl_scheduler_step(scheduler, model_output, timestep, sample, 1.0,
                                      generator=torch.Generator().manual_seed(11))
    assert_close(first.prev_sample, trl_prev, name="prev_sample vs TRL")
    rescored = _step(backend, scheduler, model_output, timestep, sample, prev_sample=first.prev_sample)
    assert rescored.prev_sample is first.prev_sample
    assert_close(rescored.log_prob, first.log_prob, dtype=torch.float32, name="rescored")


@pytest.mark.parametrize("backend", ("compiled", "triton"))
@pytest.mark.parametrize("clip", (False, True), ids=("noclip", "clip"))
def test_extreme_model_outputs_stay_finite(backend, clip):
    """Model outputs of +-1e4 (a diverged UNet) give log-probs near -1e8 / var, finite, and finite gradients that
    match the reference's to fp32 rounding, relative to their size."""
    scheduler = _scheduler(clip_sample=clip)
    model_output, sample, given = _inputs(SHAPES["awkward"], scale=1e4)
    timestep = _per_sample_timesteps(scheduler, 3)
    up_prev, up_lp = torch.randn(SHAPES["awkward"]), torch.randn(3)
    results = [_grads(name, scheduler, model_output, timestep, sample, up_prev, up_lp, draw=False, sample_grad=True,
                      prev_sample=given) for name in ("reference", backend)]
    (_, want_lp, want_grads), (_, log_prob, grads) = results
    for got, want in zip((log_prob, *grads), (want_lp, *want_grads)):
        assert torch.isfinite(got).all()
        scale = float(want.abs().max())
        assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


def _bad_call(case: str):
    """One bad call per case: (scheduler, model_output, timestep, sample, kwargs)."""
    scheduler = _scheduler()
    model_output, sample, given = _inputs((2, 4, 3, 3))
    args = [scheduler, model_output, 901, sample]
    kwargs: dict = {}
    if case == "no_set_timesteps":
        args[0] = DDIMScheduler()
    elif case == "not_a_scheduler":
        args[0] = object()
    elif case == "prediction_type":
        args[0] = _scheduler(prediction_type="flow")
    elif case == "thresholding":
        args[0] = _scheduler(thresholding=True)
    elif case == "eta_zero_scored":
        kwargs = {"eta": 0.0, "prev_sample": given}
    elif case == "eta_negative":
        kwargs = {"eta": -0.5}
    elif case == "eta_nan":
        kwargs = {"eta": float("nan")}
    elif case == "shape_mismatch":
        args[3] = sample[:, :3]
    elif case == "prev_shape_mismatch":
        kwargs = {"prev_sample": given[:1]}
    elif case == "generator_and_prev":
        kwargs = {"prev_sample": given, "generator": torch.Generator()}
    elif case == "generator_type":
        kwargs = {"generator": 3}
    elif case == "timestep_range":
        args[2] = 1000
    elif case == "timestep_tensor_range":
        args[2] = torch.tensor([1, -3])
    elif case == "timestep_float":
        args[2] = torch.tensor([1.0, 2.0])
    elif case == "timestep_shape":
        args[2] = torch.tensor([1, 2, 3])
    elif case == "unbatched":
        args[1], args[3] = model_output[0, 0, 0], sample[0, 0, 0]
    elif case == "int_model_output":
        args[1] = model_output.long()
    return args, kwargs


BAD_INPUTS = {
    "no_set_timesteps": "scheduler has no num_inference_steps; call scheduler.set_timesteps",
    "not_a_scheduler": "scheduler must be a diffusers DDIMScheduler",
    "prediction_type": "scheduler.config.prediction_type must be one of epsilon, sample, v_prediction, got 'flow'",
    "thresholding": "scheduler.config.thresholding=True is not supported",
    "eta_zero_scored": "eta must be > 0 to score a given prev_sample",
    "eta_negative": "eta must be a finite number >= 0",
    "eta_nan": "eta must be a finite number >= 0",
    "shape_mismatch": r"model_output \(2, 4, 3, 3\) on cpu must match sample \(2, 3, 3, 3\)",
    "prev_shape_mismatch": r"prev_sample \(1, 4, 3, 3\) on cpu must match sample",
    "generator_and_prev": "generator and prev_sample were both given",
    "generator_type": "generator must be a torch.Generator",
    "timestep_range": r"timestep must lie in \[0, 1000\), got 1000",
    "timestep_tensor_range": r"timestep must lie in \[0, 1000\), got values in \[-3, 1\]",
    "timestep_float": "timestep must hold integers",
    "timestep_shape": r"timestep must be an int, a 0-d tensor or one per sample \[2\]",
    "unbatched": "model_output must have at least 2 dimension",
    "int_model_output": "model_output must be float32, bfloat16 or float16",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_the_argument(case):
    args, kwargs = _bad_call(case)
    with pytest.raises(ValueError, match=BAD_INPUTS[case]):
        fusedrl.ddim_step_logprob(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_runs_that_backend_only(backend, monkeypatch):
    """Each selection runs its own implementation (spied where each backend's entry point is looked up), the
    backward op only when the forward did not form the gradient."""
    counts = count_calls(monkeypatch, {
        "reference": "fusedrl.ops.ddim:ddim_step_logprob_reference",
        "compiled": "fusedrl.ops.ddim.compiled:ddim_step_fwd", "triton": "fusedrl.ops.ddim.triton:ddim_step_fwd",
        "compiled_bwd": "fusedrl.ops.ddim.compiled:ddim_step_bwd", "triton_bwd": "fusedrl.ops.ddim.triton:ddim_step_bwd",
    })
    scheduler = _scheduler()
    model_output, sample, given = _inputs((2, 4, 3, 3))
    leaf = model_output.clone().requires_grad_()
    out = _step(backend, scheduler, leaf, 501, sample, prev_sample=given)
    out.log_prob.sum().backward()
    drawn = _step(backend, scheduler, leaf, 501, sample)
    drawn.prev_sample.sum().backward()
    expected = dict.fromkeys(counts, 0)
    expected[backend] = 2
    if backend != "reference":
        expected[f"{backend}_bwd"] = 1
    assert counts == expected


@pytest.mark.parametrize("backend", ("compiled", "triton"))
def test_opcheck_custom_ops(backend):
    model_output, sample, target = _inputs((3, 140))
    alphas = torch.tensor([[0.3, 0.4], [0.5, 0.6], [0.1, 0.9989]])
    for prediction, clip, draw, write_grad in (("epsilon", math.inf, True, False), ("v_prediction", 1.0, False, True),
                                               ("sample", 0.5, False, False)):
        args = (model_output.clone().requires_grad_(), sample.clone().requires_grad_(not write_grad), target, alphas,
                0.9, clip, prediction, draw, write_grad, backend)
        torch.library.opcheck(ops._step_op, args)
    for grad_prev, sample_grad in ((torch.randn(3, 140), True), (None, False)):
        args = (grad_prev, torch.randn(3), model_output, sample, target, alphas, 0.9, 1.0, "epsilon", sample_grad,
                backend)
        torch.library.opcheck(ops._step_backward_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile(backend):
    """A DDPO-style region (score a stored step, backpropagate its log-prob) and an AlignProp-style one (draw, keep
    the gradient through prev_sample) under torch.compile(fullgraph=True) match eager."""
    scheduler = _scheduler(prediction_type="v_prediction", clip_sample=True)
    model_output, sample, given = _inputs((2, 4, 5, 7))
    timestep = scheduler.timesteps[[2, 7]]

    def score(m):
        return fusedrl.ddim_step_logprob(scheduler, m, timestep, sample, eta=1.0, prev_sample=given).log_prob.sum()

    def draw(m):
        # torch.compile cannot trace a torch.Generator: a traced draw takes the global RNG.
        out = fusedrl.ddim_step_logprob(scheduler, m, timestep, sample, eta=1.0)
        return out.prev_sample.square().sum() + out.log_prob.sum()

    torch._dynamo.reset()
    with fusedrl.use_kernels(ddim_logprob=backend):
        for fn in (score, draw):
            eager_leaf, compiled_leaf = model_output.clone().requires_grad_(), model_output.clone().requires_grad_()
            torch.manual_seed(4)
            expected = fn(eager_leaf)
            expected.backward()
            torch.manual_seed(4)
            got = torch.compile(fn, fullgraph=True, backend="aot_eager")(compiled_leaf)
            got.backward()
            assert_close(got, expected, name=f"{fn.__name__} value")
            assert_close(compiled_leaf.grad, eager_leaf.grad, name=f"{fn.__name__} grad")
    torch._dynamo.reset()
