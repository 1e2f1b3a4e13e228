"""Joint mode for the sampling trainers (GRPO, RLOO): each adapter samples, scores and buffers its own rollout as its
own run would; the loss steps then train every adapter on one union micro-batch (``joint.py``).

- sampling: the prompts of adapter k are generated with adapter k (``AdapterRouter.use``) from adapter k's own RNG
  stream (forked from the global generator at the first round, then carried from round to round and saved with
  each checkpoint: :meth:`JointRollouts.state_tensors`), so its completions, rewards, advantages and shuffles are
  those of its separate run, resumed or not; the metrics of its round are recorded under ``<adapter>/``.
- loss steps: micro-batch j of every adapter is padded to common lengths (prompts on the left, completions on the
  right: with rotary positions a uniform shift of the real tokens changes nothing but rounding) and stacked into
  one batch, with ``input_ids`` / ``attention_mask`` of the whole sequences precomputed so the adapters' forwards
  are rows of one union forward. Batch-level values (``num_items_in_batch``) stay per adapter (:class:`PerAdapter`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedrl.trainers.adapters.joint import COUNTS_KEY, PerAdapter

EXAMPLES_KEY = "joint_examples"
# Per-row keys padded on the right (completion positions) with these values; prompts are padded on the left.
_COMPLETION_KEYS = {"completion_ids": "pad", "completion_mask": 0, "old_per_token_logps": 0.0,
                    "ref_per_token_logps": 0.0}
_PROMPT_KEYS = {"prompt_ids": "pad", "prompt_mask": 0}


def examples_batch(examples: list) -> dict:
    """The JointLoader collation of the sampling trainers: the raw prompt rows, as their identity collator."""
    return {EXAMPLES_KEY: examples}


def _pad(value: torch.Tensor, length: int, fill, *, left: bool) -> torch.Tensor:
    missing = length - value.shape[1]
    if missing == 0:
        return value
    return F.pad(value, (missing, 0) if left else (0, missing), value=fill)


def union_micro_batch(batches: list[dict], pad_token_id: int) -> dict:
    """One adapter's micro-batch each -> one batch (rows in adapter order) with ``adapter_counts``."""
    union = {}
    prompt_length = max(batch["prompt_ids"].shape[1] for batch in batches)
    completion_length = max(batch["completion_ids"].shape[1] for batch in batches)
    for key in batches[0]:
        values = [batch[key] for batch in batches]
        if key in _PROMPT_KEYS or key in _COMPLETION_KEYS:
            fill = _PROMPT_KEYS.get(key, _COMPLETION_KEYS.get(key))
            fill = pad_token_id if fill == "pad" else fill
            length = prompt_length if key in _PROMPT_KEYS else completion_length
            union[key] = torch.cat([_pad(v, length, fill, left=key in _PROMPT_KEYS) for v in values])
        elif isinstance(values[0], torch.Tensor) and values[0].dim() > 0:
            union[key] = torch.cat(values)
        else:
            union[key] = PerAdapter(values)
    union["input_ids"] = torch.cat([union["prompt_ids"], union["completion_ids"]], dim=1)
    union["attention_mask"] = torch.cat([union["prompt_mask"], union["completion_mask"]], dim=1)
    union[COUNTS_KEY] = torch.tensor([batch["completion_ids"].shape[0] for batch in batches])
    return union


class JointRollouts:
    """The per-adapter sampling state of one sampling trainer in joint mode."""

    def __init__(self, trainer, names) -> None:
        self.trainer, self.names = trainer, tuple(names)
        self.rng_states: list[torch.Tensor] | None = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The adapters' RNG streams by name (none before the first round), for a checkpoint: a resumed run must
        continue each stream where the interrupted one left it."""
        if self.rng_states is None:
            return {}
        return {f"rng/{name}": state for name, state in zip(self.names, self.rng_states)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors` (nothing saved: the streams fork at the next round, as at the start)."""
        saved = sorted(key.removeprefix("rng/") for key in tensors if key.startswith("rng/"))
        if not saved:
            self.rng_states = None
            return
        if saved != sorted(self.names):
            raise ValueError(f"the checkpoint holds the sampling RNG streams of adapters {saved}, but this run trains "
                             f"{list(self.names)} (model_adapter_name): resume with the same adapters")
        self.rng_states = [tensors[f"rng/{name}"] for name in self.names]

    def generate(self, generation_batch: dict, score, num_chunks: int) -> list[dict]:
        """Sample and score each adapter's prompts with ``score(examples) -> scored rows``, cut each into
        ``num_chunks`` micro-batches and return the union micro-batches."""
        joint = self.trainer._joint
        counts = generation_batch[COUNTS_KEY].tolist()
        examples = generation_batch[EXAMPLES_KEY]
        if self.rng_states is None:
            self.rng_states = [torch.get_rng_state()] * len(self.names)
        per_adapter, start = [], 0
        for k, (name, count) in enumerate(zip(self.names, counts)):
            torch.set_rng_state(self.rng_states[k])
            with joint.router.use(name), joint.metrics_of(name):
                per_adapter.append(score(examples[start:start + count], num_chunks))
            self.rng_states[k] = torch.get_rng_state()
            start += count
        pad_token_id = self.trainer._tokenizer.pad_token_id
        return [union_micro_batch([chunks[j] for chunks in per_adapter], pad_token_id) for j in range(num_chunks)]
