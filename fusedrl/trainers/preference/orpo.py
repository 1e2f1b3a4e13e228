"""ORPOTrainer: TRL 1.16's ORPO recipe (``trl.experimental.orpo``), step for step, on fusedrl's fused LM head.

ORPO (https://arxiv.org/abs/2403.07691) has no reference model: it adds to the chosen NLL an odds-ratio term that
pushes the odds of the chosen completion above the rejected one's (``fusedrl.ops.preference.orpo_loss``, on the
``preference`` backend of ``kernels``). So unlike DPO there is one forward per step, and the data path is TRL's
older experimental one, which CPO shares (:class:`ReferenceFreeTrainer`, also used by
``fusedrl.trainers.preference.cpo``):

- tokenization (``answer_pairs.tokenize_answer_pair_row``) into TRL's columns (``chosen_input_ids``,
  ``chosen_labels``...; a dataset already tokenized that way is taken as it is): text without special tokens, BOS/EOS
  added by hand, answers (never prompts) cut to ``max_length``;
- a batch of B pairs is 2B rows ``[chosen; rejected]`` (``answer_pairs.AnswerPairCollator``);
- ``logits/*`` average the logits over every position of the padded rows, padding included, as TRL's do (from the
  final hidden states: ``mean_v(logits) = h . mean_v(w)``, so no ``[N, T, V]`` tensor is built here either);
- encoder-decoder models (T5), as TRL runs them (``encoder_decoder.py``): the prompt, tokenized with special tokens,
  feeds the encoder, the answers (cut to ``max_completion_length``, 128 if None) are the decoder's labels, and the
  fused head runs on what the model hands its LM head (T5's ``d_model**-0.5`` scaling included).

One ORPO step: per-token log-probs of the chosen rows' whole sequences (the NLL is over prompt and completion, as in
TRL) and of the rejected rows' completions; mean completion log-probs per row; ``loss = nll + mean(-beta *
logsig(log_odds))``, all in one ``linear_orpo_loss(fused=True)`` call (3 head passes: the gradient is formed in the
forward); TRL's metrics: rewards/{chosen,rejected,accuracies,margins}, logps/*, logits/*, nll_loss,
log_odds_ratio, log_odds_chosen.

Deliberate differences from TRL: a row whose prompt alone fills ``max_length`` is dropped (TRL keeps it with an empty
answer and a NaN loss); a model given as a path loads in fp32 unless ``model_init_kwargs`` says otherwise (TRL leaves
it to transformers' default), and ``model_init_kwargs`` next to a model instance is ignored with a warning (TRL
raises); ``padding_value`` pads the whole row (TRL pads each half with the tokenizer's pad id first, which only moves
the padding part of logits/*); ``model_init`` is not supported; ``preprocess_logits_for_metrics`` (it needs logits)
and ``generate_during_eval`` (W&B/Comet) are refused; encoder-decoder models train one adapter at a time (no joint
mode); ``compute_metrics`` gets TRL's predictions, ``[logits/chosen, logits/rejected]`` of each eval batch.
"""

from __future__ import annotations

import abc
import logging

import torch
from datasets import IterableDataset
from transformers import set_seed

from fusedrl.ops.preference import LinearORPOLoss, linear_orpo_loss
from fusedrl.trainers.adapters.joint import joint_adapter_names
from fusedrl.trainers.base import FusedTrainer
from fusedrl.trainers.config import FusedConfig
from fusedrl.trainers.head import IGNORE_INDEX, HeadInputs
from fusedrl.trainers.models import tokenizer_of
from fusedrl.trainers.preference.answer_pairs import (
    ANSWER_PAIR_COLUMNS,
    DEFAULT_MAX_COMPLETION_LENGTH,
    ENCODER_DECODER_COLUMNS,
    AnswerPairCollator,
    prepare_answer_pair_dataset,
)
from fusedrl.trainers.preference.encoder_decoder import EncoderDecoderHeadMixin, check_encoder_decoder
from fusedrl.trainers.preference.orpo_config import ORPOConfig

