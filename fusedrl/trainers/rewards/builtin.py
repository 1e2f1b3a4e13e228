"""Built-in reward functions, in TRL's reward-function convention.

Every function takes ``prompts``, ``completions`` (strings, or ``[{"role": "assistant", "content": ...}]`` lists for
conversational data), ``completion_ids`` (the token ids of each completion, EOS included) and the other dataset
columns as keyword arguments, and returns one float per completion (``None`` = not applicable to this row).

- ``accuracy``: 1.0 when the completion, stripped of surrounding whitespace, equals the row's ``answer`` column
  exactly, else 0.0 (the bundled arithmetic task; ``presets.answer_reward`` is the same rule).
- ``digit_accuracy``: partial credit, the share of the answer's characters the completion has at the same place,
  over the longer of the two (``"22"`` for ``"20"``: 0.5; ``"200"``: 2/3; exactly 1.0 iff ``accuracy`` is 1.0), a
  denser signal for a policy that rarely gets the whole answer right.
- ``format``: 1.0 when the stripped completion is an integer (``-?\\d+``), the bundled task's answer format, else 0.0.
  :func:`regex_format_reward` builds one for another pattern.
- ``length_penalty``: ``-0.01`` per completion token (EOS included), a linear cost that favours short answers.
  :func:`overlong_penalty` builds DAPO's soft overlong punishment for a given ``max_completion_length``.
"""

from __future__ import annotations

import re
from collections.abc import Callable


def completion_text(completion) -> str:
    """The text of one completion in either TRL format."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def accuracy_reward(completions: list, answer: list[str] | None = None, **kwargs) -> list[float | None]:
    """1.0 where the stripped completion equals ``answer`` (stripped, as a string), else 0.0; None for rows whose
    answer is None (multi-task batches)."""
    if answer is None:
        raise ValueError("the accuracy reward needs an 'answer' column in the dataset (the expected completion text)")
    return [None if expected is None else float(completion_text(c).strip() == str(expected).strip())
            for c, expected in zip(completions, answer, strict=True)]


def digit_accuracy_reward(completions: list, answer: list[str] | None = None, **kwargs) -> list[float | None]:
    """Positional character matches between the stripped completion and ``answer``, divided by the longer length."""
    if answer is None:
        raise ValueError("the digit_accuracy reward needs an 'answer' column in the dataset")
    out = []
    for completion, expected in zip(completions, answer, strict=True):
        if expected is None:
            out.append(None)
            continue
        text, expected = completion_text(completion).strip(), str(expected).strip()
        matches = sum(a == b for a, b in zip(text, expected, strict=False))
        out.append(matches / max(len(text), len(expected), 1))
    return out


def regex_format_reward(pattern: str, *, name: str = "format") -> Callable[..., list[float]]:
    """A reward of 1.0 where the whole stripped completion matches ``pattern`` (``re.fullmatch``), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(completions: list, **kwargs) -> list[float]:
        return [float(compiled.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    reward.__name__ = name
    reward.__doc__ = f"1.0 where the stripped completion fully matches {pattern!r}, else 0.0."
    return reward


format_reward = regex_format_reward(r"-?\d+", name="format_reward")


def length_penalty(completions: list, completion_ids: list[list[int]] | None = None, **kwargs) -> list[float]:
    """``-0.01`` per completion token (characters when ``completion_ids`` is not given)."""
    if completion_ids is None:
        return [-0.01 * len(completion_text(c)) for c in completions]
    return [-0.01 * len(ids) for ids in completion_ids]


def overlong_penalty(max_completion_length: int, soft_punish_cache: int) -> Callable[..., list[float]]:
    """DAPO's soft overlong punishment (https://huggingface.co/papers/2503.14476, eq. 13): 0 up to
    ``max_completion_length - soft_punish_cache`` tokens, then falling linearly to -1 at ``max_completion_length``."""
    if not 0 <= soft_punish_cache < max_completion_length:
        raise ValueError(f"soft_punish_cache must lie in [0, max_completion_length={max_completion_length}), "
                         f"got {soft_punish_cache}")
    start = max_completion_length - soft_punish_cache

    def reward(completions: list, completion_ids: list[list[int]], **kwargs) -> list[float]:
        out = []
        for ids in completion_ids:
            n = len(ids)
            out.append(0.0 if n <= start else -1.0 if n >= max_completion_length
                       else (start - n) / max(soft_punish_cache, 1))
        return out

    reward.__name__ = "overlong_penalty"
    return reward
