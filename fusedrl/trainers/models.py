"""Models as the trainers take them: loading from a path (TRL's fp32 default; every ``model_init_kwargs`` entry
reaches ``from_pretrained``, and the tokenizer of a model loaded by path is read from the same revision), the
tokenizer of a processor, PEFT wrapping, the trained and reference adapters (named by ``model_adapter_name`` /
``ref_adapter_name``: ``adapters/named.py``; else the frozen ``ref`` adapter), dropout off, and the refusal of heads
the fused LM head cannot reproduce and of tokenizers larger than the model's embeddings. A final soft cap of the
logits (``final_logit_softcapping``: Gemma 2/3) is not refused: the fused head applies it
(:func:`head_logit_softcap`)."""

from __future__ import annotations

import logging
import os

import torch
from accelerate.utils import is_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from fusedrl.trainers.adapters.named import REF_ADAPTER, check_adapter_names, create_adapters, select_trained_adapter

logger = logging.getLogger("fusedrl")

__all__ = ["CAST_LM_HEAD_PEFT_ERROR", "REF_ADAPTER", "check_plain_head", "check_vocab_fits", "disable_dropout",
           "head_logit_multiplier", "head_logit_softcap", "load_causal_lm", "load_tokenizer", "prepare_model",
           "pretrained_kwargs", "tokenizer_of"]
# TRL 1.16's refusal of GRPO's cast_lm_head_to_fp32 with an adapted lm_head, in its words (prepare_model, grpo_setup).
CAST_LM_HEAD_PEFT_ERROR = (
    "`cast_lm_head_to_fp32=True` is not supported when the lm_head carries a PEFT adapter (e.g. `target_modules` "
    "includes `lm_head`). Remove `lm_head` from the adapter's target modules, or set `cast_lm_head_to_fp32=False`.")
# Config attributes through which some architectures rescale their logits. The fused head projects with the plain
# LM-head weight, so such a model would silently get wrong log-probs; it is refused instead, unless the transform is a
# constant factor (_LINEAR_LOGIT_SCALES). The final soft cap (final_logit_softcapping) is not among them: the fused
# head's ops take it (softcap=, read by head_logit_softcap).
_LOGIT_TRANSFORMS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_SOFTCAP_FIELD = "final_logit_softcapping"
# Models whose logits are the head's output times a constant (model_type -> config field, divides?): the fused head
# folds the constant into its weight (hidden @ (c W).T == c * (hidden @ W.T)), so their log-probs stay exact. Read
# from each model's forward in transformers 5.25: Cohere multiplies by logit_scale, Granite divides by logits_scaling,
# HyperCLOVA X multiplies by it.
_LINEAR_LOGIT_SCALES = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), ("logit_scale", False)),
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa",
                     "granitemoe_swa"), ("logits_scaling", True)),
    "hyperclovax": ("logits_scaling", False),
}
_DTYPE_NAMES = ("bfloat16", "float16", "float32")
# The from_pretrained arguments that say which files are read; a tokenizer loaded for a model given by path is read
# with the same ones, so a pinned revision (or a cache directory, a token) applies to both.
_SOURCE_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code")


def pretrained_kwargs(model_init_kwargs: dict | None, trust_remote_code: bool, *,
                      default_dtype: str | None = "float32") -> dict:
    """``model_init_kwargs`` as ``from_pretrained`` takes them, every entry kept: ``dtype`` (also under its old name
    ``torch_dtype``) as a ``torch.dtype`` or ``"auto"`` (``default_dtype`` when absent; None leaves transformers'
    default), ``trust_remote_code`` from the config unless the dict sets it. A bad entry raises a ValueError."""
    if model_init_kwargs is None:
        kwargs = {}
    elif isinstance(model_init_kwargs, dict):
        kwargs = dict(model_init_kwargs)
    else:
        raise ValueError(f"model_init_kwargs must be a dict of from_pretrained arguments (a JSON object on the "
                         f"command line: '{{\"dtype\": \"bfloat16\"}}'), got {model_init_kwargs!r}")
    if "torch_dtype" in kwargs:
        # Passed on beside the dtype this function always sets, transformers 5 would let `dtype` win and drop the
        # requested one without a word (a bf16 request loading fp32).
        if "dtype" in kwargs:
            raise ValueError(f"model_init_kwargs sets both dtype={kwargs['dtype']!r} and torch_dtype="
                             f"{kwargs['torch_dtype']!r} (its old name); keep only dtype")
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    dtype = kwargs.get("dtype", default_dtype)
    if isinstance(dtype, str) and dtype in _DTYPE_NAMES:
        dtype = getattr(torch, dtype)
    elif not (dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype)):
        raise ValueError(f"model_init_kwargs['dtype'] must be 'auto', a torch.dtype or one of bfloat16, float16, "
                         f"float32; got {dtype!r}")
    if dtype is not None or "dtype" in kwargs:
        kwargs["dtype"] = dtype
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    return kwargs


