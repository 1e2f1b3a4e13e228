"""RLOOTrainer: TRL 1.16's REINFORCE Leave-One-Out recipe on the GRPO machinery (``grpo.py``).

How it differs from GRPO (Ahmadian et al., https://huggingface.co/papers/2405.14782; TRL's ``RLOOTrainer``):

- advantages: each completion's baseline is the mean reward of the other G - 1 completions of its prompt
  (``fusedrl.rloo_advantages``), optionally whitened over the batch (``normalize_advantages``); no std scaling;
- the KL to the reference is a reward penalty, not a loss term: ``r <- r - beta * sum_t (old_logp - ref_logp)``
  (the k1 estimate summed over the completion, from the sampling-time log-probs); ``reward_clip_range`` clamps
  the reward before it;
- the importance ratio is per sequence, from the summed log-probs ``exp(sum_t logp - sum_t old_logp)``, clipped
  PPO-style and averaged over sequences (``fusedrl.policy_loss`` on ``[B, 1]`` sequence log-probs); old log-probs
  are always computed at sampling time;
- defaults: ``num_generations=2``, ``beta=0.05``; the loss is a plain mean (Trainer divides it for accumulation).

Legend: B completions in a micro-batch, C completion positions, H hidden, V vocabulary, N completions in a round.
"""

from __future__ import annotations

import math

import torch
from accelerate.utils import gather

from fusedrl.ops.advantages import rloo_advantages
from fusedrl.ops.policy import kl_penalty, linear_policy_loss
from fusedrl.trainers.online.grpo import GRPOTrainer
from fusedrl.trainers.online.rloo_config import RLOOConfig
from fusedrl.trainers.online.sampling import zero_std_groups


def _rloo_region(hidden_BCH, weight_VH, bias_V, completion_ids_BC, mask_BC, old_logps_BC, advantages_B,
                 args: RLOOConfig, softcap: float | None = None):
    """The loss region (compiled whole with ``compile=True``): completion hidden states -> fused head -> the clipped
    objective on summed log-probs, one "token" per sequence, averaged over sequences (``grpo`` aggregation), with the
    entropy from the same tiles (``linear_policy_loss(sum_log_probs=True, fused=True)``: 3 head passes; softcap: the
    head's soft cap). Returns the loss and the summed old log-probs."""
    old_B1 = (old_logps_BC * mask_BC).sum(-1, keepdim=True)
    out = linear_policy_loss(hidden_BCH, weight_VH, completion_ids_BC, mask_BC, old_B1, advantages_B, bias=bias_V,
                             temperature=args.temperature, sum_log_probs=True, epsilon_low=args.epsilon,
                             epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
                             loss_type="grpo", fused=True, softcap=softcap)
    return out, old_B1


class RLOOTrainer(GRPOTrainer):
    """REINFORCE Leave-One-Out, as ``trl.RLOOTrainer`` 1.16; arguments as :class:`GRPOTrainer` with an
    :class:`RLOOConfig`."""

    loss_is_scaled_for_ga = False
    config_class = RLOOConfig
    method = "RLOO"

    def _needs_old_logps(self) -> bool:
        return True  # the KL penalty and the sequence ratio both read them

    def _advantages(self, rewards_per_func: torch.Tensor, batch: dict, num_generations: int, mode: str):
        args = self.args
        rewards = self._weighted_rewards(rewards_per_func)
        if args.reward_clip_range is not None:
            rewards = rewards.clamp(min=args.reward_clip_range[0], max=args.reward_clip_range[1])
        if args.beta != 0.0:
            mask = batch["completion_mask"]
            per_token_kl = kl_penalty(batch["old_per_token_logps"], batch["ref_per_token_logps"], "k1") * mask
            rewards = rewards - args.beta * gather(per_token_kl.sum(-1))  # rewards are gathered, so is the KL
            self.record(mode, "kl", self.masked_mean(per_token_kl, mask))
        self.record(mode, "frac_reward_zero_std", zero_std_groups(rewards, num_generations).float().mean().item())
        return rloo_advantages(rewards, num_generations, normalize=args.normalize_advantages)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("return_outputs=True needs logits, which fusedrl's RLOOTrainer never builds")
        args, mode = self.args, self._mode()
        mask_BC = inputs["completion_mask"]
        hidden_BCH, aux_loss = self._completion_hidden(model, inputs, router_logits=self.aux_loss_enabled)
        weight_VH, bias_V = self._lm_head(model)
        with self.head_region(hidden_BCH.device):
            out, old_B1 = self.loss_region(_rloo_region)(
                hidden_BCH.to(weight_VH.dtype), weight_VH, bias_V, inputs["completion_ids"], mask_BC,
                inputs["old_per_token_logps"], inputs["advantages"], args, softcap=self.head_softcap(model))
        loss = out.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self.record(mode, "aux_loss", self.gathered_mean(aux_loss))
        logps_B1 = (out.logps.detach() * mask_BC).sum(-1, keepdim=True)
        self._record_sequence_metrics(mode, out.entropy.detach(), mask_BC, logps_B1, old_B1, inputs["advantages"],
                                      out)
        return loss

    @torch.no_grad()
    def _record_sequence_metrics(self, mode, entropy_BC, mask_BC, logps_B1, old_B1, advantages_B, out) -> None:
        self.record(mode, "entropy", self.masked_mean(entropy_BC, mask_BC))
        for key, value in (("low_mean", out.clip_ratio_low), ("high_mean", out.clip_ratio_high),
                           ("region_mean", out.clip_ratio_region)):
            self.record(mode, f"clip_ratio/{key}", self.gathered_mean(value))
        epsilon_high = self.args.epsilon if self.args.epsilon_high is None else self.args.epsilon_high
        ratio_B = (logps_B1 - old_B1).exp().squeeze(1)
        low = self.accelerator.gather(((ratio_B < 1 - self.args.epsilon) & (advantages_B < 0)).float())
        high = self.accelerator.gather(((ratio_B > 1 + epsilon_high) & (advantages_B > 0)).float())
        self.record(mode, "clip_ratio/low_min", low.min().item() if low.numel() else math.nan)
        self.record(mode, "clip_ratio/high_max", high.max().item() if high.numel() else math.nan)
