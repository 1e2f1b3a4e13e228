"""Encoder-decoder models (T5) in ORPO and CPO: TRL 1.16's forward, with the fused head on the decoder's output.

Legend: N = 2B rows (B chosen, then B rejected), S prompt (encoder) positions, L answer (decoder) positions,
H hidden, V vocabulary.

TRL's experimental ORPO and CPO give an encoder-decoder model the prompt as encoder input, once per row (each prompt
twice), and the answer as decoder labels: ``decoder_input_ids`` are the labels shifted right behind
``decoder_start_token_id``, -100 read as the pad id, with no decoder attention mask (causal attention keeps the
padding after an answer away from it). The decoder's position t predicts ``labels[t]``, so nothing is shifted after
the forward, unlike a causal LM's ``[:, :-1]`` / ``[:, 1:]``; ``logits/*`` average every decoder position, padding
included.

The head's input is caught on the head itself (``runtime.hidden.head_input_forward``), not on the decoder: T5 scales
its decoder's output by ``d_model**-0.5`` before ``lm_head`` when ``config.scale_decoder_outputs`` (its original
checkpoints, whose head is the tied embedding; transformers 4 read ``tie_word_embeddings`` for it), and what the
head is handed includes that scaling, whatever rule a model version uses. BART-style models add a
``final_logits_bias`` after the head; a non-zero one is refused (``check_encoder_decoder``).
"""

from __future__ import annotations

import torch
from accelerate.utils import is_peft_model

from fusedrl.runtime.hidden import head_input_forward
from fusedrl.trainers.head import IGNORE_INDEX, HeadInputs, vocab_mean_logits


def shift_right(labels_NL: torch.Tensor, *, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Decoder inputs ``[N, L]`` of the labels ``[N, L]``: ``decoder_start_token_id``, then the labels but the last,
    -100 replaced by ``pad_token_id`` (what T5's ``_shift_right`` and TRL's do)."""
    shifted_NL = labels_NL.new_full(labels_NL.shape, decoder_start_token_id)
    shifted_NL[:, 1:] = labels_NL[:, :-1]
    return shifted_NL.masked_fill(shifted_NL == IGNORE_INDEX, pad_token_id)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if is_peft_model(model) else model


def check_encoder_decoder(model: torch.nn.Module) -> None:
    """Refuse an encoder-decoder model whose decoder inputs or logits the fused head path cannot reproduce."""
    base = _base(model)
    config = base.config
    name = type(base).__name__
    if getattr(config, "decoder_start_token_id", None) is None:
        raise ValueError(f"{name}: model.config.decoder_start_token_id is None; the answers' decoder inputs start "
                         "with it. Set it (T5 uses its pad id, 0)")
    if config.pad_token_id is None:
        raise ValueError(f"{name}: model.config.pad_token_id is None; the decoder inputs pad with it. Set it")
    bias = getattr(base, "final_logits_bias", None)
    if isinstance(bias, torch.Tensor) and bool(bias.ne(0).any()):
        raise ValueError(f"{name} adds a non-zero final_logits_bias to its logits; fusedrl's fused LM head computes "
                         "log_softmax(hidden @ lm_head.weight.T + lm_head.bias) and would give it wrong log-probs")


class EncoderDecoderHeadMixin:
    """The encoder-decoder counterpart of ``FusedHeadMixin.head_inputs`` (``self._lm_head``, ``self.head_softcap``
    and ``self.accelerator`` come from the trainer)."""

    def encoder_decoder_head_inputs(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], *,
                                    router_logits: bool = False) -> HeadInputs:
        """One forward of ``model`` on a batch of ``AnswerPairCollator(is_encoder_decoder=True)``: the head's input
        ``[N, L, H]`` in the head's dtype, its weight and bias, ``labels`` ``[N, L]`` (-100 where not scored, no
        shift), the MoE ``aux_loss`` if asked for, and ``stats["mean_logits"]`` ``[N, L]``: the vocabulary mean of
        the logits at every decoder position, padding included (TRL's ``logits/*``; exact, from ``mean_v(w)``)."""
        config = _base(self.accelerator.unwrap_model(model)).config
        labels_NL = inputs["labels"]
        model_inputs = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "decoder_input_ids": shift_right(labels_NL, decoder_start_token_id=config.decoder_start_token_id,
                                             pad_token_id=config.pad_token_id),
        }
        if router_logits:
            model_inputs["output_router_logits"] = True
        outputs, hidden_NLH = head_input_forward(model, **model_inputs)
        weight_VH, bias_V = self._lm_head(model)
        softcap = self.head_softcap(model)  # T5Gemma caps its logits as Gemma 2 does
        hidden_NLH = hidden_NLH.to(weight_VH.device, weight_VH.dtype)
        mean_logits_NL = vocab_mean_logits(hidden_NLH.detach(), weight_VH.detach(),
                                           None if bias_V is None else bias_V.detach(), softcap)
        aux_loss = getattr(outputs, "aux_loss", None) if router_logits else None
        return HeadInputs(hidden_NLH, weight_VH, bias_V, labels_NL.to(weight_VH.device), aux_loss,
                          {"mean_logits": mean_logits_NL}, softcap)
