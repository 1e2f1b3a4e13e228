"""KTOTrainer: TRL 1.16's KTO recipe (``trl.KTOTrainer``), step for step, on fusedrl's fused LM head.

KTO (https://arxiv.org/abs/2402.01306) learns from *unpaired* feedback: each example is one completion labelled
desirable or undesirable, so it differs from DPO in two ways. The loss is per example, a sigmoid of the policy /
reference log-ratio measured against a reference point ``z``; and ``z`` is a batch estimate of KL(policy || reference)
made from mismatched (prompt, completion) pairs: within each batch, example i's prompt with example i-1's completion
(TRL builds them in the dataset, per run of ``per_device_train_batch_size`` rows, hence the sequential sampler).
``apo_zero_unpaired`` (https://arxiv.org/abs/2408.06266) drops ``z`` and the mismatched pairs.

One step, for N examples (``preference_data.UnpairedCollator``; a paired dataset is unpaired first):

1. ``kto``: a no-grad policy forward over the N mismatched pairs, summed completion log-probs;
2. one policy forward over the N examples: per-token log-probs of the completions, summed per example;
3. the same for the reference (a precomputed column, or no-grad forwards of the reference, see ``base``);
4. ``z = max(0, mean(policy - reference log-probs of the mismatched pairs))`` (``fusedrl.ops.preference.kto_kl``,
   averaged over processes, detached), and the weighted per-example losses, averaged over the N examples
   (``fusedrl.ops.preference.linear_kto_loss``; both on the ``preference`` backend of ``kernels``), plus the MoE
   router loss; steps 2 and 4 are one fused head+loss call (3 head passes), since given ``z`` each example's loss
   depends on its own row;
5. TRL's metrics: kl, entropy, num_tokens, logits/{chosen,rejected}, rewards/{chosen,rejected,margins},
   logps/{chosen,rejected} (a label absent from the batch logs nothing for it, as in TRL), and aux_loss for MoE.

Deliberate differences from TRL: a model given as a path loads in fp32 unless ``model_init_kwargs`` says otherwise,
and the reference is a copy of the loaded policy rather than a second load from the path (same weights);
precomputed reference log-probs are added as columns, not cached in a file keyed by the model's hash;
``return_outputs`` (it needs logits) is refused. ``compute_metrics`` gets TRL's predictions, the policy's
``[N, T, V]`` logits, built only for it.

Vision-language models (a processor as ``processing_class``, an ``image`` / ``images`` column): the rows stay raw and
are encoded with their images when batched (``preference/vision_data.py``); every forward of a row, policy,
reference, precomputed reference and its KL pair, gets its prompt's image fields. As TRL, paired rows with images are
refused; unlike TRL, ``precompute_ref_log_probs=True`` works with them, and the KL pairs are fixed in the dataset per
run of ``per_device_train_batch_size`` rows (a ``KL_completion`` column), as in the text path, so precomputed and
live reference log-probs see the same pairs; ``compute_metrics`` gets logits of forwards with the images.
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import set_seed

from fusedrl.ops.preference import KTO_LOSS_TYPES, LinearKTOLoss, kto_kl, linear_kto_loss, sequence_logps
from fusedrl.trainers.base import FusedTrainer
from fusedrl.trainers.data.validation import PRECOMPUTE_ITERABLE_ERROR
from fusedrl.trainers.data.vision import is_vision_processor, text_tokenizer
from fusedrl.trainers.head import IGNORE_INDEX, TokenOutputs
from fusedrl.trainers.models import tokenizer_of
from fusedrl.trainers.preference.data import UnpairedCollator, prepare_unpaired_dataset
from fusedrl.trainers.preference.kto_config import KTOConfig
from fusedrl.trainers.preference.vision_data import (
    UNPAIRED_COLUMNS,
    VisionUnpairedCollator,
    check_vision_config,
    check_vision_dataset,
    has_images,
    image_dtype,
    pair_kl_completions,
)

logger = logging.getLogger("fusedrl")

_REF_COLUMNS = ("ref_logps", "ref_KL_logps")
# Batch keys no forward takes; every other key without the KL_ prefix is a model input (ids, mask, image fields),
# for the KL rows taken from its KL_ twin when there is one (ids, mask, per-token image fields).
_NON_MODEL_KEYS = frozenset({"completion_mask", "label", *_REF_COLUMNS})


def _kto_region(hidden_NTH, weight_VH, bias_V, labels_NT, ref_logps_N, desirable_N, kl,
                args: KTOConfig, softcap: float | None = None) -> LinearKTOLoss:
    """The loss region (compiled whole with ``compile=True``): policy hidden states -> fused head -> summed
    completion log-probs -> KTO's per-example losses against ``kl`` (3 head passes, the entropy from the same
    tiles: ``linear_kto_loss(fused=True)``); softcap: the head's soft cap."""
    return linear_kto_loss(hidden_NTH, weight_VH, labels_NT, ref_logps=ref_logps_N, desirable=desirable_N, kl=kl,
                           bias=bias_V, loss_type=args.loss_type, beta=args.beta,
                           desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
                           with_entropy=True, fused=True, softcap=softcap)