logger = logging.getLogger("fusedrl")

# TRL's ORPO/CPO fall back to this max_length when it is None.
_DEFAULT_MAX_LENGTH = 512


class ReferenceFreeTrainer(EncoderDecoderHeadMixin, FusedTrainer, abc.ABC):
    """What TRL 1.16's experimental ORPO and CPO trainers share (their sources are copies apart from the loss):
    construction, data, the one policy forward per step, metrics. Subclasses set ``config_class``/``method`` and
    implement :meth:`scored_rows` and :meth:`head_loss`.
    """

    config_class: type[FusedConfig] = FusedConfig
    eval_predictions = "mean_logits"  # compute_metrics gets [logits/chosen, logits/rejected], as TRL's
    method = ""

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, model_init=None, callbacks=None, optimizers=(None, None),
                 preprocess_logits_for_metrics=None, peft_config=None, compute_metrics=None):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = self.config_class(f"{name.rstrip('/').split('/')[-1] or 'model'}-{self.method}")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if model_init is not None:
            raise ValueError(f"model_init is not supported by fusedrl's {type(self).__name__}; pass model")
        if preprocess_logits_for_metrics is not None:
            raise ValueError(f"preprocess_logits_for_metrics needs logits, which fusedrl's {type(self).__name__} "
                             "never builds (compute_metrics gets [logits/chosen, logits/rejected], as TRL's)")
        if args.generate_during_eval:
            raise ValueError("generate_during_eval=True is not supported (TRL logs the generations to "
                                      "W&B/Comet); use a completions callback from fusedrl.trainers.callbacks")
        first_dataset = self._joint_datasets(args, train_dataset, eval_dataset)  # joint mode: a dict per adapter
        if isinstance(first_dataset, IterableDataset):
            args.accelerator_config.dispatch_batches = False
        columns = first_dataset.column_names or list(next(iter(first_dataset)).keys())
        if "image" in columns or "images" in columns:
            raise ValueError(f"vision preference data is not supported by fusedrl's {type(self).__name__}")
        self.check_config(args)

        set_seed(args.seed)  # PEFT initialises adapters randomly
        model, processing_class = self._setup_model(model, args, processing_class, peft_config=peft_config,
                                                    ref_model=None, quantization_config=None, reference=False)
        self._setup_encoder_decoder(model, args)
        tokenizer = tokenizer_of(processing_class)
        if args.max_length is None:
            logger.warning("max_length is None: using %d, as TRL does", _DEFAULT_MAX_LENGTH)
        self.max_length = _DEFAULT_MAX_LENGTH if args.max_length is None else args.max_length
        if data_collator is None:
            padding_value = getattr(args, "padding_value", None)
            # TRL pads an encoder-decoder prompt with the tokenizer's pad id (its attention mask hides it anyway).
            if self.is_encoder_decoder or padding_value is None:
                padding_value = tokenizer.pad_token_id
            data_collator = AnswerPairCollator(padding_value, is_encoder_decoder=self.is_encoder_decoder)
        train_dataset, eval_dataset = self._prepare_splits(train_dataset, eval_dataset, tokenizer, args)

        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, compute_metrics=compute_metrics)
        # TRL's experimental trainers read the MoE router settings from the model config alone.
        self.aux_loss_enabled = getattr(self.model.config, "output_router_logits", False)
        self.aux_loss_coef = getattr(self.model.config, "router_aux_loss_coef", 0.0)
        if self.aux_loss_enabled and self.aux_loss_coef == 0.0:
            logger.warning("output_router_logits=True but router_aux_loss_coef=0.0: the router loss is not used")
        self._finish_setup(None, precompute=True)  # reference-free: no reference model is made

    def check_config(self, args) -> None:
        """Configuration errors of the method, raised at construction."""

    def _setup_encoder_decoder(self, model, args) -> None:
        """``is_encoder_decoder`` and ``max_completion_length`` as TRL sets them: the model's config decides (the
        config field only matters to TRL when no model is given, which fusedrl does not take)."""
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        if args.is_encoder_decoder is not None and bool(args.is_encoder_decoder) != self.is_encoder_decoder:
            logger.warning("is_encoder_decoder=%s is ignored: %s's config says %s, as TRL reads it",
                           args.is_encoder_decoder, type(model).__name__, self.is_encoder_decoder)
        self.max_completion_length = args.max_completion_length
        if not self.is_encoder_decoder:
            return
        check_encoder_decoder(model)
        if joint_adapter_names(args):
            raise ValueError(f"model_adapter_name={list(joint_adapter_names(args))}: an encoder-decoder model trains "
                             "one adapter at a time in fusedrl; pass a single name")
        if self.max_completion_length is None:
            logger.warning("max_completion_length is None: using %d for the encoder-decoder model's answers, as "
                           "TRL does", DEFAULT_MAX_COMPLETION_LENGTH)
            self.max_completion_length = DEFAULT_MAX_COMPLETION_LENGTH

    # --- data ---------------------------------------------------------------------------------------------------

    def _prepare(self, dataset, tokenizer, args, name: str):
        return prepare_answer_pair_dataset(dataset, tokenizer, max_length=self.max_length,
                                           is_encoder_decoder=self.is_encoder_decoder,
                                           max_completion_length=self.max_completion_length,
                                           num_proc=args.dataset_num_proc, name=name)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(ENCODER_DECODER_COLUMNS if self.is_encoder_decoder else ANSWER_PAIR_COLUMNS)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # A dataset passed here gets the preparation __init__ gives eval_dataset (prepared data is left as is).
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            tokenizer = tokenizer_of(self.processing_class)
            if isinstance(eval_dataset, dict):
                eval_dataset = {key: self._prepare(ds, tokenizer, self.args, key) for key, ds in eval_dataset.items()}
            else:
                eval_dataset = self._prepare(eval_dataset, tokenizer, self.args, "eval")
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    # --- loss ---------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def scored_rows(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[2B, T]`` 0/1 mask of the tokens whose log-probs the loss needs (decoder-only; an encoder-decoder model
        scores its ``labels``, the answers)."""

    def completion_positions(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The answers' 0/1 mask aligned with ``HeadInputs.labels_NT``: ``[2B, T - 1]`` next-token positions for a
        causal LM, ``[2B, L]`` decoder positions (no shift) for an encoder-decoder model."""
        return inputs["completion_mask"] if self.is_encoder_decoder else inputs["completion_mask"][:, 1:]

    @abc.abstractmethod
    def head_loss(self, head: HeadInputs, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The loss from the final hidden states and the LM head (``head``; its fused head+loss op makes 3 head
        passes), and its TRL metrics as detached tensors (means are taken after gathering): rewards and log-probs
        ``[B]`` (keys ``chosen_rewards``, ``rejected_rewards``, ``chosen_logps``, ``rejected_logps``), then
        method-specific scalars under their TRL names. Runs inside :meth:`head_region`."""

    def logits_positions(self, mean_logits_NT: torch.Tensor) -> torch.Tensor:
        """The positions TRL's ``logits/*`` average over (all of them for CPO; ORPO drops the last)."""
        return mean_logits_NT

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError(f"return_outputs=True needs logits, which {type(self).__name__} never builds")
        if self.is_encoder_decoder:
            head = self.encoder_decoder_head_inputs(model, inputs, router_logits=self.aux_loss_enabled)
        else:
            labels = inputs["input_ids"].masked_fill(self.scored_rows(inputs) == 0, IGNORE_INDEX)
            model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            head = self.head_inputs(model, model_inputs, labels, all_position_mean_logits=True,
                                    router_logits=self.aux_loss_enabled)
        with self.head_region(head.hidden_NTH.device):
            loss, metrics = self.head_loss(head, inputs)
        if self.aux_loss_enabled:
            loss = loss + self.aux_loss_coef * head.aux_loss
        self._record_metrics(self._mode(), metrics, self.logits_positions(head.stats["mean_logits"]))
        return loss

    def _record_metrics(self, mode: str, metrics: dict[str, torch.Tensor], mean_logits_NT: torch.Tensor) -> None:
        chosen_rewards, rejected_rewards = metrics.pop("chosen_rewards"), metrics.pop("rejected_rewards")
        chosen_logits, rejected_logits = mean_logits_NT.chunk(2)
        self.record(mode, "rewards/chosen", self.gathered_mean(chosen_rewards))
        self.record(mode, "rewards/rejected", self.gathered_mean(rejected_rewards))
        self.record(mode, "rewards/accuracies", self.gathered_mean((chosen_rewards > rejected_rewards).float()))
        self.record(mode, "rewards/margins", self.gathered_mean(chosen_rewards - rejected_rewards))
        self.record(mode, "logps/rejected", self.gathered_mean(metrics.pop("rejected_logps")))
        self.record(mode, "logps/chosen", self.gathered_mean(metrics.pop("chosen_logps")))
        # TRL averages per process, then over processes.
        self.record(mode, "logits/rejected", self.gathered_mean(rejected_logits.mean().reshape(1)))
        self.record(mode, "logits/chosen", self.gathered_mean(chosen_logits.mean().reshape(1)))
        for name, value in metrics.items():
            self.record(mode, name, self.gathered_mean(value.reshape(-1)))


class ORPOTrainer(ReferenceFreeTrainer):
    """Odds Ratio Preference Optimization. Arguments as ``trl.experimental.orpo.ORPOTrainer`` 1.16: ``model`` is a
    path or a causal LM, or an encoder-decoder model instance (or a PeftModel); ``train_dataset`` has
    ``prompt``/``chosen``/``rejected`` (standard or conversational; the prompt may be implicit) or TRL's tokenized
    columns."""

    config_class = ORPOConfig
    method = "ORPO"

    def scored_rows(self, inputs):
        # The chosen NLL covers prompt and completion; the odds ratio only the completions.
        num_pairs = inputs["input_ids"].shape[0] // 2
        return torch.cat([inputs["attention_mask"][:num_pairs], inputs["completion_mask"][num_pairs:]])

    def logits_positions(self, mean_logits_NT):
        # TRL drops a causal LM's last position (it predicts nothing); a decoder's positions all predict a label.
        return mean_logits_NT if self.is_encoder_decoder else mean_logits_NT[:, :-1]

    def head_loss(self, head, inputs):
        out = self.loss_region(_orpo_region)(head.hidden_NTH, head.weight_VH, head.bias_V, head.labels_NT,
                                             self.completion_positions(inputs), self.args.beta, softcap=head.softcap)
        metrics = {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards,
                   "chosen_logps": out.chosen_logps.detach(), "rejected_logps": out.rejected_logps.detach(),
                   "nll_loss": out.chosen_nll.detach(), "log_odds_ratio": out.log_odds_ratio.mean(),
                   "log_odds_chosen": out.log_odds_chosen.mean()}
        return out.loss, metrics


def _orpo_region(hidden_NTH, weight_VH, bias_V, labels_NT, completion_mask_NT, beta: float,
                 softcap: float | None = None) -> LinearORPOLoss:
    """The loss region (compiled whole with ``compile=True``): hidden states -> fused head -> mean completion
    log-probs and the chosen NLL -> ORPO's loss, 3 head passes (``linear_orpo_loss(fused=True)``); softcap: the
    head's soft cap."""
    return linear_orpo_loss(hidden_NTH, weight_VH, labels_NT, completion_mask=completion_mask_NT, bias=bias_V,
                            beta=beta, fused=True, softcap=softcap)
