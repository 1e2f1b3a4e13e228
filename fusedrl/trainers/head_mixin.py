"""The fused LM head of a fusedrl trainer, mixed into ``FusedTrainer``: the head's weight as the step uses it
(gathered when sharded, bf16 under bf16 mixed precision) and its soft cap (:meth:`FusedHeadMixin.head_softcap`), one
model forward turned into what a fused head+loss op takes (:meth:`FusedHeadMixin.head_inputs`), the region the head
runs in, and next-token log-probs from hidden states (:meth:`FusedHeadMixin.token_logprobs`). ``[N, T, V]`` logits
never exist.

Legend: N sequences, T positions (``T - 1`` next-token positions), H hidden, V vocabulary, M labelled tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from accelerate.utils import is_peft_model

from fusedrl.ops.logprobs import soft_cap
from fusedrl.runtime.compile import compile_region
from fusedrl.runtime.sharded_head import keep_root_unsharded, whole_head
from fusedrl.trainers.head import (
    IGNORE_INDEX,
    HeadInputs,
    TokenOutputs,
    head_logprobs,
    head_statistics,
    labelled_mean_logits,
    vocab_mean_logits,
)
from fusedrl.trainers.models import head_logit_multiplier, head_logit_softcap

logger = logging.getLogger("fusedrl")
# Rows of full logits projected at once for compute_metrics: bounds the head's transient output to 4 [T, V] rows.
_LOGITS_CHUNK_ROWS = 4


class FusedHeadMixin:
    """The head side of ``FusedTrainer`` (``self.accelerator``, ``self.args`` and ``self._model_forward`` come from
    the trainer)."""


    def _lm_head(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        # FSDP2 / ZeRO-3 shards are gathered with gradients flowing back to them (runtime/sharded_head.py). Call it
        # after the model forward, once per forward.
        unwrapped = self.accelerator.unwrap_model(model)
        keep_root_unsharded(unwrapped)
        if is_peft_model(unwrapped):
            unwrapped = unwrapped.get_base_model()
        weight_VH, bias_V = whole_head(unwrapped.get_output_embeddings())
        # Cohere's logit_scale, Granite's logits_scaling: a constant factor on the logits, folded into the weight
        # (one [V, H] copy per call, differentiable).
        multiplier = head_logit_multiplier(unwrapped)
        if multiplier != 1.0:
            weight_VH = weight_VH * multiplier
            bias_V = None if bias_V is None else bias_V * multiplier
        # bf16 mixed precision (bf16=True; accelerate runs the model's forward under autocast, the head runs after
        # it): the head runs in bf16, as autocast runs every other linear layer, and its ops accumulate in fp32
        # inside. A bf16 matmul is ~4x an fp32 one on this CPU's AMX (537 vs 133 GFLOP/s) and on tensor cores. The
        # cast is differentiable, so the fp32 master weight gets its gradient; it costs one [V, H] copy per call, as
        # autocast's own would. fp16 stays fp32: fp16 logits tiles could overflow (65504) where bf16's cannot.
        # GRPO's cast_lm_head_to_fp32 (ScaleRL) asks for the fp32 head instead: the weight stays fp32, and the
        # trainers hand it hidden states in the weight's dtype.
        fp32_head = getattr(self.args, "cast_lm_head_to_fp32", False)
        if self.accelerator.mixed_precision == "bf16" and weight_VH.dtype == torch.float32 and not fp32_head:
            weight_VH = weight_VH.to(torch.bfloat16)
            bias_V = None if bias_V is None else bias_V.to(torch.bfloat16)
        return weight_VH, bias_V

    def head_softcap(self, model: torch.nn.Module) -> float | None:
        """The soft cap of ``model``'s logits (Gemma 2's ``final_logit_softcapping``), or None: every fused op on the
        weight :meth:`_lm_head` gives takes it as ``softcap=``. The cap comes after the constant multiplier
        ``_lm_head`` folds into the weight, as in the models' forwards."""
        unwrapped = self.accelerator.unwrap_model(model)
        if is_peft_model(unwrapped):
            unwrapped = unwrapped.get_base_model()
        return head_logit_softcap(unwrapped)

    def head_inputs(
        self,
        model: torch.nn.Module,
        model_inputs: dict[str, torch.Tensor],
        labels_NT: torch.Tensor,
        *,
        statistics_mask: torch.Tensor | None = None,
        router_logits: bool = False,
        all_position_mean_logits: bool = False,
        mean_logits: bool = False,
    ) -> HeadInputs:
        """Run ``model`` (policy, reference or wrapped) and return what its fused head needs: final hidden states
        ``[N, T - 1, H]`` in the head's dtype, the head's weight and bias, the shifted labels ``[N, T - 1]``, plus the
        detached statistics asked for: ``statistics_mask`` as in :meth:`token_logprobs` but from a no-grad head pass
        of their own (``head.head_statistics``); ``mean_logits`` asks for ``mean_logits`` alone (exact and almost
        free), for a caller whose head op returns the other statistics from its own tiles."""
        extra = {"output_router_logits": True} if router_logits else {}
        # The final (normed) hidden states come from a hook on the decoder trunk (runtime/hidden.py): asking for
        # output_hidden_states would install transformers' capture hooks, which compiled blocks cannot trace.
        # logits_to_keep=1 leaves a [N, 1, V] slice of logits, whose gradient is zero.
        # ORPO/CPO's all-position logits metric reads the padded positions too: keep them in a shared layout.
        outputs, final_NTH = self._model_forward(model, model_inputs, keep_padding=all_position_mean_logits,
                                                 **extra)
        weight_VH, bias_V = self._lm_head(model)
        softcap = self.head_softcap(model)
        length = labels_NT.shape[1]
        # Prompt-learning PEFT prepends virtual tokens: the real positions are the last T. The head runs in the
        # dtype _lm_head gives its weight (the autocast dtype under mixed precision).
        hidden_NTH = final_NTH[:, -length:-1].to(weight_VH.device, weight_VH.dtype)
        labels_NT = labels_NT[:, 1:].to(weight_VH.device)
        stats = {}
        detached_bias = None if bias_V is None else bias_V.detach()
        if statistics_mask is not None:
            stats = head_statistics(hidden_NTH.detach(), weight_VH.detach(), detached_bias, labels_NT,
                                    statistics_mask, softcap)
        elif mean_logits:
            stats = {"mean_logits": labelled_mean_logits(hidden_NTH.detach(), weight_VH.detach(), detached_bias,
                                                         labels_NT, softcap)}
        if all_position_mean_logits:
            full_NTH = final_NTH[:, -length:].detach().to(weight_VH.device, weight_VH.dtype)
            stats["mean_logits"] = vocab_mean_logits(full_NTH, weight_VH.detach(), detached_bias, softcap)
        aux_loss = getattr(outputs, "aux_loss", None) if router_logits else None
        return HeadInputs(hidden_NTH, weight_VH, bias_V, labels_NT, aux_loss, stats, softcap)

    @contextlib.contextmanager
    def head_region(self, device: torch.device) -> Iterator[None]:
        """Around the fused head and loss: autocast off (the ops accumulate in fp32 themselves) and activation
        offloading paused (the head's saved hidden states are the first thing the backward needs)."""
        offloader = getattr(self, "_activation_offloader", None)
        with torch.autocast(device.type, enabled=False), \
                offloader.paused() if offloader is not None else contextlib.nullcontext():
            yield

    def loss_region(self, fn: Callable) -> Callable:
        """``fn`` (final hidden states -> loss, pure tensor math) compiled with ``fullgraph=True`` when
        ``args.compile`` is set, else ``fn`` itself; run it inside :meth:`head_region`."""
        return compile_region(fn) if self.args.compile else fn

    def logits_model_inputs(self, inputs: dict) -> dict:
        """The forward keywords of an eval batch for :meth:`sequence_logits`: its ids and mask (a trainer whose
        batches carry more model inputs, such as a VLM's image fields, returns those too)."""
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}

    @torch.no_grad()
    def sequence_logits(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[N, T, V]`` logits of ``inputs["input_ids"]`` under ``model``, what TRL's DPO / KTO hand an evaluation's
        ``compute_metrics``: built only then, from one forward's final hidden states, ``_LOGITS_CHUNK_ROWS`` rows of
        the head at a time. They cost ``N * T * V`` elements per eval batch (32000 x 512 tokens x 8 rows in fp32:
        0.5 GiB), which Trainer keeps for the whole eval set unless ``eval_accumulation_steps`` moves them to the CPU;
        the size is logged once. The forward takes :meth:`logits_model_inputs` (a vision batch's image fields too)."""
        model_inputs = self.logits_model_inputs(inputs)
        _, final_NTH = self._model_forward(model, model_inputs, keep_padding=True)  # logits at every position
        weight_VH, bias_V = self._lm_head(model)
        softcap = self.head_softcap(model)
        logits = final_NTH.new_empty((*final_NTH.shape[:2], weight_VH.shape[0]), dtype=weight_VH.dtype)
        if not getattr(self, "_logged_logits_cost", False):
            self._logged_logits_cost = True
            logger.warning("compute_metrics: building the [N, T, V] = %s logits of each eval batch (%.0f MiB), as TRL "
                           "does; set eval_accumulation_steps to move them to the CPU", list(logits.shape),
                           logits.numel() * logits.element_size() / 2**20)
        for start in range(0, logits.shape[0], _LOGITS_CHUNK_ROWS):
            rows = slice(start, start + _LOGITS_CHUNK_ROWS)
            logits[rows] = torch.nn.functional.linear(final_NTH[rows].to(weight_VH.dtype), weight_VH, bias_V)
            if softcap:  # the model's own logits are capped (fp32 here, stored in the head's dtype)
                logits[rows] = soft_cap(logits[rows], softcap)
        return logits

    def token_logprobs(
        self,
        model: torch.nn.Module,
        model_inputs: dict[str, torch.Tensor],
        labels_NT: torch.Tensor,
        *,
        with_entropy: bool = False,
        statistics_mask: torch.Tensor | None = None,
        router_logits: bool = False,
        all_position_mean_logits: bool = False,
    ) -> TokenOutputs:
        """Next-token log-probs of ``labels_NT[:, 1:]`` under ``model`` (policy, reference or wrapped), ``[N, T - 1]``.

        labels_NT: ``[N, T]`` token ids with ``-100`` at positions that are not scored (prompt, padding); those cost
        no head compute. ``statistics_mask`` ``[N, T - 1]`` (bool) asks for ``mean_logits`` and, at its positions,
        ``is_top1`` and ``log_sum_sq_probs``, from the log-probs' own logits tiles (no head pass of their own).
        ``router_logits`` asks a mixture-of-experts model for its load-balancing ``aux_loss``.
        ``all_position_mean_logits`` makes ``mean_logits`` ``[N, T]``: the vocabulary mean of the logits at every input
        position, padding and the last one included (TRL's ORPO/CPO average their ``logits/*`` metrics over those).
        """
        with_stats = statistics_mask is not None
        head = self.head_inputs(model, model_inputs, labels_NT, mean_logits=with_stats, router_logits=router_logits,
                                all_position_mean_logits=all_position_mean_logits)
        with self.head_region(head.hidden_NTH.device):
            result = self.loss_region(head_logprobs)(head.hidden_NTH, head.weight_VH, head.bias_V, head.labels_NT,
                                                      with_entropy, with_stats, head.softcap)
        if not (with_entropy or with_stats):
            return TokenOutputs(result, aux_loss=head.aux_loss, **head.stats)
        stats = dict(head.stats)
        if with_stats:  # from the log-probs' own tiles, kept at the asked positions
            scored_NT = statistics_mask & (head.labels_NT != IGNORE_INDEX)
            stats["is_top1"] = result.is_top1 & scored_NT
            stats["log_sum_sq_probs"] = torch.where(scored_NT, result.log_sum_sq_probs, 0.0)
        entropy = result.entropy.detach() if with_entropy else None
        return TokenOutputs(result.logprobs, entropy, aux_loss=head.aux_loss, **stats)
