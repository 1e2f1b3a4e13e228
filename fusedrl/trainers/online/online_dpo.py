"""OnlineDPOTrainer: TRL 1.16's online DPO (``trl.experimental.online_dpo``) on fusedrl's fused LM head.

How it differs from DPO: the pairs are not in the dataset. Every step samples two completions of each prompt from
the current policy, ranks them, and takes the DPO loss on (chosen, rejected) against the reference
(https://arxiv.org/abs/2402.04792). How it differs from GRPO: the signal is a preference between two samples, not
an advantage, so any judge that can compare two answers works, not only a scalar reward.

One step, for a batch of B prompts:

1. sample two completions per prompt (``rollout.generate_completions``, ``num_generations=2``);
2. rank each pair: with reward functions / reward models, the higher weighted score wins (ties go to the first,
   TRL's ``>=``; ``missing_eos_penalty`` lowers completions without EOS); with a ``judge``
   (``judge(prompts, completion_pairs) -> [0 | 1 | -1]``, ``fusedrl.trainers.online.judges``, or an object with TRL's
   ``.judge`` method) the judged index wins and a tie (-1) drops the pair from the loss;
3. one policy forward over the 2B rows ``[chosen; rejected]`` (prompt + completion, left-truncated to ``max_length``),
   log-probs from hidden states (no ``[2B, T, V]`` logits), summed over each completion; the same for the reference
   (one no-grad head pass);
4. the DPO loss of ``loss_type`` (``sigmoid`` or ``ipo``), DPO's own formulas: online DPO's ``ipo`` is on sums, so
   unit lengths are passed (the DPO trainer's ``ipo`` averages per token); the mean over the ranked pairs. Steps 3
   (policy) and 4 are one ``linear_preference_loss(fused=True)`` call, 3 head passes (the ``preference`` backend
   of ``kernels`` for the loss).

Resume: nothing is buffered across steps and the samples come from the global RNG, which Trainer's checkpoint
restores, so a resumed run repeats the uninterrupted one bitwise without online-trainer state of its own
(tests/trainers/test_online_resume.py; GRPO, RLOO and PPO save their pending rounds: ``resume.py``).

TRL-named metrics: objective/{kl,entropy,non_score_reward,rlhf_reward,scores,scores_margin}, rewards/{chosen,rejected,
accuracies,margins}, logps/{chosen,rejected}, val/contain_eos_token, beta; fusedrl adds val/judge_ties (judge only).

Legend: B prompts (pairs), N = 2B rows, T positions.
"""

from __future__ import annotations

import torch
from transformers import set_seed

from fusedrl.ops.preference import LinearPreferenceLoss, linear_preference_loss, sequence_logps
from fusedrl.trainers.base import FusedTrainer
from fusedrl.trainers.data.validation import check_prompt_dataset
from fusedrl.trainers.data.vision import (
    check_vision_trainer,
    collate_vision,
    is_vision_processor,
    row_images,
    suppress_image_tokens,
)
from fusedrl.trainers.head import IGNORE_INDEX
from fusedrl.trainers.models import load_causal_lm, tokenizer_of
from fusedrl.trainers.online.common import RewardAttributes, judge_pairs, rollout_scores, sequence_inputs
from fusedrl.trainers.online.judges import TIE
from fusedrl.trainers.online.online_dpo_config import OnlineDPOConfig
from fusedrl.trainers.online.rollout import eos_token_ids_of, generate_completions, trainer_sampling_config
from fusedrl.trainers.online.row_seeds import trainer_row_seeds
from fusedrl.trainers.online.sampling import DISPATCHED_STREAM_ERROR, identity_collator, is_streamed
from fusedrl.trainers.rewards import prepare_reward_models, resolve_rewards, reward_weights_tensor

_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


