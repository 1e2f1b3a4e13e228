"""The compiled backend of the ``ddim_logprob`` op: one DDIM step, its log-prob and the log-prob's analytic
gradient in plain torch over ``[B, N]``, the formulation ``torch.compile`` fuses into one loop. ``triton.py`` has the
same entry points (:func:`ddim_step_fwd`, :func:`ddim_step_bwd`) with the same arguments and results.

Legend: B samples, N latent elements per sample (C * h * w flattened). Every computation is fp32.

The step is ``reference.py``'s (read its docstring). For every prediction type ``x0`` and ``eps`` are affine in the
model output m and the sample x, with per-sample coefficients:

    prediction      x0 = c_xm m + c_xx x                       eps = c_em m + c_ex x
    epsilon         c_xm = -sqrt(1-a_t)/sqrt(a_t), c_xx = 1/sqrt(a_t)    c_em = 1, c_ex = 0
    sample          c_xm = 1, c_xx = 0                         c_em = -sqrt(a_t)/sqrt(1-a_t), c_ex = 1/sqrt(1-a_t)
    v_prediction    c_xm = -sqrt(1-a_t), c_xx = sqrt(a_t)      c_em = sqrt(a_t), c_ex = sqrt(1-a_t)

so the prediction type is data (a code in ``params``), not a graph of its own. With ``in = 1[-R <= x0 <= R]``
(clamp passes the gradient on its closed interval, as ``torch.clamp``'s backward; always 1 without clipping) and
``dir = sqrt(1 - a_p - std^2)``:

    d mean / d m = sqrt(a_p) in c_xm + dir c_em,        d mean / d x = sqrt(a_p) in c_xx + dir c_ex

The log-prob holds ``prev`` constant, so with ``r = prev - mean``: ``d log_prob / d m_i = r_i / (std^2 N) *
d mean_i / d m_i`` (same for x), and a drawn ``prev = mean + std * noise`` passes its upstream gradient ``g`` on as
``g * d mean / d m``. The forward writes ``d log_prob / d m`` when that is the only gradient asked for (DDPO's
training step: the sample and ``prev`` are stored latents), so the backward is one multiply; otherwise the backward
(:func:`ddim_step_bwd`) recomputes ``mean`` from the saved inputs and forms every gradient in one pass. Where
``std = 0`` the log-prob is NaN (reference.py) and its gradient is taken as 0, so an unused log-prob never turns a
chain's gradient into NaN. The coefficient form rounds differently from the reference's formulas by an ulp or so.
"""

from __future__ import annotations

import torch

from fusedrl.ops.compiler import compile_kernel
from fusedrl.ops.ddim.reference import LOG_SQRT_2PI, PREDICTION_TYPES, ddim_std


def scalar_params(eta: float, clip_range: float, prediction_type: str, device: torch.device) -> torch.Tensor:
    """fp32 ``[3]``: eta, the clip range (inf: no clipping) and the prediction type's index in
    ``PREDICTION_TYPES``. Data, not Python constants: torch 2.13's ``compile(dynamic=True)`` was measured to reuse a
    graph compiled for other float arguments (ops/policy), and a string would be a graph per prediction type."""
    code = PREDICTION_TYPES.index(prediction_type)
    params = torch.tensor([eta, clip_range, code], dtype=torch.float32, device=device)
    # Its length stays static: else duck sizing gives a batch of B = 3 the same symbol and specialises it.
    torch._dynamo.mark_static(params, 0)
    return params