def _check_config(args: KTOConfig) -> None:
    """The configuration errors TRL raises (some only at the first step), raised at construction."""
    if args.loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {args.loss_type!r}; choose from {list(KTO_LOSS_TYPES)}")
    if args.loss_type == "kto" and args.train_sampling_strategy != "sequential":
        raise ValueError("loss_type='kto' estimates its KL term from mismatched pairs built per batch of the dataset "
                         f"order, so it needs train_sampling_strategy='sequential', got "
                         f"{args.train_sampling_strategy!r}")
    if args.loss_type == "kto" and args.per_device_train_batch_size <= 1:
        raise ValueError("loss_type='kto' needs per_device_train_batch_size > 1: with one example the KL term "
                         "equals the example's own log-ratio")
    if args.sync_ref_model and args.precompute_ref_log_probs:
        raise ValueError("sync_ref_model=True updates the reference, so precomputed reference log-probs would go "
                         "stale; set one of them to False")


def _warn_on_imbalance(dataset: Dataset, args: KTOConfig) -> None:
    """TRL's advice when desirable and undesirable counts differ (bounds from eq. 8 of the KTO paper)."""
    num_desirable = max(sum(dataset["label"]), 1)
    num_undesirable = max(len(dataset) - num_desirable, 1)
    if num_desirable == num_undesirable:
        return
    desirable = (num_undesirable * args.undesirable_weight / num_desirable)
    undesirable = (num_desirable * args.desirable_weight / num_undesirable)
    desirable_range = (round(desirable, 2), round(desirable * 1.33, 2))
    undesirable_range = (round(undesirable / 1.33, 2), round(undesirable, 2))
    if not (desirable_range[0] <= args.desirable_weight <= desirable_range[1]
            or undesirable_range[0] <= args.undesirable_weight <= undesirable_range[1]):
        logger.warning("%d desirable and %d undesirable examples: set desirable_weight in [%s, %s] or "
                       "undesirable_weight in [%s, %s] (not both)", num_desirable, num_undesirable,
                       *desirable_range, *undesirable_range)


