"""PPOTrainer: TRL's PPO recipe (``trl.experimental.ppo`` / TRL 0.2x ``PPOTrainer``) on fusedrl's fused ops.

How it differs from GRPO: a learned value model replaces the group baseline, so one completion per prompt suffices;
the reward is per token (a KL penalty to the reference at every token, the score at the last one), advantages come
from GAE over the completion, and the value model trains alongside the policy with a clipped loss.

One rollout (``per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches`` prompts per process):

1. sample one completion per prompt (``rollout.generate_completions``; it ends at EOS or ``stop_token_id``);
2. score it: reward functions / reward models (``rewards.score_completions``, weighted sum), minus
   ``missing_eos_penalty`` without EOS;
3. no-grad forwards in chunks of ``local_rollout_forward_batch_size``: old log-probs and values (one forward of
   :class:`~fusedrl.trainers.online.value_head.PolicyAndValue`) and reference log-probs, all at ``temperature``, from
   hidden states through the fused head (no ``[B, C, V]`` logits);
4. :func:`ppo_targets`: rewards ``-kl_coef * kl`` per token plus the score at the last completion token (optionally
   whitened, scale only), ``fusedrl.gae`` -> advantages and returns, advantages whitened (``masked_whiten``);
5. ``num_ppo_epochs`` passes over a fresh permutation of the rollout, ``num_mini_batches`` optimizer steps each: the
   clipped policy loss straight from hidden states (``linear_policy_loss``, ``cliprange``, token mean over the
   micro-batch as TRL) plus ``vf_coef`` x the clipped value loss (``value_loss``, ``cliprange_value``).

Design: PPO's loop maps onto ``transformers.Trainer`` as TRL's GRPO maps its own. Each dataloader batch is a whole
rollout batch (``sampling.RepeatSampler``), yielded ``num_ppo_epochs * num_mini_batches * gradient_accumulation_steps``
times; ``_prepare_inputs`` generates on the first and then hands out the buffered micro-batches, so every Trainer
step is one PPO minibatch update and the optimizer, scheduler, gradient clipping, accumulation, logging and
checkpoints are Trainer's own. The policy and value model form one module (one optimizer, as TRL). Checkpoints
and ``save_model`` write the policy as a normal model directory and the value model under ``value_model/``, plus
the counters and, when the checkpoint falls inside a rollout, its remaining minibatch plan (``online/resume.py``):
a resumed run finishes the interrupted rollout and repeats the uninterrupted run bitwise.

Differences from TRL: the score sits on the last completion token (TRL put it one position later, on the first
padding token, whenever one existed) and values are masked to the completion; completions end at EOS. On several
processes advantages are whitened over every process's rollout and the token means are of the global micro-batch
(TRL whitens and averages per process), so N processes log what one process with N times the batch logs.
TRL-named metrics: objective/{kl,entropy,non_score_reward,rlhf_reward,scores}, policy/{approxkl,clipfrac,entropy}_avg,
loss/{policy,value}_avg, val/{clipfrac_avg,ratio,ratio_var,num_eos_tokens}, episode, rewards/<name>/mean.

Legend: B rollout rows, P prompt positions, C completion positions, T = P + C, H hidden, V vocabulary.
"""

from __future__ import annotations

import copy
import math
import os
from typing import NamedTuple

import torch
from accelerate.utils import is_peft_model
from datasets import IterableDataset
from transformers import AutoModelForSequenceClassification, set_seed

from fusedrl.ops.advantages import masked_whiten
from fusedrl.ops.gae import gae
from fusedrl.ops.logprobs import linear_token_logprobs
from fusedrl.ops.policy import kl_penalty, linear_policy_loss, value_loss
from fusedrl.runtime.hidden import final_hidden_states
from fusedrl.trainers.base import FusedTrainer
from fusedrl.trainers.data.validation import check_prompt_dataset
from fusedrl.trainers.models import load_causal_lm, pretrained_kwargs, tokenizer_of
from fusedrl.trainers.online.common import RewardAttributes, rollout_scores, sequence_inputs
from fusedrl.trainers.online.ppo_config import PPOConfig
from fusedrl.trainers.online.resume import RoundCheckpointing, RoundState
from fusedrl.trainers.online.rollout import eos_token_ids_of, generate_completions
from fusedrl.trainers.online.row_seeds import trainer_row_seeds
from fusedrl.trainers.online.sampling import RepeatSampler, identity_collator
from fusedrl.trainers.online.value_head import PolicyAndValue, check_value_model, value_model_from_policy
from fusedrl.trainers.rewards import prepare_reward_models, resolve_rewards, reward_weights_tensor

