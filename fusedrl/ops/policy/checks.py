"""Input checks of the policy-loss ops: every error names the argument and says what would be accepted."""

from __future__ import annotations

import math

import torch

from fusedrl.ops import checks
from fusedrl.ops.policy.reference import IMPORTANCE_SAMPLING_LEVELS, KL_ESTIMATORS, LOSS_TYPES


def _check_like(name: str, tensor, like: torch.Tensor, *, floating: bool = True, like_name: str = "logps_BT") -> None:
    if floating:
        checks.check_float(name, tensor)
    elif not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(tensor.shape)}")
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device} but {like_name} is on {like.device}; move them together")


def _check_number(name: str, value, *, low: float, low_inclusive: bool = True) -> None:
    # Comparisons instead of math.isfinite: inside a compiled loss region the value may be a symbolic float, which
    # Dynamo compares but cannot pass to math.isfinite (a graph break).
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and -math.inf < value < math.inf
    ok = ok and (value >= low if low_inclusive else value > low)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>=' if low_inclusive else '>'} {low}, got {value!r}")


def _check_logps(logps_BT, old_logps_BT) -> None:
    checks.check_float("logps_BT", logps_BT, min_dim=2)
    if logps_BT.dim() != 2:
        raise ValueError(f"logps_BT must be [B, T] (sequences x completion positions), got {tuple(logps_BT.shape)}")
    if old_logps_BT is not None:
        _check_like("old_logps_BT", old_logps_BT, logps_BT)


def _check_aggregation(loss_type, max_completion_length, num_items_in_batch) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if loss_type == "dr_grpo" and (not isinstance(max_completion_length, int) or max_completion_length < 1):
        raise ValueError(f"loss_type='dr_grpo' divides by B * max_completion_length: pass max_completion_length as "
                         f"a positive int (the generation limit), got {max_completion_length!r}")
    if num_items_in_batch is not None:
        value = num_items_in_batch
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                                 f"{tuple(value.shape)}")
            if torch.compiler.is_compiling():
                value = None  # a host sync would break the graph; the value is the caller's
            else:
                value = float(value)
        if value is not None:
            _check_number("num_items_in_batch", value, low=0.0, low_inclusive=False)


def _check_level_and_estimator(importance_sampling_level, kl_estimator) -> None:
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}, got "
                         f"{importance_sampling_level!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {kl_estimator!r}")


def check_entropy_coef(entropy_coef) -> None:
    """A finite number or a one-element float tensor (a tensor is not read: a host sync would break a compiled
    graph, and the adaptive controller changes it every optimizer step)."""
    if isinstance(entropy_coef, torch.Tensor):
        if entropy_coef.numel() != 1 or not entropy_coef.is_floating_point():
            raise ValueError(f"entropy_coef must be a number or a one-element float tensor, got a "
                             f"{entropy_coef.dtype} tensor of shape {tuple(entropy_coef.shape)}")
        return
    _check_number("entropy_coef", entropy_coef, low=-math.inf)


