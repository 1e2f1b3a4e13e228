"""Sampling that does not depend on how the rows are split across processes (``rank_invariant_sampling=True``).

By default the online trainers sample as TRL does: ``model.generate`` draws every token of a batch from the
process's global RNG, row after row, and each process seeds its own stream. The completion of a row then depends on
which other rows share its process and batch, so a run on two processes samples other completions than the same run
on one process with twice the batch, and no metric of the two can be compared.

With row seeds every completion has a random stream of its own, seeded from ``(seed, mode, global step, round within
the step, global row index)``. At each decoding step the row's next token is the argmax of its processed logits plus
Gumbel noise drawn from that stream (the Gumbel-max trick: ``argmax_v(logit_v + G_v)``, ``G_v = -log E_v`` with
``E_v ~ Exp(1)``, is an exact sample of ``softmax(logit)``). The processed logits are the ones ``generate`` would
sample from: its logits processors (repetition penalty, ...) and then the same warpers in the same order
(temperature, top-h, top-k, top-p, min-p, typical, epsilon, eta), built from the resolved generation config. So a
row's completion depends only on its prompt, the weights and its seed: the same on any number of processes, in any
batch, up to fp32 rounding of its logits (a near-tie between two tokens could flip; at 1e-7 relative it does not
happen in practice). Greedy decoding (``do_sample=False``) is already deterministic and is left as it is.

Legend: B rows, V vocabulary.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

_WARPER_FIELDS = ("temperature", "top_h", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def row_seed(seed: int, *key) -> int:
    """A 63-bit seed from ``seed`` and ``key`` (ints and strings): a hash, so nearby keys give unrelated streams."""
    text = ":".join(str(part) for part in (seed, *key))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class RowSeedSchedule:
    """The row seeds of a trainer's sampling rounds: ``next(...)`` for each call of ``generate``.

    A round is keyed by ``(mode, global_step, k)``, k counting the rounds sampled at that global step (GRPO samples
    one round per ``steps_per_generation * num_iterations`` micro-steps, online DPO one per micro-step). The key
    depends only on the optimizer step, which a resumed run restores, never on a process's own counters; k restarts
    at each step. ``stream`` names an independent count (joint mode samples one round per adapter: each adapter's
    k counts its own rounds, so it draws what its separate run draws). Row ``i`` of process ``p`` with ``num_rows``
    rows per process is global row ``p * num_rows + i``: accelerate hands process ``p`` the ``p``-th slice of each
    global batch, so the rows a single process would see at ``num_processes`` times the batch get the same seeds.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._last: tuple[str, int] | None = None
        self._rounds: dict[str, int] = {}

    def next(self, *, mode: str, global_step: int, process_index: int, num_rows: int, stream: str = "") -> list[int]:
        if self._last != (mode, global_step):
            self._last, self._rounds = (mode, global_step), {}
        rounds = self._rounds.get(stream, 0)
        self._rounds[stream] = rounds + 1
        key = (mode, global_step, rounds)
        first = process_index * num_rows
        return [row_seed(self.seed, *key, first + i) for i in range(num_rows)]


class RowSeededSampling(LogitsProcessor):
    """Last logits processor of a greedy ``generate``: adds each row's Gumbel noise ``[V]`` (drawn from that row's
    own generator, created on the logits' device at the first step) so that the argmax is a sample (module
    docstring). Rows that already finished still draw, which keeps every stream independent of the other rows."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        num_rows, vocab = scores.shape
        if num_rows != len(self.seeds):
            raise ValueError(f"row-seeded sampling got {num_rows} rows for {len(self.seeds)} seeds")
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        noise_BV = torch.stack([torch.empty(vocab, device=scores.device, dtype=torch.float32).exponential_(generator=g)
                                for g in self.generators])
        # -log E is Gumbel noise, finite (torch's exponential_ never returns 0); filtered tokens (-inf) stay -inf.
        return scores.float() - noise_BV.log()


def _resolved(config: GenerationConfig, model) -> GenerationConfig:
    """``config`` with unset fields filled as ``generate`` fills them: the model's generation config first, then
    transformers' defaults."""
    resolved = copy.deepcopy(config)
    model_config = getattr(model, "generation_config", None)
    if model_config is not None:
        resolved.update(defaults_only=True, **model_config.to_dict())
    resolved.update(defaults_only=True, **GenerationConfig._get_default_generation_params())
    return resolved


def rows_per_input_row(config: GenerationConfig, model) -> int:
    """How many rows ``model.generate`` decodes per input row with ``config``: ``max(num_beams,
    num_return_sequences)`` of the config resolved as ``generate`` resolves it (it repeats the prompts and masks that
    many times, but not a KV cache it is handed)."""
    resolved = _resolved(config, model)
    return max(resolved.num_beams or 1, resolved.num_return_sequences or 1)


def _warpers(config: GenerationConfig, device: torch.device) -> list[LogitsProcessor]:
    """The warpers ``generate`` applies when sampling (transformers 5: ``_get_logits_processor``), same order."""
    warpers: list[LogitsProcessor] = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if getattr(config, "top_h", None) is not None:
        warpers.append(TopHLogitsWarper(top_h=config.top_h))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=config.typical_p))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        warpers.append(EpsilonLogitsWarper(epsilon=config.epsilon_cutoff))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        warpers.append(EtaLogitsWarper(epsilon=config.eta_cutoff, device=device))
    return warpers


def row_seeded_generation(config: GenerationConfig, model, seeds: Sequence[int], device: torch.device
                          ) -> tuple[GenerationConfig, LogitsProcessorList | None]:
    """``(generation config, logits processors)`` for ``model.generate`` that sample row ``i`` from ``seeds[i]``:
    the config made greedy (its warper fields cleared so ``generate`` does not warn about them) and the warpers plus
    :class:`RowSeededSampling` as extra processors. A greedy ``config`` comes back unchanged with no processors."""
    resolved = _resolved(config, model)
    if not resolved.do_sample:
        return config, None
    if resolved.num_beams not in (None, 1):
        raise ValueError(f"rank_invariant_sampling samples one token per row and cannot drive beam search "
                         f"(num_beams={resolved.num_beams}); set num_beams=1 or rank_invariant_sampling=False")
    greedy = copy.deepcopy(config)
    greedy.do_sample = False
    for name in _WARPER_FIELDS:
        if hasattr(greedy, name):
            setattr(greedy, name, None)
    return greedy, LogitsProcessorList([*_warpers(resolved, device), RowSeededSampling(seeds)])


def trainer_row_seeds(trainer, num_rows: int) -> list[int] | None:
    """The seeds of the ``num_rows`` rows a trainer's process samples next (its :class:`RowSeedSchedule`, kept on the
    trainer), or None when ``args.rank_invariant_sampling`` is off (sample from the global RNG, as TRL)."""
    if not getattr(trainer.args, "rank_invariant_sampling", False):
        return None
    schedule = getattr(trainer, "_row_seed_schedule", None)
    if schedule is None:
        schedule = trainer._row_seed_schedule = RowSeedSchedule(trainer.args.seed)
    # Joint mode records each adapter's round under its metric prefix ("a/"): one stream per adapter.
    return schedule.next(mode="train" if trainer.model.training else "eval", global_step=trainer.state.global_step,
                         process_index=trainer.accelerator.process_index, num_rows=num_rows,
                         stream=getattr(trainer, "_metric_prefix", ""))
