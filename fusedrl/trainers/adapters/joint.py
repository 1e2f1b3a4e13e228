"""Several LoRA adapters trained together on one base ("joint mode": ``model_adapter_name=["a", "b", ...]`` with
``train_dataset={"a": ds_a, "b": ds_b, ...}``).

Contract: each adapter ends with the weights a separate run on its own dataset (same seed and config) would give, to
fp32 rounding, as long as the optimizer is per-parameter (AdamW). How each part keeps it:

- data (:class:`JointLoader`): one dataloader per adapter, built as the trainer builds its own, each sampler drawing
  its permutation from the same RNG state, so adapter k sees the batches of its own run; a step collates the K
  batches (``per_device_train_batch_size`` rows each) into one union batch (one padding) and records the counts.
- forward and backward (:class:`JointAdapters`): the union batch is split into one contiguous sub-batch per adapter
  (paired ``[chosen; rejected]`` rows regrouped per adapter); the trainer's own ``compute_loss`` runs once per
  sub-batch, but its model forwards are served from ONE forward of the union rows (:meth:`JointAdapters.cached_forward`,
  each row routed through its own adapter by ``routing.AdapterRouter`` and ``fusedrl.multi_lora_linear``), so the
  step is one trunk forward per pass (policy, reference, KL) and one backward. The loss is the sum of the adapters'
  losses (each adapter's gradient is its own run's) and reads as their mean (the logged ``loss``).
- clipping: ``max_grad_norm`` clips each adapter's gradient on its own (``<adapter>/grad_norm`` logged); the logged
  ``grad_norm`` is the norm of all of them together, before clipping.
- metrics: every metric a trainer records is logged per adapter (``a/rewards/accuracies``) and as the adapters' mean
  (``rewards/accuracies``); evaluation runs each adapter on its own eval dataset (``eval_a_loss``,
  ``eval_a/rewards/accuracies``) and logs the mean ``eval_loss``.

Not coupled, hence refused: sync_ref_model, precomputed reference log-probs, MoE router losses (one batch-level
auxiliary loss), IterableDatasets. Datasets of different lengths end the epoch with the shortest one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator, Sequence

import torch
from datasets import Dataset

from fusedrl.trainers.adapters.routing import AdapterRouter

logger = logging.getLogger("fusedrl")

COUNTS_KEY = "adapter_counts"


def joint_adapter_names(args) -> tuple[str, ...]:
    """The adapters a config trains together (two or more), else ``()``."""
    names = getattr(args, "model_adapter_name", None)
    return tuple(names) if isinstance(names, (list, tuple)) and len(names) >= 2 else ()


def check_joint_datasets(datasets, names: Sequence[str], field: str, *, required: bool) -> None:
    if datasets is None and not required:
        return
    if not isinstance(datasets, dict) or sorted(datasets) != sorted(names):
        got = sorted(datasets) if isinstance(datasets, dict) else type(datasets).__name__
        raise ValueError(f"{field} must be a dict with one dataset per trained adapter, keys {list(names)} "
                         f"(model_adapter_name); got {got}")
    for name, dataset in datasets.items():
        if not isinstance(dataset, Dataset):
            raise TypeError(f"{field}[{name!r}] is a {type(dataset).__name__}; training several adapters together "
                             "needs map-style datasets.Dataset splits (each adapter's order is its own run's)")


def check_joint_config(args) -> None:
    for flag in ("sync_ref_model", "precompute_ref_log_probs"):
        if getattr(args, flag, False):
            raise ValueError(f"{flag}=True cannot be combined with several adapters trained together "
                             f"(model_adapter_name={list(args.model_adapter_name)}); train them one at a time")


class PerAdapter(list):
    """A batch value that is one value per adapter (not per row), e.g. a rollout's token count: adapter k's
    sub-batch gets element k."""


def _as_list(examples: list) -> list:
    return examples


class JointLoader:
    """One map-style dataloader per adapter, zipped; yields the trainer's collation of the K batches together plus
    ``adapter_counts`` (rows per adapter). Ends with the shortest loader."""

    def __init__(self, loaders: Sequence, collate) -> None:
        self.loaders, self.collate, self.skip = list(loaders), collate, 0

    def __len__(self) -> int:
        return min(len(loader) for loader in self.loaders)

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)

    def skipping(self, num_batches: int) -> JointLoader:
        resumed = JointLoader(self.loaders, self.collate)
        resumed.skip = num_batches
        return resumed

    def __iter__(self) -> Iterator[dict]:
        # A loader draws from the global RNG when it starts (a RandomSampler's seed, the DataLoader's base seed; an
        # accelerate loader only at its first batch): every adapter's loader starts from the same state and fetches
        # its first batch there, as its separate run's would, and the state after is that run's too (the GRPO
        # samples drawn next depend on it).
        state = torch.get_rng_state()
        iterators = []
        for loader in self.loaders:
            torch.set_rng_state(state)
            iterator = iter(loader)
            first = next(iterator, None)
            iterators.append(iterator if first is None else itertools.chain([first], iterator))
        for step, batches in enumerate(zip(*iterators)):
            if step < self.skip:
                continue
            batch = self.collate([example for examples in batches for example in examples])
            batch[COUNTS_KEY] = torch.tensor([len(examples) for examples in batches])
            yield batch


def split_union(batch: dict, counts: list[int]) -> tuple[dict, list[dict]]:
    """``(union, subs)``: the union batch with its paired ``[chosen; rejected]`` rows regrouped per adapter, and one
    sub-batch per adapter made of contiguous views of it."""
    total = sum(counts)
    starts = [sum(counts[:k]) for k in range(len(counts))]
    union, kinds = {}, {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] == total:
                kinds[key] = 1
            elif value.shape[0] == 2 * total:  # [chosen(total); rejected(total)] -> [chosen_k; rejected_k] per k
                order = torch.cat([torch.cat([torch.arange(s, s + c), torch.arange(total + s, total + s + c)])
                                   for s, c in zip(starts, counts)]).to(value.device)
                value = value.index_select(0, order)
                kinds[key] = 2
            else:
                raise ValueError(f"several adapters trained together: batch key {key!r} has {value.shape[0]} rows, "
                                 f"neither the {total} examples nor their {2 * total} chosen/rejected rows")
            # Sub-batches are slices of one base tensor, which is how cached_forward finds the union rows.
            union[key] = value.contiguous() if value._base is None else value.clone()
        elif isinstance(value, PerAdapter):
            union[key] = value
        elif isinstance(value, list) and len(value) == total:
            union[key], kinds[key] = value, 1
        else:
            union[key] = value
    subs = []
    for k, (start, count) in enumerate(zip(starts, counts)):
        subs.append({key: value[start * kinds[key]:(start + count) * kinds[key]] if key in kinds
                     else value[k] if isinstance(value, PerAdapter) else value for key, value in union.items()})
    return union, subs


class _Step:
    """What one joint micro-batch shares across the adapters' loss computations."""

    def __init__(self, union: dict, counts: list[int]) -> None:
        self.union_ids = {id(value): key for key, value in union.items() if isinstance(value, torch.Tensor)}
        self.union, self.counts = union, counts
        self.adapter = 0
        self.policy_route = None
        self.forwards: dict[tuple, tuple] = {}


