"""Pairwise judges for :class:`~fusedrl.trainers.callbacks.WinRateCallback`.

A judge is any callable ``judge(prompts, completion_pairs) -> list[int]``: for each prompt it returns the index (0 or
1) of the better completion of its pair, or ``TIE`` (-1) when the two are equally good or the judge cannot tell. The
prompt is the text the policy was conditioned on (for conversational data, the rendered chat template).

Built in:

- :class:`RuleJudge` scores each completion with a user function ``score_fn(prompt, completion) -> float``; the higher
  score wins. :func:`arithmetic_answer_score` is such a function for the bundled arithmetic task
  (:mod:`fusedrl.cli.presets.datasets`), and :func:`arithmetic_judge` the judge built on it.
- :class:`RewardModelJudge` scores ``prompt + completion`` with a sequence-classification model (one logit); the
  higher reward wins.

Both score completions independently, so their verdicts have no position bias; the callback still shuffles pair order
by default because LLM judges have one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

TIE = -1


@runtime_checkable
class PairwiseJudge(Protocol):
    """``judge(prompts, completion_pairs)`` -> one of 0, 1 (index of the better completion) or ``TIE`` per prompt."""

    def __call__(self, prompts: list[str], completion_pairs: list[tuple[str, str]]) -> list[int]: ...


def check_verdicts(verdicts: Sequence[int], num_pairs: int) -> list[int]:
    """Validate a judge's answer: one verdict per pair, each in {0, 1, TIE}. Returns it as a list of ints."""
    verdicts = [int(v) for v in verdicts]
    if len(verdicts) != num_pairs:
        raise ValueError(f"judge returned {len(verdicts)} verdicts for {num_pairs} pairs")
    bad = sorted({v for v in verdicts if v not in (0, 1, TIE)})
    if bad:
        raise ValueError(f"judge verdicts must be 0, 1 or {TIE} (tie/unknown); got {bad}")
    return verdicts


def _verdict(score_0: float, score_1: float, margin: float) -> int:
    if abs(score_0 - score_1) <= margin:
        return TIE
    return 0 if score_0 > score_1 else 1


class RuleJudge:
    """Prefers the completion with the higher ``score_fn(prompt, completion)``; scores within ``margin`` tie.

    Example: ``RuleJudge(lambda prompt, completion: -len(completion))`` prefers the shorter completion.
    """

    def __init__(self, score_fn: Callable[[str, str], float], *, margin: float = 0.0):
        self.score_fn = score_fn
        self.margin = margin

    def __call__(self, prompts: list[str], completion_pairs: list[tuple[str, str]]) -> list[int]:
        if len(prompts) != len(completion_pairs):
            raise ValueError(f"{len(prompts)} prompts but {len(completion_pairs)} completion pairs")
        return [
            _verdict(float(self.score_fn(prompt, first)), float(self.score_fn(prompt, second)), self.margin)
            for prompt, (first, second) in zip(prompts, completion_pairs, strict=True)
        ]


# The question format of fusedrl.cli.presets.datasets ("What is 23+18?"); searched, not matched, so a prompt
# rendered through a chat template ("<bos><|user|>What is 23+18?<eos><|assistant|>") parses too.
_QUESTION = re.compile(r"What is (\d+)\s*([+-])\s*(\d+)\?")
_INTEGER = re.compile(r"-?\d+")


def arithmetic_answer_score(prompt: str, completion: str) -> float:
    """1.0 if the first integer in ``completion`` is the answer to the arithmetic question in ``prompt``, else 0.0.

    The first integer, not any: a completion listing many numbers must not win by containing the right one. A prompt
    without a question scores 0.0 for every completion, so the pair ties.
    """
    question = _QUESTION.search(prompt)
    number = _INTEGER.search(completion)
    if question is None or number is None:
        return 0.0
    a, op, b = int(question[1]), question[2], int(question[3])
    answer = a + b if op == "+" else a - b
    return float(int(number[0]) == answer)


def arithmetic_judge() -> RuleJudge:
    """The exact-answer judge of the bundled arithmetic task: the completion giving the correct answer wins; both or
    neither correct is a tie."""
    return RuleJudge(arithmetic_answer_score)


class RewardModelJudge:
    """Prefers the completion whose ``prompt + completion`` gets the higher reward from ``model``.

    ``model`` is a sequence-classification model with one label (``logits`` of shape ``(B, 1)``), e.g. a
    ``LlamaForSequenceClassification`` trained as a reward model; ``tokenizer`` must have a pad token. Texts are
    scored in batches of ``batch_size`` under ``torch.no_grad`` with the model in eval mode (its training mode is
    restored afterwards). Rewards within ``margin`` tie.
    """

    def __init__(
        self,
        model: PreTrainedModel | torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        margin: float = 0.0,
    ):
        if tokenizer.pad_token is None:
            raise ValueError("RewardModelJudge needs a tokenizer with a pad token")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.margin = margin

    @torch.no_grad()
    def scores(self, texts: list[str]) -> list[float]:
        """The reward of each text, fp32."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            rewards = []
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(device)
                logits_B1 = self.model(**batch).logits
                if logits_B1.ndim != 2 or logits_B1.shape[1] != 1:
                    raise ValueError(f"reward model must output logits of shape (B, 1); got {tuple(logits_B1.shape)}")
                rewards.extend(logits_B1[:, 0].float().tolist())
            return rewards
        finally:
            self.model.train(was_training)

    def __call__(self, prompts: list[str], completion_pairs: list[tuple[str, str]]) -> list[int]:
        if len(prompts) != len(completion_pairs):
            raise ValueError(f"{len(prompts)} prompts but {len(completion_pairs)} completion pairs")
        # Both completions of all pairs in one list, [p0+c0_0, p0+c0_1, p1+c1_0, ...], so batches stay full.
        texts = [prompt + completion for prompt, pair in zip(prompts, completion_pairs) for completion in pair]
        rewards = self.scores(texts)
        return [_verdict(rewards[2 * i], rewards[2 * i + 1], self.margin) for i in range(len(prompts))]
