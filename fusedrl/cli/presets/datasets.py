"""The bundled task: small integer arithmetic ("13+18=" -> "31"), generated in code, in TRL's dataset formats.

Every problem ``a op b`` is assigned to the train or the held-out split by a hash of its text, so the two splits never
share a problem whatever ``n`` and ``seed`` are, and the assignment does not move when the task grows. Within a split a
seeded ``random.Random`` draws problems (each problem once before any repeats) and, for preference data, one plausible
mistake as the rejected answer:

- ``off_by_one``: answer +-1 (the units digit is wrong; opt-in, see ``ARITHMETIC``);
- ``off_by_ten``: answer +-10 (the tens digit is wrong);
- ``wrong_op``: the other operation's result (``a-b`` for ``a+b``);
- ``no_carry``: digit-wise sum without carries, or digit-wise difference without borrows;
- ``swapped_digits``: the answer's digits reversed.

Formats (https://huggingface.co/docs/trl/dataset_formats): standard prompts are ``"13+18="`` with completion ``"31"``
(TRL appends EOS); conversational prompts are one user message with the same text, completions one assistant message.
The prompt is this terse on purpose: "What is 13+18?\\n" is twice the tokens and DPO steps cost in proportion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator, Sequence

from datasets import Dataset

SPLITS = ("train", "test")
MISTAKES = ("off_by_one", "off_by_ten", "wrong_op", "no_carry", "swapped_digits")
LEARNABLE_MISTAKES = ("off_by_ten", "wrong_op", "no_carry", "swapped_digits")


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """``a op b`` with ``0 <= a, b <= max_operand``; subtraction only where ``a >= b``, so answers are >= 0.

    ``test_fraction`` of the problems (by hash) are held out; rejected answers use the kinds named in ``mistakes``.
    """

    max_operand: int = 19
    ops: str = "+-"
    mistakes: tuple[str, ...] = LEARNABLE_MISTAKES
    question: str = "{a}{op}{b}="
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        unknown = set(self.mistakes) - set(MISTAKES)
        if unknown or not self.mistakes:
            raise ValueError(f"mistakes must be a non-empty subset of {MISTAKES}, got {self.mistakes}")

    def problems(self, split: str) -> list[tuple[int, str, int]]:
        """All problems of ``split`` in a fixed order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        want_test = split == "test"
        return [
            (a, op, b)
            for op in self.ops
            for a in range(self.max_operand + 1)
            for b in range(self.max_operand + 1)
            if (op != "-" or a >= b) and _is_test(f"{a}{op}{b}", self.test_fraction) == want_test
        ]


# The demo task: 610 problems, 57 held out. DPO from random init learns every default mistake kind within a few hundred
# steps; `off_by_one` needs the mod-10 table of the units digits, which pure DPO had not learned after 1500 steps
# (held-out accuracy on those pairs 0.42-0.44, see recipes.py), so it is opt-in.
ARITHMETIC = ArithmeticTask()
# Two-digit operands and every mistake kind, for longer runs: pure DPO reached only 0.59-0.65 in 800-1200 steps.
ARITHMETIC_HARD = ArithmeticTask(max_operand=99, mistakes=MISTAKES)


def _is_test(text: str, test_fraction: float) -> bool:
    # sha256 rather than hash(): Python salts str hashes per process, the split must not move between runs.
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    return bucket < test_fraction


def _solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def _digitwise(a: int, op: str, b: int) -> int:
    """``a op b`` computed digit by digit, dropping carries and borrows (the classic slip)."""
    result, place = 0, 1
    while a or b:
        digit = (a % 10 + b % 10) % 10 if op == "+" else (a % 10 - b % 10) % 10
        result += digit * place
        a, b, place = a // 10, b // 10, place * 10
    return result


def _mistakes(a: int, op: str, b: int) -> dict[str, list[int]]:
    answer = _solve(a, op, b)
    candidates = {
        "off_by_one": [answer - 1, answer + 1],
        "off_by_ten": [answer - 10, answer + 10],
        "wrong_op": [_solve(a, "-" if op == "+" else "+", b)],
        "no_carry": [_digitwise(a, op, b)],
        "swapped_digits": [int(str(answer)[::-1])],
    }
    return {name: [v for v in values if v >= 0 and v != answer] for name, values in candidates.items()}


