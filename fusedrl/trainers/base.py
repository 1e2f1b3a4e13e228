"""What every fusedrl trainer shares: config defaults, model loading, kernels, the reference model, log-probs from
hidden states, and TRL-named metrics.

A trainer subclasses :class:`FusedTrainer` (a ``transformers.Trainer``) and its config :class:`FusedConfig` (a
``transformers.TrainingArguments``), so accelerate, gradient accumulation, schedulers, checkpoints and ``report_to``
work unchanged. The base owns no algorithm:

- loading: a model given as a path is loaded with ``AutoModelForCausalLM.from_pretrained`` in fp32 unless
  ``model_init_kwargs`` says otherwise (TRL's default); ``peft_config`` wraps it.
- kernels: ``args.kernels`` (``"linear_logprobs=compiled"``) is applied with ``fusedrl.use_kernels`` around this
  trainer's loss computations only, so two trainers in one process never reconfigure each other; the backends in use
  are logged once.
- reference: an explicit ``ref_model``; else, for a PEFT policy, the policy with its adapters disabled (or switched to
  a frozen ``ref`` adapter copied from a pretrained one); else a frozen deep copy of the policy, or none at all when
  the trainer precomputes reference log-probs.
- log-probs: the model (wrapped by DDP/FSDP as accelerate set it up) runs with ``logits_to_keep=1``; its final hidden
  states are caught on the decoder trunk (``runtime/hidden.py``) and ``linear_token_logprobs`` projects them through
  the LM head in chunks, so ``[N, T, V]`` logits never exist. ``head_inputs`` + ``loss_region`` let a trainer compile
  head and loss as one graph (``compile=True``).
- engine: compiled blocks, selective checkpointing and per-step memory statistics (``_setup_runtime``), activation
  offloading (``training_step``), atomic checkpoints, exact resume and non-finite step skipping
  (``engine.resumable.ResumableTrainer``), sharded LM heads under FSDP2 / ZeRO-3 (``engine.sharded_head``).
- metrics: appended per mode, averaged at each ``log`` with TRL's names (``memory/*`` peaks: the largest).

Legend: N sequences, T positions (``T - 1`` next-token positions), H hidden, V vocabulary, M labelled tokens.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from accelerate.utils import is_peft_model
from datasets import IterableDataset
from transformers import AutoModelForCausalLM, PreTrainedModel, ProcessorMixin, TrainingArguments

from fusedrl.ops.dispatch import kernel_backends, parse_kernel_spec, use_kernels
from fusedrl.ops.logprobs import linear_token_logprobs
from fusedrl.runtime.compile import compile_blocks, compile_region
from fusedrl.runtime.hidden import catch_final_hidden
from fusedrl.runtime.memory import MemoryCallback, SelectiveCheckpointCallback
from fusedrl.runtime.offload import ActivationOffloader
from fusedrl.runtime.resumable import DEFAULT_MAX_NONFINITE_STEPS, ResumableTrainer
from fusedrl.runtime.sharded_head import is_zero3_param, keep_root_unsharded, prepare_reference, whole_head
from fusedrl.trainers.callbacks.sync_ref import SyncRefModelCallback

logger = logging.getLogger("fusedrl")

REF_ADAPTER = "ref"
IGNORE_INDEX = -100
# Rows per no-grad statistics chunk: a [C, V] fp32 tile of about 32 MiB, the budget the fused op uses.
_STATS_TILE_BYTES = 32 * 2**20
# Config attributes through which some architectures rescale or soft-cap their logits. The fused head projects with
# the plain LM-head weight, so such a model would silently get wrong log-probs; it is refused instead.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


@dataclass
class FusedConfig(TrainingArguments):
    """``TrainingArguments`` with TRL 1.16's trainer defaults (logging every 10 steps, gradient checkpointing on,
    bf16 unless fp16 is set) and the fields every fusedrl trainer shares.

    kernels: backend selection for this trainer's fused ops, e.g. ``"linear_logprobs=compiled"`` or
        ``"all=reference"`` (see ``fusedrl.ops.dispatch``); None leaves the process-wide selection
        (``configure_kernels``, ``FUSEDRL_KERNELS``, defaults) in charge.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (a float < 1 is a ratio)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in the backward."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; None means True unless fp16."})
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata={"help": "Extra scheduler arguments."})
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments of from_pretrained when the model is given as a path."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship their own code."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability to 0."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preprocessing."})
    kernels: str | None = field(
        default=None, metadata={"help": "fusedrl kernel backends for this trainer, e.g. 'linear_logprobs=compiled'."}
    )
    activation_offloading: bool = field(
        default=False, metadata={"help": "Copy saved activations to host memory on a side stream during the forward "
                                         "and prefetch them back in the backward (docs/offloading.md)."}
    )
    compile: bool = field(
        default=False, metadata={"help": "Compile the loss region (final hidden states -> fused head -> loss) with "
                                         "fullgraph=True and dynamic shapes (runtime/compile.py)."}
    )
    compile_blocks: bool = field(
        default=False, metadata={"help": "Also compile each transformer block in place (one shared graph)."}
    )
    checkpoint_every_n_layers: int = field(
        default=1, metadata={"help": "With gradient_checkpointing: checkpoint every n-th decoder layer only (1: all)."}
    )
    selective_checkpointing: bool = field(
        default=False, metadata={"help": "With gradient_checkpointing: keep matmul and attention outputs, recompute "
                                         "only the cheap elementwise ops in the backward (runtime/memory.py)."}
    )
    release_memory_every_step: bool = field(
        default=False, metadata={"help": "gc.collect() and empty the accelerator cache after every optimizer step "
                                         "(each gradient-accumulation boundary)."}
    )
    log_memory: bool = field(
        default=True, metadata={"help": "Log peak memory of each step: memory/peak_allocated_mb and "
                                        "memory/peak_reserved_mb on CUDA, memory/peak_rss_mb on CPU."}
    )

    max_nonfinite_steps: int = field(
        default=DEFAULT_MAX_NONFINITE_STEPS,
        metadata={"help": "Optimizer steps with a non-finite loss or gradient to skip before training stops with an "
                          "error (0: stop at the first; runtime/faults.py)."},
    )

    def __post_init__(self):
        self.bf16 = not self.fp16 if self.bf16 is None else self.bf16
        if not (isinstance(self.max_nonfinite_steps, int) and self.max_nonfinite_steps >= 0):
            raise ValueError(f"max_nonfinite_steps must be an int >= 0 (0 stops at the first non-finite step), got "
                             f"{self.max_nonfinite_steps!r}")
        if not (isinstance(self.checkpoint_every_n_layers, int) and self.checkpoint_every_n_layers >= 1):
            raise ValueError(f"checkpoint_every_n_layers must be an int >= 1 (1 checkpoints every layer), got "
                             f"{self.checkpoint_every_n_layers!r}")
        super().__post_init__()
        if self.checkpoint_every_n_layers != 1:
            # transformers reads every_n_layers from the checkpointing kwargs (both names mirror each other).
            kwargs = {**(self.activation_checkpointing_kwargs or {}), "every_n_layers": self.checkpoint_every_n_layers}
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs = kwargs
        if self.kernels is not None:
            parse_kernel_spec(self.kernels, source="kernels")  # a typo fails here, not at the first step