class KTOTrainer(FusedTrainer):
    """Kahneman-Tversky Optimization (``loss_type="kto"``) and unpaired APO-zero (``"apo_zero_unpaired"``).

    Arguments as ``trl.KTOTrainer`` 1.16: ``model`` is a path or a causal LM (or a PeftModel); ``ref_model`` None
    means the initial policy; ``train_dataset`` has ``prompt``/``completion``/``label`` (standard or
    conversational), or is a paired ``prompt``/``chosen``/``rejected`` dataset, unpaired on the way in.
    """

    eval_predictions = "logits"  # for compute_metrics, as TRL's

    def __init__(self, model, ref_model=None, args: KTOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None):
        args = self._checked_inputs(model, args, KTOConfig, train_dataset, compute_metrics,
                                   eval_dataset, images_ok=True)
        _check_config(args)
        self.calculate_kl = args.loss_type != "apo_zero_unpaired"

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
        if data_collator is None and self._vision_data:
            data_collator = VisionUnpairedCollator(processing_class, tokenizer.pad_token_id, args.max_length,
                                                   self.calculate_kl, args.pad_to_multiple_of,
                                                   dtype=image_dtype(model))
        elif data_collator is None:
            data_collator = UnpairedCollator(tokenizer.pad_token_id, args.max_length, args.pad_to_multiple_of)
        self._max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        train_dataset, eval_dataset = self._prepare_splits(train_dataset, eval_dataset, tokenizer, args)
        if isinstance(train_dataset, Dataset):
            _warn_on_imbalance(train_dataset, args)

        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, compute_metrics=compute_metrics)

        self._setup_router_aux_loss(args)
        self._setup_reference(ref_model, args)

    # --- data ---------------------------------------------------------------------------------------------------

    def _prepare(self, dataset, tokenizer, args: KTOConfig, name: str):
        # TRL pairs the KL completions per training batch, for the eval datasets too.
        if self._vision_data:
            check_vision_dataset(dataset, paired=False, name=name)
            if not self.calculate_kl:
                return dataset
            return pair_kl_completions(dataset, kl_batch_size=args.per_device_train_batch_size,
                                       num_proc=args.dataset_num_proc, name=name)
        return prepare_unpaired_dataset(
            dataset, tokenizer, max_length=args.max_length, max_positions=self._max_positions,
            kl_batch_size=args.per_device_train_batch_size if self.calculate_kl else None,
            num_proc=args.dataset_num_proc, name=name)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None and self._vision_data:
            self._signature_columns = list(UNPAIRED_COLUMNS)
        elif self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids", "KL_completion_ids", "label", *_REF_COLUMNS]

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """``dataset`` with ``ref_logps`` (and ``ref_KL_logps`` for ``kto``) columns, from the reference in the
        training collation (same padding, so the same numbers a step would compute)."""
        if isinstance(dataset, IterableDataset):
            raise ValueError(PRECOMPUTE_ITERABLE_ERROR)  # noqa: TRY004 (TRL's type and words: its tests pin them)
        if all(column in dataset.column_names for column in _REF_COLUMNS[: 1 + self.calculate_kl]):
            return dataset
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        ))
        ref, ref_kl = [], []
        with self.compute_loss_context_manager():
            for batch in loader:
                batch_ref, batch_ref_kl = self._reference_logps(batch)
                ref.append(self.accelerator.gather_for_metrics(batch_ref).cpu())
                if self.calculate_kl:
                    ref_kl.append(self.accelerator.gather_for_metrics(batch_ref_kl).cpu())
        logger.info("%s dataset: precomputed reference log-probs of %d examples", name, len(dataset))
        dataset = dataset.add_column("ref_logps", torch.cat(ref).tolist())
        return dataset.add_column("ref_KL_logps", torch.cat(ref_kl).tolist()) if self.calculate_kl else dataset

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

    @staticmethod
    def _sequences(batch, prefix: str = "") -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Model inputs, labels ``[N, T]`` and the shifted completion mask ``[N, T - 1]`` of the examples
        (``prefix=""``) or of their mismatched KL pairs (``prefix="KL_"``)."""
        completion_mask = batch[f"{prefix}completion_mask"]
        labels = batch[f"{prefix}input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
        inputs = {key: batch.get(prefix + key, value) for key, value in batch.items()
                  if not key.startswith("KL_") and key not in _NON_MODEL_KEYS}
        return inputs, labels, completion_mask[:, 1:].bool()

    def logits_model_inputs(self, inputs: dict) -> dict:  # compute_metrics' logits: image fields included
        return self._sequences(inputs)[0]

    def _sequence_logps(self, model, batch, prefix: str = "") -> torch.Tensor:
        inputs, labels, mask_NT = self._sequences(batch, prefix)
        return sequence_logps(self.token_logprobs(model, inputs, labels).logps, mask_NT)

    def _reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self.reference_context() as reference:
            if self.calculate_kl and self.prefix_sharing.enabled:
                return self._paired_sequence_logps(reference, batch)
            ref_kl = self._sequence_logps(reference, batch, "KL_") if self.calculate_kl else None
            return self._sequence_logps(reference, batch), ref_kl

    def _paired_sequence_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples' and their KL pairs' sequence log-probs from ONE forward: example i and its KL row share
        prompt i, so the shared-prefix layout runs each prompt once for both (the two right-padded row sets are
        padded to one length; padding is masked and unlabelled, so no kept position changes)."""
        (inputs, labels, mask_NT), (kl_inputs, kl_labels, kl_mask_NT) = self._sequences(batch), \
            self._sequences(batch, "KL_")
        length = max(labels.shape[1], kl_labels.shape[1])

        def padded(tensor, value):
            return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)

        joint = {key: torch.cat([padded(inputs[key], 0), padded(kl_inputs[key], 0)]) for key in inputs}
        joint_labels = torch.cat([padded(labels, IGNORE_INDEX), padded(kl_labels, IGNORE_INDEX)])
        logps = self.token_logprobs(model, joint, joint_labels).logps
        logps, kl_logps = logps.split(labels.shape[0])
        return (sequence_logps(logps[:, :mask_NT.shape[1]], mask_NT),
                sequence_logps(kl_logps[:, :kl_mask_NT.shape[1]], kl_mask_NT))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("return_outputs=True needs logits, which fusedrl's KTOTrainer never builds")
        mode = self._mode()
        labels_N = inputs["label"].bool()
        kl = None
        if self.calculate_kl:
            with torch.no_grad():  # TRL's z is detached, so the policy side of it needs no graph either
                kl_logps = self._sequence_logps(model, inputs, "KL_")
        model_inputs, labels, mask_NT = self._sequences(inputs)
        head = self.head_inputs(model, model_inputs, labels, mean_logits=True, router_logits=self.aux_loss_enabled)
        if self.args.precompute_ref_log_probs:
            ref_logps, ref_kl_logps = inputs["ref_logps"], inputs.get("ref_KL_logps")
        else:
            ref_logps, ref_kl_logps = self._reference_logps(inputs)
        if self.calculate_kl:
            kl = self.accelerator.gather_for_metrics(kto_kl(kl_logps, ref_kl_logps).reshape(1)).mean()
        with self.head_region(head.hidden_NTH.device):
            out = self.loss_region(_kto_region)(head.hidden_NTH, head.weight_VH, head.bias_V, head.labels_NT,
                                                ref_logps, labels_N, kl, self.args, softcap=head.softcap)
        loss = out.loss  # TRL's reduction, a nanmean: a NaN example does not poison the batch
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * head.aux_loss
        policy = TokenOutputs(out.token_logps, out.entropy, head.stats["mean_logits"], aux_loss=head.aux_loss)
        self._record_metrics(mode, inputs, policy, mask_NT, labels_N, out.logps.detach(), out)
        if self.aux_loss_enabled:
            self.record(mode, "aux_loss", self.gathered_mean(policy.aux_loss))
        return loss

    def _gathered_sum(self, values: torch.Tensor) -> float:
        return self.accelerator.gather_for_metrics(values.detach().float().nansum().reshape(1)).nansum().item()

    def _record_metrics(self, mode, inputs, policy, mask_NT, labels_N, logps, out) -> None:
        """TRL's metrics; a label absent from the batch (on every process) records nothing for it."""
        self.record(mode, "kl", out.kl.item())
        self.record(mode, "entropy", self.masked_mean(policy.entropy, mask_NT))
        self.record_num_tokens(mode, inputs["attention_mask"])
        sides = {"chosen": labels_N, "rejected": ~labels_N}
        for side, selected_N in sides.items():
            side_mask_NT = mask_NT & selected_N[:, None]
            num_tokens = self._gathered_sum(side_mask_NT.float())
            if num_tokens > 0:
                self.record(mode, f"logits/{side}", self._gathered_sum(policy.mean_logits[side_mask_NT]) / num_tokens)
        rewards = {}
        for side, selected_N in sides.items():
            count = self._gathered_sum(selected_N.float())
            if count > 0:
                rewards[side] = self._gathered_sum(out.rewards[selected_N]) / count
                self.record(mode, f"rewards/{side}", rewards[side])
                self.record(mode, f"logps/{side}", self._gathered_sum(logps[selected_N]) / count)
        if len(rewards) == 2:
            self.record(mode, "rewards/margins", rewards["chosen"] - rewards["rejected"])