VALUE_MODEL_DIR = "value_model"


class PPOTargets(NamedTuple):
    """fp32 ``[B, C]`` each, 0 outside the completion: ``advantages`` (whitened), ``returns``, the per-token
    ``rewards`` fed to GAE, the per-token ``kl`` estimate and ``non_score_reward = -kl_coef * kl``."""

    advantages: torch.Tensor
    returns: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    non_score_reward: torch.Tensor


@torch.no_grad()
def ppo_targets(scores_B, logps_BC, ref_logps_BC, values_BC, mask_BC, *, kl_coef: float, kl_estimator: str,
                whiten_rewards: bool, gamma: float, lam: float) -> PPOTargets:
    """Step 4 of the module docstring. ``mask_BC``: completion mask, at least one token per row."""
    mask = mask_BC.bool()
    kl_BC = kl_penalty(logps_BC, ref_logps_BC, estimator=kl_estimator) * mask
    non_score_BC = -kl_coef * kl_BC
    last_B = (mask.sum(1) - 1).clamp(min=0)
    rewards_BC = non_score_BC.clone()
    rewards_BC[torch.arange(rewards_BC.shape[0], device=mask.device), last_B] += scores_B.float()
    if whiten_rewards:
        rewards_BC = masked_whiten(rewards_BC, mask, shift_mean=False) * mask
    advantages_BC, returns_BC = gae(rewards_BC, values_BC.float() * mask, mask, gamma=gamma, lam=lam)
    advantages_BC = masked_whiten(advantages_BC, mask) * mask
    return PPOTargets(advantages_BC, returns_BC, rewards_BC, kl_BC, non_score_BC)


def _ppo_region(hidden_BCH, weight_VH, bias_V, completion_ids_BC, mask_BC, old_logps_BC, advantages_BC, values_BC,
                old_values_BC, returns_BC, args: PPOConfig, softcap: float | None = None):
    """The loss region (compiled whole with ``compile=True``): completion hidden states -> fused head -> clipped
    policy loss (``linear_policy_loss(fused=True)``: loss, gradient, entropy and clip counts from one pass over each
    logits tile, 3 head passes; softcap: the head's soft cap), plus the clipped value loss weighted by ``vf_coef``.
    Returns ``(loss, policy, vf_loss)``."""
    policy = linear_policy_loss(
        hidden_BCH, weight_VH, completion_ids_BC, mask_BC, old_logps_BC, advantages_BC, bias=bias_V,
        temperature=args.temperature, epsilon_low=args.cliprange, epsilon_high=args.cliprange, loss_type="bnpo",
        fused=True, softcap=softcap)
    vf_loss = value_loss(values_BC, old_values_BC, returns_BC, mask_BC, clip_range_value=args.cliprange_value)
    return policy.loss + args.vf_coef * vf_loss, policy, vf_loss