def resolve_pad_to_multiple_of(value: int | str | None, device: torch.device) -> int | None:
    """TRL's ``pad_to_multiple_of``: an int, None, or ``"auto"`` (128 on Neuron, which compiles once per input shape,
    so padding bounds the number of compilations; None elsewhere). Strings from the CLI/YAML are parsed."""
    if isinstance(value, str) and value != "auto":
        text = value.lower()
        return None if text in ("none", "null") else int(text)
    if value == "auto":
        return 128 if device.type == "neuron" else None
    return value


class TokenOutputs(NamedTuple):
    """Per next-token position ``[N, T - 1]`` (``mean_logits``: ``[N, T]`` if asked for every position), zero where
    the label is ignored. ``logps`` is differentiable; the rest is detached. Fields not requested are None."""

    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class HeadInputs(NamedTuple):
    """What a fused head needs from one model forward (:meth:`FusedTrainer.head_inputs`): ``hidden_NTH``
    ``[N, T - 1, H]`` (differentiable, in the head's dtype), the head's ``weight_VH`` / ``bias_V``, ``labels_NT``
    ``[N, T - 1]`` (-100 where not scored), the MoE ``aux_loss`` if asked for, and detached statistics
    (``mean_logits``, ``is_top1``, ``log_sum_sq_probs``) keyed as in :class:`TokenOutputs`."""

    hidden_NTH: torch.Tensor
    weight_VH: torch.Tensor
    bias_V: torch.Tensor | None
    labels_NT: torch.Tensor
    aux_loss: torch.Tensor | None
    stats: dict[str, torch.Tensor]