class JointAdapters:
    """The joint-mode machinery of one trainer (see the module docstring)."""

    def __init__(self, trainer, names: Sequence[str]) -> None:
        self.trainer, self.names = trainer, tuple(names)
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        self.router = AdapterRouter(peft_model, self.names)
        self.router.install()  # checks the adapters once, at construction
        self.router.remove()
        peft_model.set_requires_grad(list(self.names), requires_grad=True)
        self._single_compute_loss = trainer.compute_loss
        self._hook_depth = 0
        self._step: _Step | None = None
        # Each adapter's parameters, listed at the first clipping: after accelerate's prepare, which may replace them.
        self._adapter_params: dict[str, list[torch.nn.Parameter]] | None = None

    # --- the hook, installed while the trainer trains or evaluates -----------------------------------------------

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        if self._hook_depth == 0:
            self.router.install()
        self._hook_depth += 1
        try:
            yield
        finally:
            self._hook_depth -= 1
            if self._hook_depth == 0:
                self.router.clear_train_rows()
                self.router.remove()

    # --- data -----------------------------------------------------------------------------------------------------

    def train_dataloader(self, batch_size: int | None = None, collate=None) -> JointLoader:
        """``batch_size`` examples per adapter per batch (default: the trainer's), collated by ``collate`` (default:
        the trainer's data collator)."""
        trainer = self.trainer
        original = trainer.data_collator
        # Each loader is the one Trainer builds for that dataset alone (columns, sampler, workers, accelerate), but
        # yields the raw examples: they are collated together, once, by JointLoader.
        trainer.data_collator = _as_list
        try:
            loaders = [trainer._get_dataloader(trainer.train_dataset[name], description=f"Training {name}",
                                               batch_size=batch_size or trainer._train_batch_size,
                                               sampler_fn=trainer._get_train_sampler, is_training=True)
                       for name in self.names]
        finally:
            trainer.data_collator = original
        lengths = {name: len(loader) for name, loader in zip(self.names, loaders)}
        if len(set(lengths.values())) > 1:
            logger.warning("fusedrl: adapters' datasets give %s batches per epoch; a joint epoch ends with the "
                           "shortest", lengths)
        return JointLoader(loaders, collate or original)

    # --- loss -----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if COUNTS_KEY not in inputs:  # one adapter's batch: evaluation inside metrics_of / router.use
            return self._single_compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        counts = inputs.pop(COUNTS_KEY).tolist()
        union, subs = split_union(inputs, counts)
        self._step = _Step(union, counts)
        losses = []
        try:
            for k, (name, sub) in enumerate(zip(self.names, subs)):
                self._step.adapter = k
                with self.router.use(name), self.metrics_of(name):
                    self._step.policy_route = self.router.top()
                    losses.append(self._single_compute_loss(model, sub, return_outputs, num_items_in_batch))
        finally:
            self._step = None
        total = torch.stack(losses).sum()
        # The value is the adapters' mean (the logged loss); the gradient is the sum's: each adapter gets exactly
        # the gradient of its own loss, as in its own run.
        return total - (total - total.detach() / len(losses)).detach()

    @contextlib.contextmanager
    def metrics_of(self, name: str) -> Iterator[None]:
        previous = self.trainer._metric_prefix
        self.trainer._metric_prefix = f"{name}/"
        try:
            yield
        finally:
            self.trainer._metric_prefix = previous

    def cached_forward(self, model, model_inputs: dict, *, keep_padding: bool = False) -> tuple | None:
        """``(outputs, final_hidden)`` of adapter k's rows, cut from one forward of the union rows (run at the first
        request of that pass), or None when ``model_inputs`` are not rows of the union batch (the caller then runs
        its own forward, routed to adapter k)."""
        step = self._step
        if step is None:
            return None
        union_inputs, offset, rows = {}, None, None
        for key, value in model_inputs.items():
            union_key = step.union_ids.get(id(value._base)) if isinstance(value, torch.Tensor) else None
            if union_key is None:
                return None
            base = step.union[union_key]
            start = value.storage_offset() // max(base.stride(0), 1)
            if offset not in (None, start) or rows not in (None, value.shape[0]) or value.shape[1:] != base.shape[1:]:
                return None
            offset, rows, union_inputs[key] = start, value.shape[0], base
        if offset is None:
            return None
        route = self.router.top()
        is_policy = route is step.policy_route
        key = (id(model), tuple((k, id(v)) for k, v in union_inputs.items()), None if is_policy else route,
               torch.is_grad_enabled(), keep_padding)
        if key not in step.forwards:
            per_example = rows // step.counts[step.adapter]
            ids = torch.repeat_interleave(torch.arange(len(self.names), device=union_inputs[next(iter(union_inputs))]
                                                       .device), torch.tensor(step.counts) * per_example)
            keep_for_backward = torch.is_grad_enabled()

            def routing(row_ids):  # the adapter of each row run: plain rows, or shared rows (one adapter each)
                return self.router.rows(row_ids, keep_for_backward=keep_for_backward)

            # Rows of different adapters never share a prefix: their trunks differ from the first LoRA layer on.
            step.forwards[key] = self.trainer.prefix_sharing.forward(
                model, union_inputs, row_keys_N=ids if is_policy else None, keep_padding=keep_padding,
                around=routing if is_policy else None)
        outputs, hidden = step.forwards[key]
        return outputs, hidden[offset:offset + rows]

    # --- optimizer step -------------------------------------------------------------------------------------------

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        """Clip each adapter's gradient to ``max_norm`` on its own; returns the norm of all of them, before."""
        if self._adapter_params is None:
            named = list(self.trainer.accelerator.unwrap_model(model).named_parameters())
            self._adapter_params = {name: [param for param_name, param in named if f".{name}." in param_name]
                                    for name in self.names}
        norms = []
        for name, params in self._adapter_params.items():
            norm = self.trainer.accelerator.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
            norm = torch.as_tensor(norm, dtype=torch.float32)
            self.trainer.record("train", f"{name}/grad_norm", norm.item())
            norms.append(norm)
        return torch.stack(norms).square().sum().sqrt()