class PPOTrainer(RewardAttributes, RoundCheckpointing, FusedTrainer):
    """Proximal Policy Optimization for language models (https://arxiv.org/abs/1707.06347; the RLHF recipe of
    https://arxiv.org/abs/2403.17031), per the module docstring.

    ``model``: policy path or causal LM (PEFT via ``peft_config``); ``ref_model``: None = a frozen copy of the policy
    (or, for PEFT, the policy with adapters disabled); ``reward_funcs``: names, callables
    ``(prompts, completions, completion_ids, **columns) -> list[float]``, reward models or their paths (default
    ``args.reward_funcs`` + ``args.reward_model_path``); ``value_model``: an ``AutoModelForSequenceClassification``
    (``num_labels=1``) or its path, None = a copy of the policy's trunk with a zero head. ``train_dataset``: a
    map-style prompt-only dataset (``prompt`` column, other columns go to the reward functions).
    """

    policy_attribute = "policy"  # self.model is PolicyAndValue: the base's reference_context reads its .policy

    def __init__(self, model, ref_model=None, reward_funcs=None, args: PPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, reward_processing_classes=None,
                 value_model=None, peft_config=None, compute_metrics=None, callbacks=None, optimizers=(None, None)):
        if isinstance(train_dataset, IterableDataset):
            msg = "PPOTrainer needs a map-style Dataset (rollout batches are sampled by index), not an IterableDataset"
            raise ValueError(msg)  # noqa: TRY004
        args = self._checked_inputs(model, args, PPOConfig, train_dataset, compute_metrics)
        check_prompt_dataset(train_dataset, "train_dataset")
        set_seed(args.seed)
        policy, processing_class = self._setup_model(model, args, processing_class, peft_config=peft_config,
                                                     ref_model=ref_model, quantization_config=None)
        self._tokenizer = tokenizer_of(processing_class)
        value_model = self._value_model(value_model, policy, args)
        if isinstance(ref_model, str):
            ref_model = load_causal_lm(ref_model, args)
        elif ref_model is None and not is_peft_model(policy):
            ref_model = copy.deepcopy(policy)  # made here: the base would copy the policy *and* value model
        if reward_funcs is None:
            reward_funcs = list(args.reward_funcs or []) + ([args.reward_model_path] if args.reward_model_path else [])
        self.rewards = resolve_rewards(reward_funcs or None, reward_processing_classes,
                                       model_init_kwargs=args.model_init_kwargs,
                                       trust_remote_code=args.trust_remote_code)
        self.reward_weights = reward_weights_tensor(args.reward_weights, len(self.rewards))
        self._eos_token_ids = eos_token_ids_of(policy, self._tokenizer)
        if args.stop_token_id is not None and args.stop_token_id not in self._eos_token_ids:
            self._eos_token_ids.append(args.stop_token_id)

        super().__init__(model=PolicyAndValue(policy, value_model), args=args,
                         data_collator=data_collator or identity_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        self._finish_setup(ref_model, precompute=True)  # precompute=True: the reference is settled above
        self.rewards = prepare_reward_models(self.rewards, self.accelerator)  # sharded like the reference

        accumulation = args.gradient_accumulation_steps
        self._local_rollout_size = args.per_device_train_batch_size * accumulation * args.num_mini_batches
        self._global_rollout_size = self._local_rollout_size * self.accelerator.num_processes
        self._steps_per_rollout = args.num_ppo_epochs * args.num_mini_batches * accumulation
        if len(train_dataset) < self._global_rollout_size:
            raise ValueError(f"train_dataset has {len(train_dataset)} prompts, fewer than one rollout batch "
                             f"({self._global_rollout_size} = per_device_train_batch_size x "
                             "gradient_accumulation_steps x num_mini_batches x processes)")
        if args.total_episodes is not None and args.max_steps <= 0:
            args.max_steps = math.ceil(args.total_episodes / self._global_rollout_size) * (
                args.num_ppo_epochs * args.num_mini_batches)
        self._buffer: list[dict] = []
        self._step = self._num_rollouts = self._episodes = 0
        self.last_rollout: dict[str, torch.Tensor] = {}  # the latest rollout's tensors, for inspection and tests

    @staticmethod
    def _value_model(value_model, policy, args: PPOConfig):
        if value_model is None:
            value_model = value_model_from_policy(policy)
        elif isinstance(value_model, str):
            # pretrained_kwargs: trust_remote_code given in model_init_kwargs too (as TRL's scripts do) was a TypeError
            value_model = AutoModelForSequenceClassification.from_pretrained(
                value_model, num_labels=1, **pretrained_kwargs(args.model_init_kwargs, args.trust_remote_code,
                                                               default_dtype=None))
        check_value_model(value_model)
        return value_model

    # --- data: one dataloader batch per rollout, repeated once per micro-step -------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return RepeatSampler(dataset, mini_repeat_count=1, batch_size=self._global_rollout_size,
                             repeat_count=self._steps_per_rollout, shuffle=True, seed=self.args.seed)

    def get_train_dataloader(self):
        return self._get_dataloader(dataset=self.train_dataset, description="Training",
                                    batch_size=self._local_rollout_size, sampler_fn=self._get_train_sampler,
                                    is_training=True)

    def _prepare_inputs(self, rows):
        if not self.model.training:  # evaluation scores fresh samples (prediction_step)
            return rows
        if self._step % self._steps_per_rollout == 0 or not self._buffer:
            self._buffer = self._rollout(rows)
        batch = self._buffer[self._step % self._steps_per_rollout]
        self._step += 1
        return batch

    # --- rollout --------------------------------------------------------------------------------------------------

    def _completion_logps(self, model, hidden_NTH, prompt_length: int, completion_ids_BC, mask_BC) -> torch.Tensor:
        """fp32 ``[B, C]`` log-probs at ``temperature`` of the completion tokens (0 outside the mask)."""
        weight_VH, bias_V = self._lm_head(model)
        hidden_BCH = hidden_NTH[:, prompt_length - 1:-1].to(weight_VH.device, weight_VH.dtype)
        labels_BC = completion_ids_BC.masked_fill(~mask_BC, -100).to(weight_VH.device)
        with self.head_region(hidden_BCH.device):
            return linear_token_logprobs(hidden_BCH, weight_VH, labels_BC, bias=bias_V,
                                         temperature=self.args.temperature, softcap=self.head_softcap(model))

    def _sample(self, rows):
        args = self.args
        row_seeds = trainer_row_seeds(self, len(rows))
        # Inside the policy-and-value module's forward (PolicyAndValue.forward's policy_call), so that FSDP2's hooks on
        # that root unit run as in training.
        return self.accelerator.unwrap_model(self.model)(policy_call=lambda policy: generate_completions(
            policy, self._tokenizer, [row["prompt"] for row in rows], max_prompt_length=args.max_prompt_length,
            prompt_truncation=args.prompt_truncation, max_completion_length=args.response_length,
            temperature=args.temperature, eos_token_ids=self._eos_token_ids, row_seeds=row_seeds))

    @torch.no_grad()
    def _rollout(self, rows: list[dict]) -> list[dict]:
        """Steps 1-4 of the module docstring; returns the ``_steps_per_rollout`` micro-batches of step 5."""
        args = self.args
        rollout = self._sample(rows)
        scores_B, rewards_BF, failures = rollout_scores(
            self.rewards, self.reward_weights, rollout, rows, repeat=1, on_error=args.reward_failure,
            missing_eos_penalty=args.missing_eos_penalty, trainer_state=self.state)
        inputs = sequence_inputs(rollout)
        prompt_length = rollout.prompt_ids.shape[1]
        completion_ids_BC, mask_BC = rollout.completion_ids, rollout.completion_mask.bool()
        wrapper = self.accelerator.unwrap_model(self.model)
        logps, ref_logps, values = [], [], []
        with self.compute_loss_context_manager():
            for start in range(0, completion_ids_BC.shape[0], args.local_rollout_forward_batch_size):
                rows_slice = slice(start, start + args.local_rollout_forward_batch_size)
                chunk = {key: value[rows_slice] for key, value in inputs.items()}
                ids_BC, chunk_mask_BC = completion_ids_BC[rows_slice], mask_BC[rows_slice]
                out = wrapper(**chunk)
                logps.append(self._completion_logps(wrapper, out.hidden_NTH, prompt_length, ids_BC, chunk_mask_BC))
                values.append(out.values_NT[:, prompt_length - 1:-1])
                with self.reference_context() as reference:
                    _, hidden = final_hidden_states(reference, **chunk)
                    ref_logps.append(self._completion_logps(reference, hidden, prompt_length, ids_BC, chunk_mask_BC))
            logps_BC, ref_logps_BC, values_BC = torch.cat(logps), torch.cat(ref_logps), torch.cat(values) * mask_BC
            targets = self._global_targets(scores_B, logps_BC, ref_logps_BC, values_BC, mask_BC)
        self.last_rollout = {"scores": scores_B, "logps": logps_BC, "ref_logps": ref_logps_BC, "values": values_BC,
                             "completion_mask": mask_BC, **targets._asdict()}
        self._record_rollout(scores_B, rewards_BF, failures, logps_BC, mask_BC, targets, rollout.is_truncated)
        self._num_rollouts += 1

        batch = {**inputs, "completion_ids": completion_ids_BC, "completion_mask": mask_BC, "old_logps": logps_BC,
                 "old_values": values_BC, "advantages": targets.advantages, "returns": targets.returns}
        generator = torch.Generator().manual_seed(args.seed + self._num_rollouts)
        micro_batches = []
        for _ in range(args.num_ppo_epochs):
            # A fresh permutation per epoch, cut into micro-batches; gradient_accumulation_steps consecutive ones
            # make one minibatch (one optimizer step), as TRL's minibatch / micro-batch loops.
            order = torch.randperm(completion_ids_BC.shape[0], generator=generator).to(mask_BC.device)
            for rows_index in order.split(args.per_device_train_batch_size):
                micro_batches.append({**{key: value[rows_index] for key, value in batch.items()},
                                      "prompt_length": prompt_length})
        return micro_batches

    def _global_targets(self, scores_B, logps_BC, ref_logps_BC, values_BC, mask_BC) -> PPOTargets:
        """:func:`ppo_targets` of this process's rows, whitened with the statistics of every process's rollout (what
        one process with the whole batch computes; TRL's PPO whitens each process's rows alone): the rows are
        gathered, padded to the widest completion, and this process's rows and width are cut back out."""
        args, accelerator = self.args, self.accelerator
        settings = {"kl_coef": args.kl_coef, "kl_estimator": args.kl_estimator, "whiten_rewards": args.whiten_rewards,
                    "gamma": args.gamma, "lam": args.lam}
        if accelerator.num_processes == 1:
            return ppo_targets(scores_B, logps_BC, ref_logps_BC, values_BC, mask_BC, **settings)
        num_rows, width = mask_BC.shape
        padded = [accelerator.pad_across_processes(x, dim=1) for x in (logps_BC, ref_logps_BC, values_BC,
                                                                       mask_BC.long())]
        logps, ref_logps, values, mask = (accelerator.gather(x) for x in padded)
        targets = ppo_targets(accelerator.gather(scores_B), logps, ref_logps, values, mask.bool(), **settings)
        rows = slice(accelerator.process_index * num_rows, (accelerator.process_index + 1) * num_rows)
        return PPOTargets(*(x[rows, :width] for x in targets))

    def _record_rollout(self, scores_B, rewards_BF, failures, logps_BC, mask_BC, targets: PPOTargets,
                        is_truncated_B) -> None:
        mode = "train"
        non_score_B = targets.non_score_reward.sum(1)
        self.record(mode, "objective/kl", self.gathered_mean(targets.kl.sum(1)))
        self.record(mode, "objective/entropy", self.gathered_mean((-logps_BC * mask_BC).sum(1)))
        self.record(mode, "objective/non_score_reward", self.gathered_mean(non_score_B))
        self.record(mode, "objective/rlhf_reward", self.gathered_mean(scores_B + non_score_B))
        self.record(mode, "objective/scores", self.gathered_mean(scores_B))
        self.record(mode, "val/num_eos_tokens",
                    self.accelerator.gather((~is_truncated_B).float().sum()).sum().item())
        for i, reward in enumerate(self.rewards):
            self.record(mode, f"rewards/{reward.name}/mean", self.accelerator.gather(rewards_BF[:, i]).nanmean().item())
        for name in failures:
            self.record(mode, f"rewards/{name}/failures", 1.0)
        self._episodes += self._global_rollout_size

    # --- loss -----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("return_outputs=True needs logits, which fusedrl's PPOTrainer never builds")
        args = self.args
        prompt_length, mask_BC = inputs["prompt_length"], inputs["completion_mask"]
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    position_ids=inputs["position_ids"])
        weight_VH, bias_V = self._lm_head(model)
        hidden_BCH = out.hidden_NTH[:, prompt_length - 1:-1].to(weight_VH.device, weight_VH.dtype)
        values_BC = out.values_NT[:, prompt_length - 1:-1]
        with self.head_region(hidden_BCH.device):
            loss, policy, vf_loss = self.loss_region(_ppo_region)(
                hidden_BCH, weight_VH, bias_V, inputs["completion_ids"], mask_BC, inputs["old_logps"],
                inputs["advantages"], values_BC, inputs["old_values"], inputs["returns"], args,
                softcap=self.head_softcap(model))
        # Both losses are token means over this process's micro-batch. Weighted by the process's share of the
        # global micro-batch's tokens, the processes' average (DDP, FSDP and ZeRO average gradients) is the token
        # mean of the global micro-batch, what one process with the whole batch computes (the weight is exactly 1
        # there); TRL averages the processes' means.
        tokens = mask_BC.sum().float()
        share = tokens * self.accelerator.num_processes / self.accelerator.gather(tokens).sum()
        self._record_update(policy, vf_loss, values_BC, inputs, tokens)
        return loss * share

    def _record_update(self, policy, vf_loss, values_BC, inputs, tokens) -> None:
        """The update's metrics; the token means of this process's micro-batch (``tokens`` tokens) are weighted across
        processes (``weighted_mean``)."""
        mode, mask_BC, args = self._mode(), inputs["completion_mask"], self.args
        with torch.no_grad():
            log_ratio_BC = policy.logps.detach() - inputs["old_logps"]
            ratio_BC = log_ratio_BC.exp()
            old, returns = inputs["old_values"], inputs["returns"]
            clipped_BC = old + (values_BC.detach() - old).clamp(-args.cliprange_value, args.cliprange_value)
            value_clipped_BC = ((clipped_BC - returns) ** 2 > (values_BC.detach() - returns) ** 2).float()
        ratio_mean = self.masked_mean(ratio_BC, mask_BC)
        self.record(mode, "policy/approxkl_avg", 0.5 * self.masked_mean(log_ratio_BC ** 2, mask_BC))
        self.record(mode, "policy/clipfrac_avg", self.weighted_mean(policy.clip_ratio_region, tokens))
        self.record(mode, "policy/entropy_avg", self.weighted_mean(policy.mean_entropy, tokens))
        self.record(mode, "loss/policy_avg", self.weighted_mean(policy.loss, tokens))
        self.record(mode, "loss/value_avg", self.weighted_mean(vf_loss, tokens))
        self.record(mode, "val/clipfrac_avg", self.masked_mean(value_clipped_BC, mask_BC))
        self.record(mode, "val/ratio", ratio_mean)
        self.record(mode, "val/ratio_var", self.masked_mean((ratio_BC - ratio_mean) ** 2, mask_BC))
        self._metrics[mode]["episode"] = [self._episodes]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation samples one completion per prompt and logs its score (no loss: PPO has no held-out loss)."""
        rows = inputs
        with torch.no_grad():
            rollout = self._sample(rows)
            scores_B, _, _ = rollout_scores(self.rewards, self.reward_weights, rollout, rows, repeat=1,
                                            on_error=self.args.reward_failure,
                                            missing_eos_penalty=self.args.missing_eos_penalty,
                                            trainer_state=self.state)
        self.record("eval", "objective/scores", self.gathered_mean(scores_B))
        self.record("eval", "val/contain_eos_token", self.gathered_mean((~rollout.is_truncated).float()))
        return None, None, None

    # --- checkpoints: the policy as a model directory, the value model beside it ----------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        wrapper = self.accelerator.unwrap_model(self.model)
        parts = {"policy.": None, "value_model.": None}
        if state_dict is not None:  # FSDP/DeepSpeed hand over the gathered state of the whole wrapper
            parts = {prefix: {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
                     for prefix in parts}
        if self.args.should_save:
            wrapper.value_model.save_pretrained(os.path.join(output_dir, VALUE_MODEL_DIR),
                                                state_dict=parts["value_model."])
        self.model = wrapper.policy  # Trainer._save writes self.model, the tokenizer and the arguments
        try:
            super()._save(output_dir, state_dict=parts["policy."])
        finally:
            self.model = wrapper

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        wrapper = self.accelerator.unwrap_model(self.model if model is None else model)
        super()._load_from_checkpoint(resume_from_checkpoint, model=wrapper.policy)
        super()._load_from_checkpoint(os.path.join(resume_from_checkpoint, VALUE_MODEL_DIR), model=wrapper.value_model)

    # --- exact resume (online/resume.py): counters and the interrupted rollout's remaining minibatches -------------

    def _round_state(self) -> RoundState:
        args = self.args
        plan = {"per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "num_mini_batches": args.num_mini_batches, "num_ppo_epochs": args.num_ppo_epochs,
                "world_size": args.world_size}
        inside_rollout = self._step % self._steps_per_rollout != 0 and bool(self._buffer)
        return RoundState({"step": self._step, "num_rollouts": self._num_rollouts, "episodes": self._episodes}, plan,
                          self._buffer if inside_rollout else None)

    def _restore_round(self, state: RoundState) -> None:
        counters = state.counters
        self._step, self._num_rollouts, self._episodes = counters["step"], counters["num_rollouts"], counters["episodes"]
        self._buffer = state.pending or []  # empty: _prepare_inputs samples a fresh rollout
