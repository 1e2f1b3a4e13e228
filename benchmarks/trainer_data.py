"""The trainer cases' data: preset arithmetic pairs with prompts (and optionally completions) padded to a set length,
and GRPO's view of them with its reward functions. Every path of a case builds the same rows from the same seed.

Legend: P prompt tokens per row (BOS included), C completion tokens per preference row (EOS excluded).

The preset tokenizer is character level (one token per character, plus BOS), so a text of n characters is n tokens.
"""

from __future__ import annotations

import random

# The few-shot header of the long-prompt cases (57 characters). ~60-token prompts have no room for it, so they use
# the short one (17 characters), which leaves ~35 characters of examples in front of a ~6-character question.
_CONTEXT_HEADER = "Answer with the result only, in digits. Worked examples:\n"
_SHORT_HEADER = "Worked examples:\n"
# A long completion is a scratchpad of worked lines, then this and the answer.
_ANSWER_TAIL = "so the answer is {answer}"


def _worked_lines(problems, num_chars: int, rng: random.Random) -> str:
    """``a op b=c`` lines drawn from ``problems`` with ``rng``, cut on the left to exactly ``num_chars`` characters
    (the first line may be partial, as in a sliding window over a document)."""
    text = ""
    while len(text) < num_chars:
        a, op, b = rng.choice(problems)
        text += f"{a}{op}{b}={a + b if op == '+' else a - b}\n"
    return text[len(text) - num_chars:] if num_chars > 0 else ""


def long_prompt_dataset(num_pairs: int, prompt_tokens: int, tokenizer, seed: int = 0,
                        completion_tokens: int | None = None):
    """The preset arithmetic pairs with every prompt padded to exactly ``prompt_tokens`` tokens (BOS included) by a
    few-shot context in front of the question: a header, then ``a op b=c`` lines drawn from the train split with a
    per-row seeded RNG (so rows differ, and the same arguments give the same dataset), cut on the left to fit.

    ``completion_tokens`` None: completions are the preset's answers (2-4 tokens with EOS). Otherwise each chosen
    and rejected completion is a scratchpad of worked lines ending in "so the answer is N" (the right answer for
    chosen, the preset's mistake for rejected), of a length drawn uniformly within 10% of ``completion_tokens``
    (per completion, so a pair's rows differ in length and batches carry padding, as real completions do).
    """
    from datasets import Dataset

    from fusedrl.cli.presets.datasets import ARITHMETIC, preference_dataset

    pairs = preference_dataset(num_pairs, seed=seed)
    problems = ARITHMETIC.problems("train")
    header = _CONTEXT_HEADER if completion_tokens is None else _SHORT_HEADER
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for row, (question, chosen, rejected) in enumerate(zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])):
        rng = random.Random(f"bench-context/{seed}/{row}")
        prompt = header + _worked_lines(problems, prompt_tokens - 1 - len(header) - len(question), rng) + question
        if len(tokenizer(text=prompt)["input_ids"]) != prompt_tokens:
            raise AssertionError(f"row {row}: prompt is not {prompt_tokens} tokens")
        rows["prompt"].append(prompt)
        for column, answer in (("chosen", chosen), ("rejected", rejected)):
            if completion_tokens is not None:
                tail = _ANSWER_TAIL.format(answer=answer)
                spread = completion_tokens // 10
                length = rng.randint(completion_tokens - spread, completion_tokens + spread)
                answer = _worked_lines(problems, length - len(tail), rng) + tail
            rows[column].append(answer)
    return Dataset.from_dict(rows)


def char_code_reward(completions, **kwargs):
    """Mean ``ord(c) % 7 / 7`` over a completion's characters: meaningless, but it differs between completions of
    a random model (the exact answer never comes up), so advantages and losses are nonzero and comparable."""
    return [sum(ord(ch) % 7 for ch in text) / (7 * max(len(text), 1)) for text in completions]


def grpo_inputs(pairs):
    """GRPO's view of the benchmark pairs: prompt-only rows (``answer`` keeps the chosen completion), and the
    trainer's ``reward_funcs``: exact answer plus :func:`char_code_reward`, the same functions for every path."""
    from fusedrl.cli.presets import answer_reward

    rewards = [answer_reward, char_code_reward]
    return pairs.remove_columns("rejected").rename_column("chosen", "answer"), {"reward_funcs": rewards}