def _check_loss_type_params(*, sapo_temperature_pos, sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos,
                            vespo_k_neg, vespo_lambda_neg) -> None:
    # SAPO divides by its temperatures; VESPO's k and lambda enter an exponent (lambda is floored at 1e-4 as TRL).
    _check_number("sapo_temperature_pos", sapo_temperature_pos, low=0.0, low_inclusive=False)
    _check_number("sapo_temperature_neg", sapo_temperature_neg, low=0.0, low_inclusive=False)
    for name, value in (("vespo_k_pos", vespo_k_pos), ("vespo_lambda_pos", vespo_lambda_pos),
                        ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_neg", vespo_lambda_neg)):
        _check_number(name, value, low=-math.inf)


def check_policy_request(logps_BT, old_logps_BT, advantages, mask_BT, *, ref_logps_BT, beta, epsilon_low,
                         epsilon_high, delta, importance_sampling_level, kl_estimator, loss_type,
                         max_completion_length, num_items_in_batch, entropy_BT, top_entropy_quantile,
                         entropy_coef=0.0, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                         vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                         off_policy_mask_threshold=None, entropy_threshold=None) -> None:
    _check_logps(logps_BT, old_logps_BT)
    _check_like("mask_BT", mask_BT, logps_BT, floating=False)
    checks.check_float("advantages", advantages)
    if advantages.shape not in (logps_BT.shape[:1], logps_BT.shape) or advantages.device != logps_BT.device:
        raise ValueError(f"advantages must be [B] = [{logps_BT.shape[0]}] or [B, T] = {list(logps_BT.shape)} on "
                         f"{logps_BT.device}, got {list(advantages.shape)} on {advantages.device}")
    if ref_logps_BT is not None:
        _check_like("ref_logps_BT", ref_logps_BT, logps_BT)
    if entropy_BT is not None:
        _check_like("entropy_BT", entropy_BT, logps_BT)
    _check_number("beta", beta, low=-math.inf)
    if beta != 0.0 and ref_logps_BT is None:
        raise ValueError(f"beta={beta} needs ref_logps_BT (the reference model's log-probs); pass them or beta=0.0")
    _check_number("epsilon_low", epsilon_low, low=0.0)
    _check_number("epsilon_high", epsilon_high, low=0.0)
    if delta is not None:
        _check_number("delta", delta, low=0.0, low_inclusive=False)
    _check_level_and_estimator(importance_sampling_level, kl_estimator)
    _check_aggregation(loss_type, max_completion_length, num_items_in_batch)
    _check_number("top_entropy_quantile", top_entropy_quantile, low=0.0)
    if top_entropy_quantile > 1.0:
        raise ValueError(f"top_entropy_quantile must lie in [0, 1] (1 keeps every token), got {top_entropy_quantile}")
    if entropy_threshold is not None and top_entropy_quantile >= 1.0:
        raise ValueError("entropy_threshold replaces the top_entropy_quantile mask's own quantile: it needs "
                         "top_entropy_quantile < 1")
    if top_entropy_quantile < 1.0 and entropy_BT is None:
        raise ValueError("top_entropy_quantile < 1 masks by entropy: pass entropy_BT (linear_policy_loss computes it)")
    check_entropy_coef(entropy_coef)
    if entropy_BT is None and (isinstance(entropy_coef, torch.Tensor) or entropy_coef != 0.0):
        raise ValueError("entropy_coef != 0 adds an entropy bonus: pass entropy_BT (linear_policy_loss computes it)")
    _check_loss_type_params(sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                            vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                            vespo_lambda_neg=vespo_lambda_neg)
    if off_policy_mask_threshold is not None:  # NaN would compare False and silently drop sequences
        _check_number("off_policy_mask_threshold", off_policy_mask_threshold, low=-math.inf)


def check_ratio_kl_request(logps_BT, old_logps_BT, ref_logps_BT, mask_BT, *, importance_sampling_level,
                           kl_estimator, loss_type, max_completion_length, num_items_in_batch) -> None:
    _check_logps(logps_BT, old_logps_BT)
    _check_like("ref_logps_BT", ref_logps_BT, logps_BT)
    _check_like("mask_BT", mask_BT, logps_BT, floating=False)
    _check_level_and_estimator(importance_sampling_level, kl_estimator)
    _check_aggregation(loss_type, max_completion_length, num_items_in_batch)


def check_value_request(values_BT, old_values_BT, returns_BT, mask_BT, clip_range_value) -> None:
    checks.check_float("values_BT", values_BT)
    for name, tensor in (("old_values_BT", old_values_BT), ("returns_BT", returns_BT)):
        _check_like(name, tensor, values_BT, like_name="values_BT")
    _check_like("mask_BT", mask_BT, values_BT, floating=False, like_name="values_BT")
    _check_number("clip_range_value", clip_range_value, low=0.0)