class OnlineDPOTrainer(RewardAttributes, FusedTrainer):
    """Online DPO, per the module docstring. Arguments as ``trl.experimental.online_dpo.OnlineDPOTrainer`` 1.16, plus
    ``judge``: exactly one of ``reward_funcs`` (names, callables, reward models or paths; default
    ``args.reward_funcs`` + ``args.reward_model_path``) and ``judge`` ranks the pairs. ``train_dataset``: prompt-only
    rows (``prompt`` column; other columns reach the reward functions); ``eval_dataset`` the same, or a dict of such
    splits (a ``DatasetDict``), each evaluated under its own name."""

    def __init__(self, model, ref_model=None, reward_funcs=None, args: OnlineDPOConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 reward_processing_classes=None, peft_config=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), judge=None):
        if args is not None and args.accelerator_config.dispatch_batches and (
                is_streamed(train_dataset) or is_streamed(eval_dataset)):
            raise ValueError(DISPATCHED_STREAM_ERROR)
        args = self._checked_inputs(model, args, OnlineDPOConfig, train_dataset, compute_metrics, images_ok=True)
        # Rows reach the trainer raw (identity collator), which accelerate cannot dispatch: a stream (train, eval, or
        # one given to evaluate()) would fail at its first batch, as it does in TRL 1.16 unless this is set by hand.
        if args.accelerator_config.dispatch_batches is None:
            args.accelerator_config.dispatch_batches = False
        if args.use_vllm:
            raise ValueError("use_vllm=True is not supported by fusedrl's OnlineDPOTrainer: it samples with "
                             "model.generate (KV cache on); set use_vllm=False")
        self.use_vllm = False
        # No sampler: a stream is read in order. An eval set may be a dict of splits (else a KeyError mid-eval).
        check_prompt_dataset(train_dataset, "train_dataset", streamed_ok=True, images_ok=True)
        check_prompt_dataset(eval_dataset, "eval_dataset", streamed_ok=True, images_ok=True)
        if reward_funcs is None and judge is None:
            reward_funcs = list(args.reward_funcs or []) + ([args.reward_model_path] if args.reward_model_path else [])
        if judge is not None and reward_funcs:
            raise ValueError("give either reward_funcs (reward functions/models) or judge, not both")
        if judge is None and not reward_funcs:
            raise ValueError("OnlineDPOTrainer needs reward_funcs (or args.reward_funcs / args.reward_model_path) or "
                             "a pairwise judge to rank the two samples of each prompt")
        if judge is not None and not (callable(judge) or callable(getattr(judge, "judge", None))):
            raise ValueError(f"judge must be a callable judge(prompts, completion_pairs) or have a .judge method; "
                             f"got {type(judge).__name__}")
        set_seed(args.seed)
        model, processing_class = self._setup_model(model, args, processing_class, peft_config=peft_config,
                                                    ref_model=ref_model, quantization_config=None)
        if isinstance(ref_model, str):
            ref_model = load_causal_lm(ref_model, args)
        self._tokenizer = tokenizer_of(processing_class)
        self._is_vlm = is_vision_processor(processing_class)
        if self._is_vlm:
            check_vision_trainer(args)
        self.judge = judge
        self.rewards = [] if judge is not None else resolve_rewards(
            reward_funcs, reward_processing_classes, model_init_kwargs=args.model_init_kwargs,
            trust_remote_code=args.trust_remote_code)
        self.reward_weights = reward_weights_tensor(args.reward_weights, len(self.rewards)) if self.rewards else None
        # TRL's attribute: the sampling settings, generation_kwargs on top (cache_implementation included).
        self.eos_token_ids = eos_token_ids_of(model, self._tokenizer)
        self.generation_config = trainer_sampling_config(args, self._tokenizer, self.eos_token_ids,
                                                         args.max_new_tokens)
        if self._is_vlm:
            suppress_image_tokens(self.generation_config, model)
        super().__init__(model=model, args=args, data_collator=data_collator or identity_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         callbacks=callbacks, optimizers=optimizers)
        self._finish_setup(ref_model, precompute=False)
        self.rewards = prepare_reward_models(self.rewards, self.accelerator)  # sharded like the reference

    @property
    def beta(self) -> float:
        """``args.beta``, or with a list the entry of the current epoch (the last one after the list runs out)."""
        beta = self.args.beta
        if isinstance(beta, (int, float)):
            return float(beta)
        epoch = int(self.state.epoch or 0)
        return float(beta[min(epoch, len(beta) - 1)])

    # --- steps 1-2: sample and rank -------------------------------------------------------------------------------

    def _prepare_inputs(self, rows: list[dict]) -> dict:
        args = self.args
        rollout = generate_completions(
            self.model, self._tokenizer, [row["prompt"] for row in rows], num_generations=2,
            max_prompt_length=args.max_prompt_length, prompt_truncation=args.prompt_truncation,
            eos_token_ids=self.eos_token_ids, generation_config=self.generation_config, accelerator=self.accelerator,
            row_seeds=trainer_row_seeds(self, 2 * len(rows)),
            share_prompt_prefill=self.prefix_sharing.enabled, processor=self.processing_class,
            images=row_images(rows))
        device = rollout.completion_ids.device
        num_pairs = len(rows)
        scores_N = None
        if self.judge is not None:
            pairs = [(rollout.completions_text[2 * i], rollout.completions_text[2 * i + 1]) for i in range(num_pairs)]
            verdicts = judge_pairs(self.judge, rollout.prompts_text[::2], pairs)
            first_wins_B = torch.tensor([v == 0 for v in verdicts], device=device)
            ranked_B = torch.tensor([v != TIE for v in verdicts], device=device)
        else:
            scores_N, _, failures = rollout_scores(
                self.rewards, self.reward_weights, rollout, rows, repeat=2, on_error=args.reward_failure,
                missing_eos_penalty=args.missing_eos_penalty, trainer_state=self.state)
            for name in failures:
                self.record(self._mode(), f"rewards/{name}/failures", 1.0)
            first_wins_B = scores_N[0::2] >= scores_N[1::2]
            ranked_B = torch.ones(num_pairs, dtype=torch.bool, device=device)
        # Rows 2i, 2i+1 are prompt i's samples: chosen rows first, then rejected rows, pair i at i and B + i.
        first_B = torch.arange(num_pairs, device=device) * 2
        chosen_B = first_B + (~first_wins_B).long()
        order_N = torch.cat([chosen_B, first_B + first_wins_B.long()])
        inputs = {key: value[order_N] for key, value in sequence_inputs(rollout, args.max_length).items()}
        if rollout.vision is not None:  # the model numbers image positions itself (Qwen-VL's 3-D rotary positions)
            del inputs["position_ids"]
            inputs["vision"] = [rollout.vision[i] for i in order_N.tolist()]
        completion_mask = rollout.completion_mask[order_N]
        completion_length = completion_mask.shape[1]
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
        labels[:, :-completion_length] = IGNORE_INDEX  # score the completion only
        return {**inputs, "labels": labels, "completion_mask": completion_mask, "ranked": ranked_B,
                "contain_eos": ~rollout.is_truncated, "scores": scores_N[order_N] if scores_N is not None else None}

    # --- steps 3-4: DPO loss --------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("return_outputs=True needs logits, which fusedrl's OnlineDPOTrainer never builds")
        model_inputs = {key: inputs[key] for key in _MODEL_KEYS if key in inputs}
        if inputs.get("vision") is not None:
            completion_width = inputs["completion_mask"].shape[1]
            model_inputs.update(collate_vision(
                inputs["vision"], inputs["input_ids"].shape[1] - completion_width, completion_width,
                device=inputs["input_ids"].device, dtype=self.accelerator.unwrap_model(model).dtype))
        labels, ranked_B = inputs["labels"], inputs["ranked"]
        mask_NT = labels[:, 1:] != IGNORE_INDEX
        head = self.head_inputs(model, model_inputs, labels)
        with self.reference_context() as reference:
            ref = self.token_logprobs(reference, model_inputs, labels)
        ref_chosen, ref_rejected = sequence_logps(ref.logps, mask_NT).chunk(2)
        # The mean over the ranked pairs, (sum_i w_i l_i) / max(sum w, 1), as per-pair weights of the pair mean.
        weights_B = ranked_B.float()
        pair_weights_B = weights_B * (weights_B.shape[0] / weights_B.sum().clamp(min=1.0))
        with self.head_region(head.hidden_NTH.device):
            out = self.loss_region(_online_dpo_region)(head.hidden_NTH, head.weight_VH, head.bias_V, head.labels_NT,
                                                       ref_chosen, ref_rejected, pair_weights_B,
                                                       self.args.loss_type, self.beta, softcap=head.softcap)
        self._record_metrics(inputs, out.token_logps.detach(), ref.logps, mask_NT, out, out.chosen_logps,
                             out.rejected_logps)
        return out.loss

    def _record_metrics(self, inputs, logps_NT, ref_logps_NT, mask_NT, out, chosen, rejected) -> None:
        mode, beta = self._mode(), self.beta
        kl_N = ((logps_NT - ref_logps_NT) * mask_NT).sum(1)
        non_score_N = -beta * kl_N
        self.record(mode, "objective/kl", self.gathered_mean(kl_N))
        self.record(mode, "objective/entropy", self.gathered_mean(-(logps_NT * mask_NT).sum(1)))
        self.record(mode, "objective/non_score_reward", self.gathered_mean(non_score_N))
        scores_N = inputs["scores"]
        if scores_N is not None:
            chosen_scores, rejected_scores = scores_N.chunk(2)
            self.record(mode, "objective/rlhf_reward", self.gathered_mean(scores_N + non_score_N))
            self.record(mode, "objective/scores", self.gathered_mean(scores_N))
            self.record(mode, "objective/scores_margin", self.gathered_mean(chosen_scores - rejected_scores))
        else:
            self.record(mode, "val/judge_ties", self.gathered_mean((~inputs["ranked"]).float()))
        self.record(mode, "rewards/chosen", self.gathered_mean(out.chosen_rewards))
        self.record(mode, "rewards/rejected", self.gathered_mean(out.rejected_rewards))
        margins = out.chosen_rewards - out.rejected_rewards
        self.record(mode, "rewards/margins", self.gathered_mean(margins))
        self.record(mode, "rewards/accuracies", self.gathered_mean((margins > 0).float()))
        self.record(mode, "logps/chosen", self.gathered_mean(chosen.detach()))
        self.record(mode, "logps/rejected", self.gathered_mean(rejected.detach()))
        self.record(mode, "val/contain_eos_token", self.gathered_mean(inputs["contain_eos"].float()))
        self.record(mode, "beta", beta)
        self.record_num_tokens(mode, inputs["attention_mask"])


def _online_dpo_region(hidden_NTH, weight_VH, bias_V, labels_NT, ref_chosen_B, ref_rejected_B, pair_weights_B,
                       loss_type: str, beta: float, softcap: float | None = None) -> LinearPreferenceLoss:
    """The loss region (compiled whole with ``compile=True``): policy hidden states -> fused head -> summed
    completion log-probs -> the DPO loss weighted over the ranked pairs (``linear_preference_loss(fused=True)``);
    softcap: the head's soft cap."""
    units = torch.ones_like(ref_chosen_B)  # ipo on sums, as TRL's online DPO (DPO's ipo divides by the lengths)
    return linear_preference_loss(
        hidden_NTH, weight_VH, labels_NT, bias=bias_V, ref_chosen_logps=ref_chosen_B, ref_rejected_logps=ref_rejected_B,
        loss_type=loss_type, beta=beta, chosen_lengths=units, rejected_lengths=units, pair_weights=pair_weights_B,
        fused=True, softcap=softcap,
    )