# TRL 1.16's model-card tag of each trainer (its `_tag_names` = ["trl", tag]); fusedrl adds its own.
_TRL_TAGS = {"DPOTrainer": "dpo", "KTOTrainer": "kto", "ORPOTrainer": "orpo", "CPOTrainer": "cpo",
             "GRPOTrainer": "grpo", "RLOOTrainer": "rloo", "PPOTrainer": "ppo", "OnlineDPOTrainer": "online-dpo"}


def trainer_tags(trainer_cls: type) -> list[str]:
    """The model tags a trainer adds (``model.add_model_tags``; TRL's model cards and its tests read them): TRL's
    ``["trl", <method>]`` for the nearest shipped trainer class, then ``"fusedrl"``."""
    method = next((_TRL_TAGS[cls.__name__] for cls in trainer_cls.__mro__ if cls.__name__ in _TRL_TAGS), None)
    return ["trl", *([method] if method else []), "fusedrl"]


def load_causal_lm(model: str | PreTrainedModel, args, quantization_config=None) -> PreTrainedModel:
    """``model`` itself, or the causal LM stored at the path ``model`` with every ``model_init_kwargs`` entry
    (fp32 unless ``model_init_kwargs['dtype']`` says otherwise); one log line says what was loaded."""
    if not isinstance(model, str):
        if args.model_init_kwargs is not None:
            logger.warning("model_init_kwargs is ignored: the model is already instantiated")
        if quantization_config is not None:
            raise ValueError("quantization_config only applies to a model given as a path; the model is an instance")
        return model
    kwargs = pretrained_kwargs(args.model_init_kwargs, args.trust_remote_code)
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ValueError("quantization_config is set both as a trainer argument and in model_init_kwargs")
        kwargs["quantization_config"] = quantization_config
    if kwargs.get("revision") not in (None, "main") and os.path.isdir(model):
        # transformers reads a local directory as it is and ignores the revision without a word.
        logger.warning("fusedrl: model_init_kwargs['revision']=%r has no effect: %s is a local directory",
                       kwargs["revision"], model)
    loaded = _model_class(model, kwargs).from_pretrained(model, **kwargs)
    logger.info("fusedrl: loaded %s from %s (%s, attention %s)", type(loaded).__name__, model, loaded.dtype,
                loaded.config._attn_implementation)
    return loaded


def _model_class(path: str, kwargs: dict) -> type:
    """The class a checkpoint is loaded with: a vision-language model's own class (as TRL's
    ``create_model_from_path``: ``AutoModelForCausalLM`` would load Qwen 3.5 as its text-only model, and refuses
    Qwen2-VL or LLaVA), else ``AutoModelForCausalLM``."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in _SOURCE_KWARGS})
    name = (getattr(config, "architectures", None) or [None])[0]
    if is_vision_language(name):
        return getattr(transformers, name)
    return AutoModelForCausalLM


def is_vision_language(architecture: str | None) -> bool:
    """An architecture name (``config.architectures[0]``) of an image-text-to-text model in transformers."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return architecture in set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()) and \
        hasattr(transformers, architecture)


