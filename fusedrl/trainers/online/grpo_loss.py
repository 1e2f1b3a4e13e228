"""The loss side of :class:`~fusedrl.trainers.online.grpo.GRPOTrainer`, as TRL 1.16's ``GRPOTrainer._compute_loss``:
the options each ``loss_type`` hands the policy-loss op, the entropy bonus with its adaptive controller, and the
metrics TRL logs for the loss.

Accumulation. TRL divides the loss of ``grpo``, ``bnpo``, ``dr_grpo``, ``sapo`` and ``luspo`` by the accumulation
steps; ``dapo``, ``cispo`` and ``vespo`` are normalised by the generation batch's token count instead
(``TOKEN_NORMALISED_LOSS_TYPES``). The entropy bonus ``- entropy_coef * H`` (``H`` the mean entropy of the tokens the
policy term acts on) is divided by the accumulation steps for every loss type. The op adds ``- c * H`` to the loss it
returns, so the coefficient it gets is ``entropy_coef`` when the trainer then divides the whole loss by the
accumulation steps, and ``entropy_coef / accumulation`` when it does not.

Adaptive control (Skywork-OR1, ``use_adaptive_entropy``): the bonus of an optimizer step uses the coefficient and
the gate left by the previous step (applied only while the last measured entropy is at most ``entropy_target``; the
first step measures nothing yet, so no bonus). Each micro-batch adds its entropy sum and token count to a window;
at the optimizer-step boundary (``accelerator.sync_gradients``) the window's totals are summed over processes, the
coefficient moves by ``entropy_coef_delta`` towards more bonus when that entropy is at or below the target (less
otherwise), clamped to ``[entropy_coef_min, entropy_coef_max]``, and the window restarts. Evaluation never moves it.
The controller's state travels in fusedrl's checkpoint state (``fusedrl_state``), so a resumed run continues it.

Top-entropy masking (``top_entropy_quantile < 1``): TRL takes the quantile over the masked-in entropies of every
process (``get_high_entropy_mask`` gathers them). On one process that is the op's own quantile over the micro-batch;
on several, :meth:`GRPOLossTerms._global_entropy_threshold` runs a no-grad entropy pass of the head (one head pass
more per micro-batch), gathers the entropies and hands the op the threshold (``entropy_threshold``), so the mask is
TRL's whatever the process count (tests/runtime/test_distributed_online.py: 2 processes log what 1 does).

Off-policy sequence masking (``off_policy_mask_threshold``) happens inside the op (``fusedrl.ops.policy.off_policy_keep``);
TRL logs nothing for it. :meth:`GRPOLossTerms.get_off_policy_mask` is TRL's static method of the same math.

Metrics (TRL's names): ``policy_loss`` (the loss before the bonus and the accumulation division) whenever the bonus
is on, ``entropy_coef`` at each optimizer step; ``clip_ratio/*`` for the clipped loss types, ``cispo_clip_ratio``
for cispo, ``vespo/phi_seq_mean`` for vespo, nothing more for sapo.

Legend: B completions in a micro-batch, C completion positions.
"""

from __future__ import annotations

import math

import torch

from fusedrl.ops.logprobs import linear_token_logprobs
from fusedrl.ops.policy import LOSS_TYPE_OBJECTIVES, entropy_quantile, off_policy_keep

TOKEN_NORMALISED_LOSS_TYPES = ("dapo", "cispo", "vespo")
_LOSS_TYPE_FIELDS = ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
                     "vespo_k_neg", "vespo_lambda_neg")
_STATE_KEY = "entropy_control"


def loss_type_options(args) -> dict:
    """The ``policy_loss`` keywords of the loss types' own config fields (SAPO's temperatures, VESPO's k / lambda)."""
    return {name: getattr(args, name) for name in _LOSS_TYPE_FIELDS}


def loss_mask(batch: dict) -> torch.Tensor:
    """``[B, C]`` the tokens the loss and its metrics count: the completion mask, times the tool mask (0 on tool
    results) of an agentic round."""
    mask = batch["completion_mask"]
    return mask if batch.get("tool_mask") is None else mask * batch["tool_mask"]