def _wrong_answer(rng: random.Random, a: int, op: str, b: int, mistakes: Sequence[str]) -> int:
    options = _mistakes(a, op, b)
    usable = [name for name in mistakes if options[name]]
    if not usable:  # e.g. 0+0 with only wrong_op allowed: fall back to the always-usable +1
        return _solve(a, op, b) + 1
    return rng.choice(options[rng.choice(usable)])


def _draw(task: ArithmeticTask, split: str, n: int, rng: random.Random) -> Iterator[tuple[int, str, int]]:
    """``n`` problems of ``split``: a shuffled pass over all of them, then another, and so on."""
    pool = task.problems(split)
    if not pool and n > 0:
        raise ValueError(f"split {split!r} of {task} has no problems")
    drawn = 0
    while drawn < n:
        order = pool[:]
        rng.shuffle(order)
        yield from order[: n - drawn]
        drawn += min(len(order), n - drawn)


def _prompt(task: ArithmeticTask, a: int, op: str, b: int, conversational: bool) -> str | list[dict[str, str]]:
    question = task.question.format(a=a, op=op, b=b)
    return [{"role": "user", "content": question}] if conversational else question


def _completion(text: str, conversational: bool) -> str | list[dict[str, str]]:
    return [{"role": "assistant", "content": text}] if conversational else text


def preference_dataset(
    n: int,
    seed: int = 0,
    *,
    split: str = "train",
    conversational: bool = False,
    task: ArithmeticTask = ARITHMETIC,
) -> Dataset:
    """``n`` preference pairs (columns prompt, chosen, rejected): chosen is the right answer, rejected a mistake."""
    rng = random.Random(f"preference/{split}/{seed}")
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for a, op, b in _draw(task, split, n, rng):
        rows["prompt"].append(_prompt(task, a, op, b, conversational))
        rows["chosen"].append(_completion(str(_solve(a, op, b)), conversational))
        rows["rejected"].append(_completion(str(_wrong_answer(rng, a, op, b, task.mistakes)), conversational))
    return Dataset.from_dict(rows)


def unpaired_preference_dataset(
    n: int,
    seed: int = 0,
    *,
    split: str = "train",
    conversational: bool = False,
    task: ArithmeticTask = ARITHMETIC,
) -> Dataset:
    """``n`` KTO rows (columns prompt, completion, label): each problem gives a right (True) and a wrong (False) row."""
    rng = random.Random(f"unpaired/{split}/{seed}")
    rows = {"prompt": [], "completion": [], "label": []}
    for a, op, b in _draw(task, split, (n + 1) // 2, rng):
        for text, label in ((str(_solve(a, op, b)), True), (str(_wrong_answer(rng, a, op, b, task.mistakes)), False)):
            rows["prompt"].append(_prompt(task, a, op, b, conversational))
            rows["completion"].append(_completion(text, conversational))
            rows["label"].append(label)
    return Dataset.from_dict({key: values[:n] for key, values in rows.items()})


def prompt_dataset(
    n: int,
    seed: int = 0,
    *,
    split: str = "train",
    conversational: bool = False,
    task: ArithmeticTask = ARITHMETIC,
) -> Dataset:
    """``n`` prompt-only rows for GRPO (columns prompt, answer); pair with :func:`answer_reward`."""
    rng = random.Random(f"prompt/{split}/{seed}")
    rows = {"prompt": [], "answer": []}
    for a, op, b in _draw(task, split, n, rng):
        rows["prompt"].append(_prompt(task, a, op, b, conversational))
        rows["answer"].append(str(_solve(a, op, b)))
    return Dataset.from_dict(rows)


def answer_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, is exactly the answer, else 0.0.

    TRL reward-function signature: ``completions`` are strings (standard) or ``[{"role": "assistant", "content": ...}]``
    lists (conversational); ``answer`` is the dataset column of the same name; other columns arrive in ``kwargs``.
    """
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(text.strip() == expected) for text, expected in zip(texts, answer, strict=True)]
