"""DPOTrainer: TRL 1.16's DPO recipe, step for step, on fusedrl's fused LM head.

``from fusedrl import DPOTrainer, DPOConfig`` replaces ``from trl import ...``: same constructor, config fields,
tokenization, batch layout, data order, loss reduction and logged names, so with the same model, data, seed and
config the logged losses match TRL's to fp32 precision (tests/trainers/test_dpo_trainer.py runs both). What differs is how the
log-probs are made: TRL patches the model's forward with a chunked head; fusedrl asks the unpatched model for its
final hidden states and projects them with ``linear_preference_loss`` (selectable kernels, no ``[N, T, V]`` logits;
head, loss and metrics from one pass over each logits tile: 3 head passes for the policy, 1 for the reference).

One step, for a batch of B pairs laid out as 2B rows ``[chosen; rejected]`` (``preference_data.PreferenceCollator``):

1. one policy forward over the 2B rows: per-token log-probs of the completion tokens (prompt and padding are -100);
2. sequence log-probs: sums over the completion (LD-DPO: tokens beyond the shorter completion of the pair count
   ``ld_alpha``), split into chosen and rejected halves;
3. the same for the reference: a precomputed column, or a no-grad forward of the reference (see ``base``);
4. the loss of every ``loss_type`` on those ``[B]`` vectors, weighted by ``loss_weights``, averaged over pairs
   (the ``preference`` backend of ``kernels``), plus the MoE router loss; steps 1, 2 and 4 are one
   ``linear_preference_loss(fused=True)`` call, which forms the gradient in its forward for every loss type
   separable per pair (``aot``, ``aot_unpaired``, registered losses and ``sft`` with WPO weights take the unfused
   path);
5. TRL's metrics: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}, logits/{chosen,rejected},
   entropy, mean_token_accuracy, num_tokens (and aux_loss for MoE).

Vision-language models (a processor as ``processing_class``, an ``image`` / ``images`` column), as TRL: the rows stay
raw and are encoded with their images when batched (``preference/vision_data.py``); both rows of a pair get the pair's
image fields in every forward (policy, reference, precomputed reference). ``truncation_mode='keep_end'`` is refused
with images; a prompt that does not fit below ``max_length`` is refused when its batch is built. Unlike TRL,
``precompute_ref_log_probs=True`` works with images; ``compute_metrics`` gets logits of forwards with the images.
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import set_seed

from fusedrl.ops.preference import (
    F_DIVERGENCE_LOSS_TYPES,
    LinearPreferenceLoss,
    check_registered_request,
    dpo_loss_types,
    ld_sequence_logps,
    linear_preference_loss,
    sequence_logps,
)
from fusedrl.trainers.base import FusedTrainer
from fusedrl.trainers.data.validation import PRECOMPUTE_ITERABLE_ERROR
from fusedrl.trainers.data.vision import is_vision_processor, text_tokenizer
from fusedrl.trainers.head import IGNORE_INDEX, TokenOutputs
from fusedrl.trainers.models import tokenizer_of
from fusedrl.trainers.preference.data import PreferenceCollator, prepare_preference_dataset
from fusedrl.trainers.preference.dpo_config import DPOConfig
from fusedrl.trainers.preference.vision_data import (
    PAIRED_COLUMNS,
    VisionPreferenceCollator,
    check_vision_config,
    check_vision_dataset,
    has_images,
    image_dtype,
)

logger = logging.getLogger("fusedrl")

_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})
_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def _check_config(args: DPOConfig) -> None:
    """The configuration errors TRL raises (some only at the first step), raised at construction."""
    unknown = [name for name in args.loss_type if name not in dpo_loss_types()]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown}; choose from {list(dpo_loss_types())} "
                         "(more with fusedrl.register_preference_loss)")
    check_registered_request(args.loss_type, f_divergence_type=args.f_divergence_type, has_lengths=True,
                             has_nll=True)
    if args.f_divergence_type != "reverse_kl" and not set(args.loss_type) <= F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(f"f_divergence_type={args.f_divergence_type!r} only applies to "
                         f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; got loss_type={args.loss_type}")
    if args.use_weighting and {"aot", "aot_unpaired"} & set(args.loss_type):
        raise ValueError("WPO weighting (use_weighting) cannot apply to 'aot'/'aot_unpaired': they sort "
                                  "the batch, which misaligns the per-pair weights")
    if "exo_pair" in args.loss_type and args.label_smoothing == 0.0:
        raise ValueError("'exo_pair' needs label_smoothing > 0 (the EXO paper uses 1e-3)")
    if "robust" in args.loss_type and not 0.0 <= args.label_smoothing < 0.5:
        logger.warning("label_smoothing should lie in [0, 0.5) for the 'robust' loss; got %s", args.label_smoothing)
    if args.ld_alpha is not None and not 0.0 <= args.ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {args.ld_alpha}")
    if args.sync_ref_model and args.precompute_ref_log_probs:
        raise ValueError("sync_ref_model=True updates the reference, so precomputed reference log-probs would go "
                         "stale; set one of them to False")


def _sequence_logps(logps_NT: torch.Tensor, mask_NT: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    if ld_alpha is None:
        return sequence_logps(logps_NT, mask_NT)
    return ld_sequence_logps(logps_NT, mask_NT, ld_alpha=ld_alpha)


def _dpo_region(hidden_NTH, weight_VH, bias_V, labels_NT, ref_chosen, ref_rejected, lengths_N,
                args: DPOConfig, softcap: float | None = None) -> LinearPreferenceLoss:
    """The loss region (compiled whole with ``compile=True``): policy hidden states -> fused head -> sequence
    log-probs -> the loss of every ``loss_type``, averaged over pairs, with the per-token metrics from the same tiles
    (``linear_preference_loss(fused=True)``: 3 head passes; a request coupling the batch takes the unfused path).
    Steps 1, 2 and 4 of the module docstring. lengths_N: unshifted completion lengths (ipo / sigmoid_norm average
    over them, as TRL counts); softcap: the head's soft cap (``HeadInputs.softcap``)."""
    num_pairs = labels_NT.shape[0] // 2
    return linear_preference_loss(
        hidden_NTH, weight_VH, labels_NT, bias=bias_V, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
        loss_type=args.loss_type, beta=args.beta, loss_weights=args.loss_weights,
        label_smoothing=args.label_smoothing, f_divergence_type=args.f_divergence_type,
        f_alpha_divergence_coef=args.f_alpha_divergence_coef, discopop_tau=args.discopop_tau,
        chosen_lengths=lengths_N[:num_pairs], rejected_lengths=lengths_N[num_pairs:], ld_alpha=args.ld_alpha,
        use_weighting=args.use_weighting, with_metrics=True, fused=True, softcap=softcap,
    )