class GRPOLossTerms:
    """Mixed in before ``FusedTrainer`` by GRPOTrainer (and inherited by RLOOTrainer, whose config has no entropy
    bonus: TRL's RLOO has none). Attribute names are TRL's: ``entropy_coef``, ``use_adaptive_entropy``,
    ``_entropy_bonus_enabled``, ``_last_world_entropy``, ``_entropy_window_stats``."""

    def _global_entropy_threshold(self, hidden_BCH, weight_VH, bias_V, inputs: dict, softcap: float | None):
        """The top-entropy mask's threshold over every process's masked-in entropies (TRL's quantile), or None on one
        process or without the mask (the op's own quantile over the micro-batch is then TRL's)."""
        args = self.args
        if getattr(args, "top_entropy_quantile", 1.0) >= 1.0 or self.accelerator.num_processes == 1:
            return None
        mask_BC = loss_mask(inputs).bool()
        labels_BC = inputs["completion_ids"].masked_fill(~mask_BC, -100)
        with torch.no_grad(), self.head_region(hidden_BCH.device):
            entropy_BC = linear_token_logprobs(hidden_BCH.detach(), weight_VH.detach(), labels_BC,
                                               bias=None if bias_V is None else bias_V.detach(),
                                               temperature=args.temperature, with_entropy=True,
                                               softcap=softcap).entropy
        # Entropies are >= 0, so a negative pad marks the rows of processes with fewer tokens (TRL's sentinel).
        local = entropy_BC[mask_BC].float()
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=-1.0))
        return entropy_quantile(gathered[gathered >= 0], args.top_entropy_quantile)

    @staticmethod
    def get_off_policy_mask(advantages: torch.Tensor, per_token_logps: torch.Tensor,
                            sampling_per_token_logps: torch.Tensor, mask: torch.Tensor,
                            off_policy_threshold: float) -> torch.Tensor:
        """TRL's ``GRPOTrainer.get_off_policy_mask`` (same arguments): ``[B, 1]`` in ``mask``'s dtype, 1 keeps the
        sequence (advantage >= 0 or mean ``sampling - current`` log-prob over the mask <= threshold), 0 drops it."""
        return off_policy_keep(advantages, per_token_logps, sampling_per_token_logps, mask,
                               off_policy_threshold).to(mask.dtype)

    def _init_entropy_control(self, args) -> None:
        # RLOOConfig has none of these fields: the bonus stays off.
        self.entropy_coef = float(getattr(args, "entropy_coef", 0.0))
        self.use_adaptive_entropy = bool(getattr(args, "use_adaptive_entropy", False))
        # Fixed for the run: in adaptive mode the bonus stays enabled even at a coefficient of 0, so it can recover.
        self._entropy_bonus_enabled = self.entropy_coef != 0.0 or self.use_adaptive_entropy
        self._last_world_entropy = math.inf  # no measurement yet: the first window applies no adaptive bonus
        self._entropy_window_stats = None  # [entropy sum, token count] of the current accumulation window
        if self.use_adaptive_entropy and getattr(self, "_joint", None) is not None:
            # Joint mode runs compute_loss once per adapter in each micro-step: one controller would take each
            # optimizer step once per adapter, on a mix of their entropies.
            raise ValueError("use_adaptive_entropy=True keeps one entropy coefficient, but model_adapter_name trains "
                             "several adapters together: train them one at a time, or use a static entropy_coef "
                             "(use_adaptive_entropy=False)")

    def _entropy_coef_for_loss(self, mode: str, accumulation: int, device: torch.device) -> float | torch.Tensor:
        """The ``entropy_coef`` to hand the op this micro-batch: 0.0 without a bonus (the op then adds nothing), else
        a 0-d tensor (a tensor, so a compiled loss region does not recompile as the adaptive value moves) holding
        the coefficient of the previous optimizer step, gated and scaled for accumulation (module docstring)."""
        if not self._entropy_bonus_enabled:
            return 0.0
        coef = self.entropy_coef
        if self.use_adaptive_entropy and not self._last_world_entropy <= self.args.entropy_target:
            coef = 0.0
        if self.args.loss_type in TOKEN_NORMALISED_LOSS_TYPES:
            coef = coef / accumulation
        return torch.tensor(coef, dtype=torch.float32, device=device)

    @torch.no_grad()
    def _record_entropy_bonus(self, mode: str, out, entropy_coef) -> None:
        """TRL's ``policy_loss`` metric, the adaptive controller's window and update, and the ``entropy_coef``
        metric at optimizer-step boundaries."""
        if not self._entropy_bonus_enabled:
            return
        bonus_mean = out.bonus_entropy_sum / out.bonus_tokens.clamp(min=1.0)
        policy_loss = out.loss.detach().float() + entropy_coef * bonus_mean
        self.record(mode, "policy_loss", self.accelerator.gather(policy_loss.reshape(1)).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            stats = torch.stack([out.bonus_entropy_sum.float(), out.bonus_tokens.float()])
            self._entropy_window_stats = stats if self._entropy_window_stats is None \
                else self._entropy_window_stats + stats
            if self.accelerator.sync_gradients:
                total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (total[0] / total[1].clamp(min=1.0)).item()
                args = self.args
                if world_entropy <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self.record(mode, "entropy_coef", self.entropy_coef)

    # --- checkpoints: the controller continues where it was (runtime/resumable.py's state hooks) -----------------

    def fusedrl_state(self) -> dict:
        state = super().fusedrl_state()
        if self.use_adaptive_entropy:  # a static coefficient never changes: the config restores it
            state[_STATE_KEY] = {"entropy_coef": self.entropy_coef, "last_world_entropy": self._last_world_entropy}
        return state

    def load_fusedrl_state(self, state: dict) -> None:
        super().load_fusedrl_state(state)
        saved = state.get(_STATE_KEY)
        if saved is not None and self.use_adaptive_entropy:
            self.entropy_coef = float(saved["entropy_coef"])
            self._last_world_entropy = float(saved["last_world_entropy"])

    # --- TRL's loss metrics -------------------------------------------------------------------------------------

    @torch.no_grad()
    def _record_loss_metrics(self, mode: str, inputs: dict, out) -> None:
        mask = loss_mask(inputs).float()
        # Token means (sequence shares at sequence level) of this process's micro-batch, weighted across processes.
        tokens = mask.sum()
        if self.args.beta != 0.0:
            self.record(mode, "kl", self.weighted_mean(out.kl, tokens))
        self.record(mode, "entropy", self.masked_mean(out.entropy, loss_mask(inputs)))
        clipped = tokens if self.args.importance_sampling_level == "token" else mask.shape[0]
        objective = LOSS_TYPE_OBJECTIVES[self.args.loss_type]
        if objective == "cispo":  # the op reports its one clip share as clip_ratio_high
            self.record(mode, "cispo_clip_ratio", self.weighted_mean(out.clip_ratio_high, clipped))
        elif objective == "vespo":  # one weight per sequence with [B] advantages, as TRL's phi_seq
            per_sequence = inputs["advantages"].dim() == 1
            self.record(mode, "vespo/phi_seq_mean", self.weighted_mean(out.phi_mean, mask.shape[0] if per_sequence
                                                                       else tokens))
        elif objective == "clip":
            self._record_clip_metrics(mode, inputs, out, mask, clipped)

    def _record_clip_metrics(self, mode: str, inputs: dict, out, mask_BC: torch.Tensor, clipped) -> None:
        for key, value in (("low_mean", out.clip_ratio_low), ("high_mean", out.clip_ratio_high),
                           ("region_mean", out.clip_ratio_region)):
            self.record(mode, f"clip_ratio/{key}", self.weighted_mean(value, clipped))
        # Per-sequence extremes (TRL's clip_ratio/low_min and high_max) from the ratio the loss used.
        old = inputs.get("old_per_token_logps")
        log_ratio = out.logps.detach() - (out.logps.detach() if old is None else old)
        if self.args.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask_BC).sum(-1) / mask_BC.sum(-1).clamp(min=1.0))[:, None].expand_as(mask_BC)
        ratio = log_ratio.exp() if self.args.delta is None else log_ratio.exp().clamp(max=self.args.delta)
        advantages = inputs["advantages"].float()
        advantages = advantages[:, None] if advantages.dim() == 1 else advantages
        epsilon_high = self.args.epsilon if self.args.epsilon_high is None else self.args.epsilon_high
        low = ((ratio < 1 - self.args.epsilon) & (advantages < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
        per_sequence = [(x * mask_BC).sum(-1) / mask_BC.sum(-1) for x in (low, high)]  # NaN for empty rows, skipped
        low_seq, high_seq = (self.accelerator.gather(x) for x in per_sequence)
        self.record(mode, "clip_ratio/low_min", low_seq.nan_to_num(math.inf).min().item() if
                    (~low_seq.isnan()).any() else math.nan)
        self.record(mode, "clip_ratio/high_max", high_seq.nan_to_num(-math.inf).max().item() if
                    (~high_seq.isnan()).any() else math.nan)