def _head_logprobs(hidden_NTH, weight_VH, bias_V, labels_NT, with_entropy: bool):
    """The smallest loss region: the fused head alone (trainers with a loss tail compile head and tail together)."""
    return linear_token_logprobs(hidden_NTH, weight_VH, labels_NT, bias=bias_V, with_entropy=with_entropy)


def load_causal_lm(model: str | PreTrainedModel, args: FusedConfig, quantization_config=None) -> PreTrainedModel:
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


def tokenizer_of(processing_class):
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _check_plain_head(model: PreTrainedModel) -> None:
    config = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"{type(model).__name__} transforms its logits ({name}={value}); fusedrl's fused LM head computes "
                "log_softmax(hidden @ lm_head.weight.T + bias) and would give this model wrong log-probs"
            )


@torch.no_grad()
def _vocab_mean_logits(hidden_MH, weight_VH, bias_V) -> torch.Tensor:
    """``mean_v(h . w_v + b_v) = h . mean_v(w_v) + mean(b)`` per row of ``hidden_MH``, fp32 ``[M]``."""
    mean_bias = bias_V.mean(dtype=torch.float32) if bias_V is not None else 0.0
    return hidden_MH.float() @ weight_VH.mean(0, dtype=torch.float32) + mean_bias


@torch.no_grad()
def _head_statistics(hidden_NTH, weight_VH, bias_V, labels_NT, statistics_mask_NT) -> dict[str, torch.Tensor]:
    """TRL's side outputs of its fused head, ``[N, T - 1]`` each, zero where not computed.

    ``mean_logits`` (every labelled position) is exact and almost free: ``mean_v(h . w_v + b_v) = h . mean_v(w_v) +
    mean(b)``. ``is_top1`` and ``log_sum_sq_probs`` (positions of ``statistics_mask_NT``) need the whole logits row:
    TRL gets them from its log-prob pass, here they cost one extra no-grad head matmul over those tokens, one
    ``[C, V]`` tile of about 32 MiB at a time.
    """
    labelled_NT = labels_NT != IGNORE_INDEX
    scored_NT = statistics_mask_NT & labelled_NT
    mean_logits_M = _vocab_mean_logits(hidden_NTH[labelled_NT], weight_VH, bias_V)

    hidden_MH, labels_M = hidden_NTH[scored_NT], labels_NT[scored_NT]
    chunk = max(16, _STATS_TILE_BYTES // (4 * weight_VH.shape[0]))
    is_top1, log_sum_sq = [hidden_MH.new_zeros(0, dtype=torch.bool)], [hidden_MH.new_zeros(0, dtype=torch.float32)]
    for start in range(0, hidden_MH.shape[0], chunk):
        logits_CV = torch.nn.functional.linear(hidden_MH[start:start + chunk], weight_VH, bias_V).float()
        is_top1.append(logits_CV.argmax(-1) == labels_M[start:start + chunk])
        log_sum_sq.append(torch.logsumexp(2.0 * logits_CV, -1) - 2.0 * torch.logsumexp(logits_CV, -1))
    is_top1_M, log_sum_sq_M = torch.cat(is_top1), torch.cat(log_sum_sq)
    zeros_NT = labels_NT.new_zeros(labels_NT.shape, dtype=torch.float32)
    return {
        "mean_logits": zeros_NT.masked_scatter(labelled_NT, mean_logits_M),
        "is_top1": torch.zeros_like(scored_NT).masked_scatter(scored_NT, is_top1_M),
        "log_sum_sq_probs": zeros_NT.masked_scatter(scored_NT, log_sum_sq_M),
    }


class FusedTrainer(ResumableTrainer):
    """``transformers.Trainer`` plus the shared pieces listed in the module docstring.

    The contract of a new trainer (docs/extending.md; a runnable one: examples/custom_trainer.py), with a config
    subclassing :class:`FusedConfig`:

    1. ``__init__`` calls :meth:`_setup_model` before ``Trainer.__init__`` (it needs no trainer state), then
       ``super().__init__`` with the prepared datasets and a collator, then always :meth:`_finish_setup`
       (``precompute=True`` for a reference-free method: no reference copy is made);
    2. ``_set_signature_columns_if_needed`` names the batch columns when they are not model inputs;
    3. ``compute_loss`` returns the micro-batch mean loss, computed from :meth:`token_logprobs` (policy, and the
       reference inside :meth:`reference_context`);
    4. metrics go through :meth:`record` with :meth:`gathered_mean` / :meth:`masked_mean`.
    """

    # compute_loss returns a per-micro-batch mean, so Trainer divides it by the accumulation steps (as for TRL's DPO).
    loss_is_scaled_for_ga = False

    # --- construction ---------------------------------------------------------------------------------------------

    @staticmethod
    def _setup_model(model, args: FusedConfig, processing_class, *, peft_config, ref_model, quantization_config,
                     reference: bool = True):
        """Load ``model``, give the tokenizer a pad token, wrap with PEFT; returns ``(model, processing_class)``.
        ``reference=False`` (reference-free: ORPO, CPO) makes no frozen ``ref`` copy of a pretrained adapter."""
        model = load_causal_lm(model, args, quantization_config)
        if ref_model is model:
            raise ValueError("model and ref_model are the same object; omit ref_model to get a frozen copy")
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
        _check_plain_head(model)
        if peft_config is not None:
            if is_peft_model(model):
                raise ValueError("model is already a PeftModel and peft_config is given; merge the adapter first, "
                                 "or pass the base model with peft_config")
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        elif is_peft_model(model) and ref_model is None and reference:
            # A pretrained adapter is the starting policy, so the reference is a frozen copy of it, not the base.
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

    def _finish_setup(self, ref_model: PreTrainedModel | None, *, precompute: bool) -> None:
        """After ``Trainer.__init__``: refuse unsupported parallelism, set ``self.ref_model`` (None when PEFT or
        precomputed log-probs make it unnecessary), disable dropout, set up kernels and metrics; log the kernel
        backends once."""
        if self.args.n_gpu > 1:
            raise ValueError(f"{type(self).__name__} does not support nn.DataParallel; launch with accelerate or "
                             "torchrun, or expose one GPU")
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError("FSDP1 shards lm_head.weight outside the module forward, where the fused head "
                                      "reads it; set fsdp_version=2")
        if ref_model is None and not is_peft_model(self.model) and not precompute:
            policy = self.accelerator.unwrap_model(self.model)
            if any(is_zero3_param(param) for param in policy.parameters()):
                raise ValueError("the policy was created partitioned (ZeRO-3 with zero3_init_flag); a copy of it "
                                 "cannot be the reference: pass ref_model, or set zero3_init_flag: false")
            ref_model = copy.deepcopy(policy)
        if ref_model is not None:
            _check_plain_head(ref_model)
            ref_model.requires_grad_(False).eval()
            ref_model = prepare_reference(ref_model, self.accelerator)  # sharded like the policy (ZeRO-3, FSDP2)
        self.ref_model = ref_model
        if self.args.disable_dropout:
            disable_dropout(self.model)
            if ref_model is not None:
                disable_dropout(ref_model)
        self._kernel_selection = parse_kernel_spec(self.args.kernels or "", source="kernels")
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        with use_kernels(**self._kernel_selection):
            logger.info("fusedrl kernels for %s on %s: %s", type(self).__name__, self.accelerator.device,
                        kernel_backends(self.accelerator.device))
        self._setup_runtime()

    def _setup_runtime(self) -> None:
        """Graph capture and memory management from the config: compiled blocks, selective checkpointing, per-step
        peak memory and memory release (runtime/compile.py, runtime/memory.py)."""
        args = self.args
        if args.compile_blocks:
            num_blocks = compile_blocks(self.accelerator.unwrap_model(self.model))
            if self.ref_model is not None:
                compile_blocks(self.accelerator.unwrap_model(self.ref_model))
            logger.info("fusedrl: compiled %d transformer blocks (fullgraph, dynamic shapes)", num_blocks)
        if args.selective_checkpointing:
            if not args.gradient_checkpointing:
                raise ValueError("selective_checkpointing=True needs gradient_checkpointing=True")
            self.add_callback(SelectiveCheckpointCallback())
        if args.log_memory or args.release_memory_every_step:
            self.add_callback(MemoryCallback(self.accelerator.device, functools.partial(self.record, "train"),
                                             log_memory=args.log_memory, release=args.release_memory_every_step))

    def _checked_inputs(self, model, args, config_cls, train_dataset, compute_metrics):
        """TRL's constructor prelude: a default config named ``<model>-<method>`` when ``args`` is None, then the
        refusals that apply before any set-up. Returns the config."""
        trainer = type(self).__name__
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = config_cls(f"{name.rstrip('/').split('/')[-1] or 'model'}-{trainer.removesuffix('Trainer')}")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        if compute_metrics is not None:
            raise ValueError(f"compute_metrics needs logits, which fusedrl's {trainer} never builds")
        if isinstance(train_dataset, IterableDataset):
            if args.precompute_ref_log_probs:
                raise ValueError("precompute_ref_log_probs=True needs a map-style Dataset, not an IterableDataset")
            args.accelerator_config.dispatch_batches = False
        columns = train_dataset.column_names or list(next(iter(train_dataset)).keys())
        if "image" in columns or "images" in columns:
            raise ValueError(f"vision preference data is not supported by fusedrl's {trainer}")
        return args

    def _prepare_splits(self, train_dataset, eval_dataset, tokenizer, args):
        """The trainer's ``_prepare`` applied to the train split and to each eval split (one dataset or a dict)."""
        train_dataset = self._prepare(train_dataset, tokenizer, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {key: self._prepare(ds, tokenizer, args, key) for key, ds in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._prepare(eval_dataset, tokenizer, args, "eval")
        return train_dataset, eval_dataset

    def _setup_router_aux_loss(self, args) -> None:
        """Mixture-of-experts load balancing as TRL weights it: ``args.router_aux_loss_coef``, else the model's."""
        text_config = self.model.config.get_text_config()
        coef = args.router_aux_loss_coef
        if coef and not hasattr(text_config, "output_router_logits"):
            raise ValueError(f"router_aux_loss_coef={coef} but {type(self.model).__name__} has no router to weight")
        self.router_aux_loss_coef = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
        self.aux_loss_enabled = hasattr(text_config, "output_router_logits") and self.router_aux_loss_coef != 0.0

    def _setup_reference(self, ref_model: PreTrainedModel | None, args) -> None:
        """``_finish_setup``, then TR-DPO reference syncing and precomputed reference log-probs for trainers whose
        config has ``sync_ref_model`` / ``precompute_ref_log_probs`` and that define ``_precompute_ref_logps``."""
        self._finish_setup(ref_model, precompute=args.precompute_ref_log_probs)
        if args.sync_ref_model:
            self.add_callback(SyncRefModelCallback(self.ref_model, self.accelerator))
        if not args.precompute_ref_log_probs:
            return
        self.train_dataset = self._precompute_ref_logps(
            self.train_dataset, "train", args.precompute_ref_batch_size or args.per_device_train_batch_size)
        if self.eval_dataset is None:
            return
        batch_size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {name: self._precompute_ref_logps(ds, name, batch_size)
                                 for name, ds in self.eval_dataset.items()}
        else:
            self.eval_dataset = self._precompute_ref_logps(self.eval_dataset, "eval", batch_size)

    # --- per-step context -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def compute_loss_context_manager(self):
        with super().compute_loss_context_manager(), use_kernels(**self._kernel_selection):
            yield

    def training_step(self, *args, **kwargs):
        if not getattr(self.args, "activation_offloading", False):
            return super().training_step(*args, **kwargs)
        # One offloader per trainer (its side stream and counters persist); it re-reads the model's parameter
        # storages at each step. Forward and backward both run inside, so the backward drains its stash.
        if getattr(self, "_activation_offloader", None) is None:
            self._activation_offloader = ActivationOffloader(self.model, device=self.accelerator.device)
        with self._activation_offloader:
            return super().training_step(*args, **kwargs)

    @contextlib.contextmanager
    def reference_context(self) -> Iterator[torch.nn.Module]:
        """No-grad block yielding the model that plays the reference: ``ref_model``, or the PEFT policy with its
        adapters disabled (or the ``ref`` adapter active), or the policy itself before training (precompute)."""
        with torch.no_grad():
            if self.ref_model is not None or not is_peft_model(self.model):
                yield self.ref_model if self.ref_model is not None else self.model
                return
            peft_model = self.accelerator.unwrap_model(self.model)
            if REF_ADAPTER not in peft_model.peft_config:
                with peft_model.disable_adapter():
                    yield self.model
                return
            active = peft_model.active_adapter
            peft_model.set_adapter(REF_ADAPTER, inference_mode=True)
            try:
                yield self.model
            finally:
                peft_model.set_adapter(active)

    # --- log-probs ------------------------------------------------------------------------------------------------

    def _lm_head(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        # FSDP2 / ZeRO-3 shards are gathered with gradients flowing back to them (runtime/sharded_head.py). Call it
        # after the model forward, once per forward.
        unwrapped = self.accelerator.unwrap_model(model)
        keep_root_unsharded(unwrapped)
        if is_peft_model(unwrapped):
            unwrapped = unwrapped.get_base_model()
        return tuple(whole_head(unwrapped.get_output_embeddings()))

    def head_inputs(
        self,
        model: torch.nn.Module,
        model_inputs: dict[str, torch.Tensor],
        labels_NT: torch.Tensor,
        *,
        statistics_mask: torch.Tensor | None = None,
        router_logits: bool = False,
        all_position_mean_logits: bool = False,
    ) -> HeadInputs:
        """Run ``model`` (policy, reference or wrapped) and return what its fused head needs: final hidden states
        ``[N, T - 1, H]`` in the head's dtype, the head's weight and bias, the shifted labels ``[N, T - 1]``, plus the
        detached statistics asked for (see :meth:`token_logprobs`)."""
        extra = {"output_router_logits": True} if router_logits else {}
        # The final (normed) hidden states come from a hook on the decoder trunk (runtime/hidden.py): asking for
        # output_hidden_states would install transformers' capture hooks, which compiled blocks cannot trace.
        # logits_to_keep=1 leaves a [N, 1, V] slice of logits, whose gradient is zero.
        with catch_final_hidden(model) as final:
            outputs = model(**model_inputs, use_cache=False, logits_to_keep=1, **extra)
        weight_VH, bias_V = self._lm_head(model)
        length = labels_NT.shape[1]
        # Prompt-learning PEFT prepends virtual tokens: the real positions are the last T. The head runs in the
        # weights' dtype (fp32 master weights under mixed precision, so the head is exact there rather than bf16).
        hidden_NTH = final.value[:, -length:-1].to(weight_VH.device, weight_VH.dtype)
        labels_NT = labels_NT[:, 1:].to(weight_VH.device)
        stats = {}
        if statistics_mask is not None:
            stats = _head_statistics(hidden_NTH.detach(), weight_VH.detach(),
                                     None if bias_V is None else bias_V.detach(), labels_NT, statistics_mask)
        if all_position_mean_logits:
            full_NTH = final.value[:, -length:].detach().to(weight_VH.device, weight_VH.dtype)
            stats["mean_logits"] = _vocab_mean_logits(full_NTH, weight_VH.detach(),
                                                      None if bias_V is None else bias_V.detach())
        aux_loss = getattr(outputs, "aux_loss", None) if router_logits else None
        return HeadInputs(hidden_NTH, weight_VH, bias_V, labels_NT, aux_loss, stats)

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
        ``is_top1`` and ``log_sum_sq_probs`` (see ``_head_statistics`` for their cost).
        ``router_logits`` asks a mixture-of-experts model for its load-balancing ``aux_loss``.
        ``all_position_mean_logits`` makes ``mean_logits`` ``[N, T]``: the vocabulary mean of the logits at every input
        position, padding and the last one included (TRL's ORPO/CPO average their ``logits/*`` metrics over those).
        """
        head = self.head_inputs(model, model_inputs, labels_NT, statistics_mask=statistics_mask,
                                router_logits=router_logits, all_position_mean_logits=all_position_mean_logits)
        with self.head_region(head.hidden_NTH.device):
            result = self.loss_region(_head_logprobs)(head.hidden_NTH, head.weight_VH, head.bias_V, head.labels_NT,
                                                      with_entropy)
        logps, entropy = (result.logprobs, result.entropy.detach()) if with_entropy else (result, None)
        return TokenOutputs(logps, entropy, aux_loss=head.aux_loss, **head.stats)

    # --- metrics --------------------------------------------------------------------------------------------------

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def record(self, mode: str, name: str, value: float) -> None:
        self._metrics[mode][name].append(value)

    def masked_mean(self, values_NT: torch.Tensor, mask_NT: torch.Tensor) -> float:
        """Token-weighted mean over all processes (0.0 when no token is selected)."""
        mask_NT = mask_NT.bool()
        total = self.accelerator.gather_for_metrics(values_NT.detach().float()[mask_NT].sum()).sum()
        count = self.accelerator.gather_for_metrics(mask_NT.sum()).sum()
        return (total / count).item() if count > 0 else 0.0

    def gathered_mean(self, values: torch.Tensor) -> float:
        return self.accelerator.gather(values.detach().float()).mean().item()

    def record_num_tokens(self, mode: str, attention_mask: torch.Tensor) -> None:
        if mode == "train":
            self._total_train_tokens += self.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = self._mode()
        # Peaks are reported as the largest since the last log; everything else is averaged (TRL's rule).
        metrics = {key: max(values) if key.startswith("memory/") else sum(values) / len(values)
                   for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # --- resumable state (runtime/resumable.py) ---------------------------------------------------------------------

    def fusedrl_state(self) -> dict:
        # Metric values recorded since the last log are kept too: a save between two logs would otherwise drop them
        # from the resumed run's next averages.
        return {**super().fusedrl_state(), "total_train_tokens": self._total_train_tokens,
                "train_metrics": {name: list(values) for name, values in self._metrics["train"].items()}}

    def load_fusedrl_state(self, state: dict) -> None:
        super().load_fusedrl_state(state)
        self._total_train_tokens = state.get("total_train_tokens", 0)
        self._metrics["train"].clear()
        self._metrics["train"].update(state.get("train_metrics", {}))

    def mutable_reference(self) -> torch.nn.Module | None:
        # TR-DPO moves a separate reference toward the policy; a frozen one is rebuilt from the initial model.
        return self.ref_model if getattr(self.args, "sync_ref_model", False) else None

    def record_nonfinite_steps(self, total: int) -> None:
        self._metrics["train"]["nonfinite_steps"] = [total]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The loss needs no labels column, and there are no logits to return (they are never built).
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