def affine_coefficients(alpha_t: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(c_xm, c_xx, c_em, c_ex)`` of the module docstring's table for prediction ``code``, shaped like
    ``alpha_t``."""
    sqrt_a, sqrt_b = alpha_t.sqrt(), (1.0 - alpha_t).sqrt()
    one, zero = torch.ones_like(alpha_t), torch.zeros_like(alpha_t)
    table = ((-sqrt_b / sqrt_a, 1.0 / sqrt_a, one, zero),  # epsilon
             (one, zero, -sqrt_a / sqrt_b, 1.0 / sqrt_b),  # sample
             (-sqrt_b, sqrt_a, sqrt_a, sqrt_b))  # v_prediction
    return tuple(torch.where(code == 0, eps, torch.where(code == 1, smp, vel)) for eps, smp, vel in zip(*table))


def _step(model_BN, sample_BN, alphas_B2, params_3):
    """``(mean [B, N], d mean / d m [B, N], d mean / d x [B, N], std [B, 1])``, fp32."""
    alpha_t, alpha_prev = alphas_B2[:, 0:1], alphas_B2[:, 1:2]
    eta, clip_range, code = params_3[0], params_3[1], params_3[2]
    c_xm, c_xx, c_em, c_ex = affine_coefficients(alpha_t, code)
    m, x = model_BN.float(), sample_BN.float()
    x0 = c_xm * m + c_xx * x
    in_range = (x0 >= -clip_range) & (x0 <= clip_range)
    std = ddim_std(alpha_t, alpha_prev, eta)
    direction = (1.0 - alpha_prev - std**2).sqrt()
    sqrt_prev = alpha_prev.sqrt()
    mean = sqrt_prev * torch.clamp(x0, min=-clip_range, max=clip_range) + direction * (c_em * m + c_ex * x)
    dmean_dm = sqrt_prev * torch.where(in_range, c_xm, 0.0) + direction * c_em
    dmean_dx = sqrt_prev * torch.where(in_range, c_xx, 0.0) + direction * c_ex
    return mean, dmean_dm, dmean_dx, std


def _inv_var_n(std, num_cols):
    # 1 / (std^2 N), 0 where std = 0: the log-prob is NaN there and contributes no gradient.
    return torch.where(std > 0, 1.0 / (std * std * num_cols), 0.0)


def _log_prob(residual, std):
    return (-(residual**2) / (2.0 * std**2) - std.log() - LOG_SQRT_2PI).mean(1)


# One plain function per mode: torch.compile keeps one cache (and a recompile budget of 8, which under fullgraph=True
# raises when overrun) per function; input dtypes x inference mode x modes in a single function overran it.
def _fwd_draw(model_BN, sample_BN, noise_BN, alphas_B2, params_3):
    mean, _, _, std = _step(model_BN, sample_BN, alphas_B2, params_3)
    prev_BN = (mean + std * noise_BN.float()).to(sample_BN.dtype)
    return prev_BN, _log_prob(prev_BN.float() - mean, std)


def _fwd_score(model_BN, sample_BN, prev_BN, alphas_B2, params_3):
    mean, _, _, std = _step(model_BN, sample_BN, alphas_B2, params_3)
    return _log_prob(prev_BN.float() - mean, std)


def _fwd_score_grad(model_BN, sample_BN, prev_BN, alphas_B2, params_3):
    mean, dmean_dm, _, std = _step(model_BN, sample_BN, alphas_B2, params_3)
    residual = prev_BN.float() - mean
    return _log_prob(residual, std), residual * _inv_var_n(std, model_BN.shape[1]) * dmean_dm


def _bwd_log_prob(grad_lp_B, model_BN, sample_BN, prev_BN, alphas_B2, params_3):
    mean, dmean_dm, dmean_dx, std = _step(model_BN, sample_BN, alphas_B2, params_3)
    grad_mean = grad_lp_B.unsqueeze(1) * (prev_BN.float() - mean) * _inv_var_n(std, model_BN.shape[1])
    return grad_mean * dmean_dm, grad_mean * dmean_dx


def _bwd_chain(grad_prev_BN, grad_lp_B, model_BN, sample_BN, prev_BN, alphas_B2, params_3):
    mean, dmean_dm, dmean_dx, std = _step(model_BN, sample_BN, alphas_B2, params_3)
    grad_mean = grad_lp_B.unsqueeze(1) * (prev_BN.float() - mean) * _inv_var_n(std, model_BN.shape[1])
    grad_mean = grad_mean + grad_prev_BN.float()
    return grad_mean * dmean_dm, grad_mean * dmean_dx


def _plain(*tensors: torch.Tensor) -> list[torch.Tensor]:
    # Detached and contiguous: Dynamo guards on requires_grad and strides (the upstream gradient of a sum is an
    # expanded stride-0 tensor), each a graph of its own otherwise.
    return [t.detach().contiguous() for t in tensors]


def _alphas(alphas_B2: torch.Tensor) -> torch.Tensor:
    alphas_B2 = alphas_B2.detach().contiguous()
    # Its 2 columns stay static: else duck sizing gives a batch of B = 2 the same symbol and a graph of its own.
    torch._dynamo.mark_static(alphas_B2, 1)
    return alphas_B2


def ddim_step_fwd(
    model_output: torch.Tensor, sample: torch.Tensor, target: torch.Tensor, alphas: torch.Tensor, eta: float,
    clip_range: float, prediction_type: str, draw: bool, write_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compiled forward of ``fusedrl::ddim_logprob``: ``(prev [B, N] in sample's dtype, or [0] unless draw;
    log_prob fp32 [B]; d log_prob / d model_output fp32 [B, N], or [0] unless write_grad)``.

    model_output, sample: ``[B, N]``, any float dtype; target: ``[B, N]``, the noise when ``draw`` (prev = mean +
    std * noise), else the prev_sample to score; alphas: fp32 ``[B, 2]`` (a_t, a_p); clip_range: R, or inf for no
    clipping; prediction_type: epsilon / sample / v_prediction."""
    params = scalar_params(eta, clip_range, prediction_type, model_output.device)
    inputs = (*_plain(model_output, sample, target), _alphas(alphas), params)
    empty = model_output.new_empty(0, dtype=torch.float32)
    with torch.no_grad():  # the gradient is analytic; one grad mode for Dynamo to guard on
        if draw:
            # exact_casts: a half-precision draw is scored after its rounding, as stored (compiler.compile_options).
            prev, log_prob = compile_kernel(_fwd_draw, exact_casts=True)(*inputs)
            return prev, log_prob, empty
        if write_grad:
            return sample.new_empty(0), *compile_kernel(_fwd_score_grad)(*inputs)
        return sample.new_empty(0), compile_kernel(_fwd_score)(*inputs), empty


def ddim_step_bwd(
    grad_prev: torch.Tensor | None, grad_log_prob: torch.Tensor, model_output: torch.Tensor, sample: torch.Tensor,
    prev: torch.Tensor, alphas: torch.Tensor, eta: float, clip_range: float, prediction_type: str, sample_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled backward of ``fusedrl::ddim_logprob``: ``(grad model_output fp32 [B, N], grad sample fp32
    [B, N] or [0] unless sample_grad)`` from the upstream gradients of ``prev`` (``[B, N]``, None when ``prev`` was
    given or is unused) and ``log_prob`` (fp32 ``[B]``). prev: the scored ``[B, N]`` (drawn or given); the rest as
    :func:`ddim_step_fwd`. The graph always forms the sample's gradient (one more [B, N] write when it is dropped):
    a flag would double the graphs per function."""
    params = scalar_params(eta, clip_range, prediction_type, model_output.device)
    inputs = (*_plain(grad_log_prob.float(), model_output, sample, prev), _alphas(alphas), params)
    with torch.no_grad():
        if grad_prev is None:
            grad_model, grad_sample = compile_kernel(_bwd_log_prob)(*inputs)
        else:
            grad_model, grad_sample = compile_kernel(_bwd_chain)(*_plain(grad_prev), *inputs)
    return grad_model, grad_sample if sample_grad else grad_model.new_empty(0)
