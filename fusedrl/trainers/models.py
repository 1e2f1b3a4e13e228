"""Models as the trainers take them: loading from a path (TRL's fp32 default), the tokenizer of a processor, PEFT
wrapping, the trained and reference adapters (named by ``model_adapter_name`` / ``ref_adapter_name``:
``adapters/named.py``; else the frozen ``ref`` adapter), dropout off, and the refusal of heads the fused LM head
cannot reproduce."""

from __future__ import annotations

import logging

import torch
from accelerate.utils import is_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from fusedrl.trainers.adapters.named import REF_ADAPTER, check_adapter_names, create_adapters, select_trained_adapter

logger = logging.getLogger("fusedrl")

__all__ = ["REF_ADAPTER", "check_plain_head", "disable_dropout", "load_causal_lm", "prepare_model", "tokenizer_of"]
# Config attributes through which some architectures rescale or soft-cap their logits. The fused head projects with
# the plain LM-head weight, so such a model would silently get wrong log-probs; it is refused instead.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def load_causal_lm(model: str | PreTrainedModel, args, quantization_config=None) -> PreTrainedModel:
    """``model`` itself, or the causal LM stored at the path ``model`` (fp32 unless ``model_init_kwargs['dtype']``)."""
    if not isinstance(model, str):
        if args.model_init_kwargs is not None:
            logger.warning("model_init_kwargs is ignored: the model is already instantiated")
        if quantization_config is not None:
            raise ValueError("quantization_config only applies to a model given as a path; the model is an instance")
        return model
    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ValueError("quantization_config is set both as a trainer argument and in model_init_kwargs")
        kwargs["quantization_config"] = quantization_config
    dtype = kwargs.get("dtype", "float32")
    if isinstance(dtype, str) and dtype in ("bfloat16", "float16", "float32"):
        dtype = getattr(torch, dtype)
    elif not (dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype)):
        raise ValueError(f"model_init_kwargs['dtype'] must be 'auto', a torch.dtype or one of bfloat16, float16, "
                         f"float32; got {dtype!r}")
    kwargs["dtype"] = dtype
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(model, **kwargs)


def tokenizer_of(processing_class) -> PreTrainedTokenizerBase:
    """The tokenizer of a ``processing_class``: a tokenizer itself, or the ``.tokenizer`` of a processor."""
    if processing_class is None:
        raise ValueError("no processing_class (tokenizer) was given; pass the model's tokenizer or processor")
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def check_plain_head(model: PreTrainedModel) -> None:
    config = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"{type(model).__name__} transforms its logits ({name}={value}); fusedrl's fused LM head computes "
                "log_softmax(hidden @ lm_head.weight.T + bias) and would give this model wrong log-probs"
            )


def prepare_model(model, args, processing_class, *, peft_config, ref_model, quantization_config,
                 reference: bool = True):
    """Load ``model``, give the tokenizer a pad token, wrap with PEFT (the adapter(s) named ``model_adapter_name``
    when set), select the trained adapter; returns ``(model, processing_class)``. ``reference=False``
    (reference-free: ORPO, CPO, GRPO with beta 0) makes no frozen ``ref`` copy of a pretrained adapter; nor does a
    reference named by ``ref_adapter_name``."""
    model = load_causal_lm(model, args, quantization_config)
    if ref_model is model:
        raise ValueError("model and ref_model are the same object; omit ref_model to get a frozen copy")
    if args.ref_adapter_name is not None and ref_model is not None:
        raise ValueError(f"both ref_model and ref_adapter_name={args.ref_adapter_name!r} name a reference; pass one")
    if args.ref_adapter_name is not None and not reference:
        raise ValueError(f"ref_adapter_name={args.ref_adapter_name!r} but this trainer uses no reference (a "
                         "reference-free loss, or beta=0); unset ref_adapter_name")
    if processing_class is None:
        from transformers import AutoTokenizer

        processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path,
                                                         trust_remote_code=args.trust_remote_code)
    tokenizer = tokenizer_of(processing_class)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    check_plain_head(model)
    if peft_config is not None:
        if is_peft_model(model):
            raise ValueError("model is already a PeftModel and peft_config is given; merge the adapter first, "
                             "or pass the base model with peft_config")
        model = create_adapters(model, peft_config, args.model_adapter_name)
    check_adapter_names(model, args)
    if is_peft_model(model):
        select_trained_adapter(model, args)
    if (peft_config is None and is_peft_model(model) and ref_model is None and reference
            and args.ref_adapter_name is None and args.model_adapter_name is None):
        # A pretrained adapter is the starting policy, so the reference is a frozen copy of it, not the base. With
        # adapters named (model_adapter_name), the reference is ref_adapter_name or else the base, as in TRL's old
        # null_ref_context: one rule whether one adapter trains or several (a joint run then equals its separate
        # runs, adapters/joint.py).
        model.add_adapter(REF_ADAPTER, model.peft_config[model.active_adapter])
        params = dict(model.named_parameters())
        for name, param in params.items():
            if f".{model.active_adapter}." in name:
                params[name.replace(f".{model.active_adapter}.", f".{REF_ADAPTER}.")].data.copy_(param.data)
    if is_peft_model(model):
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(model.get_base_model().get_output_embeddings(), BaseTunerLayer):
            raise ValueError("a PEFT adapter on lm_head is not supported: the fused head reads lm_head.weight "
                             "directly, so the adapter would never train; remove 'lm_head' from target_modules")
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
    return model, processing_class