class DPOTrainer(FusedTrainer):
    """Direct Preference Optimization (https://arxiv.org/abs/2305.18290) and its variants (``loss_type``).

    Arguments as ``trl.DPOTrainer`` 1.16: ``model`` is a path or a causal LM (or a PeftModel); ``ref_model`` None
    means the initial policy (a frozen copy, or the PEFT base with adapters disabled); ``train_dataset`` has
    ``prompt``/``chosen``/``rejected`` (standard or conversational; the prompt may be implicit). An evaluation's
    ``compute_metrics`` gets TRL's predictions: the policy's ``[N, T, V]`` logits of the batch's ``input_ids``,
    built only for it (``FusedHeadMixin.sequence_logits``, which says what they cost).
    """

    eval_predictions = "logits"

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None):
        args = self._checked_inputs(model, args, DPOConfig, train_dataset, compute_metrics,
                                   eval_dataset, images_ok=True)
        _check_config(args)

        set_seed(args.seed)  # PEFT initialises adapters randomly
        model, processing_class = self._setup_model(model, args, processing_class, peft_config=peft_config,
                                                    ref_model=ref_model, quantization_config=quantization_config)
        self._is_vlm = is_vision_processor(processing_class)  # TRL's name; turns prefix sharing off
        # TRL's _is_vision_dataset: raw rows, encoded with their images when batched (vision_data.py).
        self._vision_data = has_images(train_dataset)
        if self._vision_data:
            check_vision_config(args, is_vlm=self._is_vlm)
        if args.sync_ref_model and is_peft_model(model) and args.ref_adapter_name is None:
            raise ValueError("sync_ref_model=True with a PEFT model: the reference is the base model with adapters "
                             "disabled, there is no separate reference to update; name a reference adapter to sync "
                             "into with ref_adapter_name")
        tokenizer = text_tokenizer(processing_class, tokenizer_of(processing_class))
        if args.padding_free:
            logger.warning("padding_free=True is unavailable (as in TRL 1.16); falling back to padding")
        if data_collator is None:
            pad_token = args.pad_token or tokenizer.pad_token
            if pad_token not in tokenizer.get_vocab():
                raise ValueError(f"pad_token {pad_token!r} is not in the tokenizer's vocabulary")
            tokenizer.pad_token = pad_token
            model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
            if self._vision_data:
                data_collator = VisionPreferenceCollator(processing_class, tokenizer.pad_token_id, args.max_length,
                                                         args.pad_to_multiple_of, dtype=image_dtype(model))
            else:
                data_collator = PreferenceCollator(tokenizer.pad_token_id, args.max_length, args.truncation_mode,
                                                   args.pad_to_multiple_of)
        self._max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        train_dataset, eval_dataset = self._prepare_splits(train_dataset, eval_dataset, tokenizer, args)

        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, compute_metrics=compute_metrics)

        self._setup_router_aux_loss(args)
        self._setup_reference(ref_model, args)

    # --- data ---------------------------------------------------------------------------------------------------

    def _prepare(self, dataset, tokenizer, args: DPOConfig, name: str):
        if self._vision_data:
            check_vision_dataset(dataset, paired=True, name=name)
            return dataset
        return prepare_preference_dataset(dataset, tokenizer, max_length=args.max_length,
                                          truncation_mode=args.truncation_mode, max_positions=self._max_positions,
                                          num_proc=args.dataset_num_proc, name=name)

    def logits_model_inputs(self, inputs: dict) -> dict:  # compute_metrics' logits: image fields included
        return {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None and self._vision_data:
            self._signature_columns = list(PAIRED_COLUMNS)
        elif self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", *_REF_COLUMNS]

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """``dataset`` with ``ref_chosen_logps``/``ref_rejected_logps`` columns, from the reference in the training
        collation (same padding, so the same numbers as a step would compute)."""
        if isinstance(dataset, IterableDataset):
            raise ValueError(PRECOMPUTE_ITERABLE_ERROR)  # noqa: TRY004 (TRL's type and words: its tests pin them)
        if all(column in dataset.column_names for column in _REF_COLUMNS):
            return dataset
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        ))
        chosen, rejected = [], []
        with self.compute_loss_context_manager():
            for batch in loader:
                labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
                model_inputs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
                batch_chosen, batch_rejected = self._reference_logps(model_inputs, labels,
                                                                     batch["completion_mask"][:, 1:])
                batch_chosen, batch_rejected = self.accelerator.gather_for_metrics((batch_chosen, batch_rejected))
                chosen.append(batch_chosen.cpu())
                rejected.append(batch_rejected.cpu())
        logger.info("%s dataset: precomputed reference log-probs of %d pairs", name, len(dataset))
        dataset = dataset.add_column("ref_chosen_logps", torch.cat(chosen).tolist())
        return dataset.add_column("ref_rejected_logps", torch.cat(rejected).tolist())

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # A dataset passed here gets the preparation __init__ gives eval_dataset (both steps skip prepared data).
        if eval_dataset is None or isinstance(eval_dataset, str):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if isinstance(eval_dataset, dict):
            metrics = {}
            for name, dataset in eval_dataset.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        precompute = self.args.precompute_ref_log_probs
        if precompute and self.ref_model is None and not is_peft_model(self.model) and self.state.global_step > 0:
            raise ValueError("Cannot compute reference log-probs for a dataset passed to `evaluate()` after training "
                             "has started: precompute_ref_log_probs=True without a ref_model, and the initial policy "
                             "is gone; pass this dataset as eval_dataset at construction, pass ref_model, or set "
                             "precompute_ref_log_probs=False")
        eval_dataset = self._prepare(eval_dataset, tokenizer_of(self.processing_class), self.args, "eval")
        if precompute:
            batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
            eval_dataset = self._precompute_ref_logps(eval_dataset, "eval", batch_size)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    # --- loss ---------------------------------------------------------------------------------------------------

    def _reference_logps(self, model_inputs, labels, mask_NT) -> tuple[torch.Tensor, torch.Tensor]:
        with self.reference_context() as reference:
            ref = self.token_logprobs(reference, model_inputs, labels)
        return _sequence_logps(ref.logps, mask_NT, self.args.ld_alpha).chunk(2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("return_outputs=True needs logits, which fusedrl's DPOTrainer never builds")
        mode = self._mode()
        completion_mask = inputs["completion_mask"]
        mask_NT = completion_mask[:, 1:].bool()
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
        model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        head = self.head_inputs(model, model_inputs, labels, mean_logits=True, router_logits=self.aux_loss_enabled)
        if self.args.precompute_ref_log_probs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self._reference_logps(model_inputs, labels, mask_NT)
        with self.head_region(head.hidden_NTH.device):
            out = self.loss_region(_dpo_region)(
                head.hidden_NTH, head.weight_VH, head.bias_V, head.labels_NT, ref_chosen, ref_rejected,
                completion_mask.sum(-1).float(), self.args, softcap=head.softcap,
            )
        policy = TokenOutputs(out.token_logps, out.entropy, head.stats["mean_logits"], out.is_top1,
                              aux_loss=head.aux_loss)
        loss = out.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * policy.aux_loss
            self.record(mode, "aux_loss", self.gathered_mean(policy.aux_loss))
        self._record_metrics(mode, inputs, policy, mask_NT, out, out.chosen_logps, out.rejected_logps)
        return loss

    def _record_metrics(self, mode, inputs, policy, mask_NT, out: LinearPreferenceLoss, chosen, rejected) -> None:
        chosen_mask, rejected_mask = mask_NT.chunk(2)
        chosen_logits, rejected_logits = policy.mean_logits.chunk(2)
        self.record(mode, "entropy", self.masked_mean(policy.entropy, mask_NT))
        self.record_num_tokens(mode, inputs["attention_mask"])
        self.record(mode, "logits/chosen", self.masked_mean(chosen_logits, chosen_mask))
        self.record(mode, "logits/rejected", self.masked_mean(rejected_logits, rejected_mask))
        self.record(mode, "mean_token_accuracy", self.masked_mean(policy.is_top1.chunk(2)[0], chosen_mask))
        self.record(mode, "rewards/chosen", self.gathered_mean(out.chosen_rewards))
        self.record(mode, "rewards/rejected", self.gathered_mean(out.rejected_rewards))
        self.record(mode, "rewards/accuracies",
                    self.gathered_mean((out.chosen_rewards > out.rejected_rewards).float()))
        self.record(mode, "rewards/margins", self.gathered_mean(out.chosen_rewards - out.rejected_rewards))
        self.record(mode, "logps/chosen", self.gathered_mean(chosen))
        self.record(mode, "logps/rejected", self.gathered_mean(rejected))