def load_tokenizer(path: str, args, *, processor: bool = False) -> PreTrainedTokenizerBase | ProcessorMixin:
    """The tokenizer stored with the model at ``path`` (hub id or directory), or with ``processor`` its processor
    (a vision-language model's), read with the model's revision, cache and ``trust_remote_code``; a ValueError naming
    the path and the fix when there is none."""
    from transformers import AutoProcessor, AutoTokenizer

    source = {key: value for key, value in pretrained_kwargs(args.model_init_kwargs, args.trust_remote_code).items()
              if key in _SOURCE_KWARGS}
    try:
        return (AutoProcessor if processor else AutoTokenizer).from_pretrained(path, **source)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())  # transformers' messages span lines
        raise ValueError(f"no tokenizer could be loaded from the model's path {path!r} ({reason}); pass the tokenizer "
                         "the model was trained with as processing_class (on the command line: --tokenizer PATH)") \
            from error


def check_vocab_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer with more tokens than the model has embedding rows: its larger ids would index past the
    embeddings (an IndexError at the first such token on CPU, a device-side assert on CUDA)."""
    num_rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if num_rows is None:
        num_rows = getattr(model.config.get_text_config(), "vocab_size", None)
    if num_rows is not None and len(tokenizer) > num_rows:
        name = model.name_or_path or type(model).__name__
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model {name} has {num_rows} embedding rows: ids >= "
            f"{num_rows} would index past them. Pass the tokenizer the model was trained with (processing_class; on "
            "the command line --tokenizer PATH), or grow the embeddings first with "
            "model.resize_token_embeddings(len(tokenizer))"
        )


def tokenizer_of(processing_class) -> PreTrainedTokenizerBase:
    """The tokenizer of a ``processing_class``: a tokenizer itself, or the ``.tokenizer`` of a processor."""
    if processing_class is None:
        raise ValueError("no processing_class (tokenizer) was given; pass the model's tokenizer or processor")
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def head_logit_multiplier(model: PreTrainedModel) -> float:
    """The constant the model multiplies its head's output by (1.0 for most models; Cohere's ``logit_scale``,
    Granite's ``1 / logits_scaling``)."""
    config = model.config.get_text_config()
    field, divides = _LINEAR_LOGIT_SCALES.get(getattr(config, "model_type", None), (None, False))
    value = getattr(config, field, None) if field is not None else None
    if value is None:
        return 1.0
    return 1.0 / float(value) if divides else float(value)


def head_logit_softcap(model: PreTrainedModel) -> float | None:
    """The cap c of the model's final soft cap, ``logits = c * tanh(head(h) / c)`` (the text config's
    ``final_logit_softcapping``: Gemma 2 30.0, Gemma 3 when set), or None for a model without one. transformers
    applies it after the head (and after a constant multiplier, which the fused head folds into its weight) and
    before TRL divides by the temperature; the fused head's ops do the same with ``softcap=``."""
    # decoder=True: an encoder-decoder model (T5Gemma) caps with its decoder's config; a causal LM's is its own.
    value = getattr(model.config.get_text_config(decoder=True), _SOFTCAP_FIELD, None)
    return float(value) if value else None


def check_plain_head(model: PreTrainedModel) -> None:
    """Refuse a model whose logits are not ``hidden @ W.T + b`` up to a constant factor and a final soft cap (an
    unknown multiplier): the fused head would give it wrong log-probs."""
    config = model.config.get_text_config()
    linear_field = _LINEAR_LOGIT_SCALES.get(getattr(config, "model_type", None), (None, False))[0]
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if name != linear_field and value is not None and value != 1.0:
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
        processing_class = load_tokenizer(model.config._name_or_path, args,
                                          processor=is_vision_language(type(model).__name__))
    tokenizer = tokenizer_of(processing_class)
    check_vocab_fits(model, tokenizer)
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
            # GRPO's cast_lm_head_to_fp32 has TRL's own refusal of an adapted head: its words first (TRL's tests).
            trl_words = CAST_LM_HEAD_PEFT_ERROR + " fusedrl: " if getattr(args, "cast_lm_head_to_fp32", False) else ""
            raise ValueError(trl_words + "a PEFT adapter on lm_head is not supported: the fused head reads "
                             "lm_head.weight directly, so the adapter would never train; remove 'lm_head' from "
                             "target_modules")
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
    return model, processing_class
