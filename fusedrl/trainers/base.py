"""What every fusedrl trainer shares: config defaults, model loading, kernels, the reference model, log-probs from
hidden states, and TRL-named metrics.

A trainer subclasses :class:`FusedTrainer` (a ``transformers.Trainer``) and its config :class:`FusedConfig` (a
``transformers.TrainingArguments``), so accelerate, gradient accumulation, schedulers, checkpoints and ``report_to``
work unchanged. The base owns no algorithm:

- loading: a model given as a path is loaded with ``AutoModelForCausalLM.from_pretrained`` in fp32 unless
  ``model_init_kwargs`` says otherwise (TRL's default); ``peft_config`` wraps it.
- kernels: ``args.kernels`` (``"linear_logprobs=compiled"``) is the config level of the selection
  (``ops/dispatch.py``), applied around this trainer's ``train`` / ``evaluate`` / ``predict`` and loss computations
  only, so two trainers in one process never reconfigure each other and a caller's ``with fusedrl.use_kernels(...)``
  still wins; the backends in use are logged once.
- reference: an explicit ``ref_model``; else, for a PEFT policy, the policy with its adapters disabled (or switched to
  the adapter ``ref_adapter_name``, or to a frozen ``ref`` adapter copied from a pretrained one: ``null_ref_context``,
  ``adapters/named.py``); else a frozen deep copy of the policy, or none at all when the trainer precomputes
  reference log-probs.
- log-probs (``head_mixin.py``): the model (wrapped by DDP/FSDP as accelerate set it up) runs with
  ``logits_to_keep=1``; its final hidden states are caught on the decoder trunk (``runtime/hidden.py``) and
  ``linear_token_logprobs`` projects them through the LM head in chunks, so ``[N, T, V]`` logits never exist. ``head_inputs`` + ``loss_region`` let a trainer compile
  head and loss as one graph (``compile=True``); every shipped trainer puts its policy loss on a fused head+loss op
  there (``fused=True`` of ``linear_preference_loss`` / ``linear_orpo_loss`` / ``linear_kto_loss`` /
  ``linear_policy_loss``: 3 head passes, the metrics from the same tiles), and its reference (or old) log-probs on
  one no-grad pass each.
- runtime: compiled blocks, selective checkpointing and per-step memory statistics (``_setup_runtime``), activation
  offloading (``training_step``), atomic checkpoints, exact resume and non-finite step skipping
  (``runtime.resumable.ResumableTrainer``), sharded LM heads under FSDP2 / ZeRO-3 (``runtime.sharded_head``).
- metrics: appended per mode, averaged at each ``log`` with TRL's names (``memory/*`` peaks: the largest).

Legend: N sequences, T positions (``T - 1`` next-token positions), H hidden, V vocabulary, M labelled tokens.
"""

import contextlib
import copy
import functools
import logging
from collections import defaultdict
from collections.abc import Iterator

import torch
from accelerate.utils import is_peft_model
from datasets import IterableDataset
from transformers import PreTrainedModel

from fusedrl.ops.dispatch import config_kernels, kernel_backends, parse_kernel_spec
from fusedrl.runtime.compile import compile_blocks
from fusedrl.runtime.memory import MemoryCallback, SelectiveCheckpointCallback
from fusedrl.runtime.offload import ActivationOffloader
from fusedrl.runtime.resumable import ResumableTrainer
from fusedrl.runtime.sharded_head import is_zero3_param, prepare_reference
from fusedrl.runtime.shared_prefix import PrefixSharing
from fusedrl.trainers.adapters.mixin import JointAdapterMixin
from fusedrl.trainers.adapters.named import NamedAdapterTrainer, reference_adapter, use_adapter
from fusedrl.trainers.data.validation import PRECOMPUTE_ITERABLE_ERROR
from fusedrl.trainers.head_mixin import FusedHeadMixin
from fusedrl.trainers.metrics import TrainerMetrics
from fusedrl.trainers.models import check_plain_head, disable_dropout, prepare_model, trainer_tags

logger = logging.getLogger("fusedrl")


class FusedTrainer(TrainerMetrics, FusedHeadMixin, JointAdapterMixin, ResumableTrainer, NamedAdapterTrainer):
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

    @functools.cached_property
    def prefix_sharing(self) -> PrefixSharing:
        """The shared-prefix forwards of this trainer's models (``args.shared_prefix``); its ``counts`` are the trunk
        positions run so far and what the plain layout would have run."""
        # A vision-language model's rows carry image fields that the shared layout (text ids only) cannot split.
        return PrefixSharing(getattr(self.args, "shared_prefix", False) and not getattr(self, "_is_vlm", False))

    @property
    def _tag_names(self) -> list[str]:  # TRL's name; Trainer writes them into the model card
        return trainer_tags(type(self))

    # --- construction ---------------------------------------------------------------------------------------------

    _setup_model = staticmethod(prepare_model)

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
            check_plain_head(ref_model)
            ref_model.requires_grad_(False).eval()
            ref_model = prepare_reference(ref_model, self.accelerator)  # sharded like the policy (ZeRO-3, FSDP2)
        self.ref_model = ref_model
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        if self.args.disable_dropout:
            disable_dropout(self.model)
            if ref_model is not None:
                disable_dropout(ref_model)
        self._kernel_selection = parse_kernel_spec(self.args.kernels or "", source="kernels")
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        with config_kernels(self._kernel_selection):
            logger.info("fusedrl kernels for %s on %s: %s", type(self).__name__, self.accelerator.device,
                        kernel_backends(self.accelerator.device))
        self._setup_joint()
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

    def _checked_inputs(self, model, args, config_cls, train_dataset, compute_metrics, eval_dataset=None, *,
                        images_ok: bool = False):
        """TRL's constructor prelude: a default config named ``<model>-<method>`` when ``args`` is None, then the
        refusals that apply before any set-up (image columns unless ``images_ok``). Returns the config."""
        trainer = type(self).__name__
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = config_cls(f"{name.rstrip('/').split('/')[-1] or 'model'}-{trainer.removesuffix('Trainer')}")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        train_dataset = self._joint_datasets(args, train_dataset, eval_dataset)
        if compute_metrics is not None and self.eval_predictions is None:
            raise ValueError(f"compute_metrics needs logits, which fusedrl's {trainer} never builds")
        if isinstance(train_dataset, IterableDataset):
            if getattr(args, "precompute_ref_log_probs", False):  # online DPO's config has no such field
                raise ValueError(PRECOMPUTE_ITERABLE_ERROR)
            args.accelerator_config.dispatch_batches = False
        columns = train_dataset.column_names or list(next(iter(train_dataset)).keys())
        if not images_ok and ("image" in columns or "images" in columns):
            raise ValueError(f"vision data (an 'image' / 'images' column) is not supported by fusedrl's {trainer}")
        return args

    def _prepare_splits(self, train_dataset, eval_dataset, tokenizer, args):
        """The trainer's ``_prepare`` applied to the train split and to each eval split (one dataset or a dict);
        in joint mode, to each adapter's split."""
        if isinstance(train_dataset, dict):
            train_dataset = {key: self._prepare(ds, tokenizer, args, f"train[{key}]") for key, ds in train_dataset.items()}
        else:
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
            self.add_callback(self.reference_sync_callback())
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

    # Everything a run does (sampling and old log-probs of the online trainers included) sees the config selection.
    def train(self, *args, **kwargs):
        with config_kernels(self._kernel_selection), self._joint_hooked():
            return super().train(*args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        with config_kernels(self._kernel_selection), self._joint_hooked():
            if self._joint is not None and eval_dataset is None:
                return self._evaluate_joint(ignore_keys, metric_key_prefix)
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def predict(self, *args, **kwargs):
        with config_kernels(self._kernel_selection), self._joint_hooked():
            return super().predict(*args, **kwargs)

    @contextlib.contextmanager
    def compute_loss_context_manager(self):
        # The trainer's `kernels=` is the config level: a caller's own `use_kernels` block still wins over it.
        with super().compute_loss_context_manager(), config_kernels(self._kernel_selection):
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

    # For a trainer whose model wraps the policy with more (PPO's PolicyAndValue: policy and value model), the
    # attribute of the unwrapped model that holds the policy; the reference is then derived from (and yielded as)
    # that module, since the wrapper itself is no PEFT model. None: the model is the policy.
    policy_attribute: str | None = None

    @contextlib.contextmanager
    def reference_context(self) -> Iterator[torch.nn.Module]:
        """No-grad block yielding the model that plays the reference: ``ref_model``, or the PEFT policy inside
        :meth:`null_ref_context`, or the policy itself before training (precompute)."""
        with torch.no_grad():
            if self.ref_model is not None:
                yield self.ref_model
                return
            with self.null_ref_context():
                yield self._policy_module()

    def _policy_module(self) -> torch.nn.Module:
        return (self.model if self.policy_attribute is None
                else getattr(self.accelerator.unwrap_model(self.model), self.policy_attribute))

    @contextlib.contextmanager
    def null_ref_context(self) -> Iterator[None]:
        """TRL's name: the block in which the PEFT policy plays the reference, with the adapter ``ref_adapter_name``
        active, else the frozen ``ref`` copy, else its adapters disabled (``adapters.use_adapter``; the active adapter
        and trainability come back on exit). A no-op without PEFT. Gradients stay as the caller has them."""
        policy = self._policy_module()
        if not is_peft_model(policy):
            yield
            return
        with use_adapter(policy, reference_adapter(policy, self.args)):
            yield

    # --- metrics --------------------------------------------------------------------------------------------------
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

    # What an evaluation with compute_metrics gets as predictions, as in TRL 1.16: "logits" (DPO, KTO: the policy's
    # [N, T, V] logits of the batch's input_ids, built only then: head_mixin.sequence_logits), "mean_logits" (ORPO,
    # CPO: [logits/chosen, logits/rejected] of the batch), or None (compute_metrics is refused).
    eval_predictions: str | None = None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The loss needs no labels column; predictions are built only for a compute_metrics that reads them.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
            if prediction_loss_only or self.compute_metrics is None or self.eval_predictions is None:
                return loss.detach(), None, None
            if self.eval_predictions == "logits":
                return loss.detach(), self.sequence_logits(model, inputs), inputs["input_ids"]
        recorded = self._metrics["eval"]
        prefix = self._metric_prefix
        logits = torch.tensor([recorded[f"{prefix}logits/chosen"][-1], recorded[f"{prefix}logits/rejected"][-1]],
                              device=self.accelerator.device)
        return loss.detach(), logits, torch.zeros_like(logits)
