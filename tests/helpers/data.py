"""The preference pairs of the preference trainers' parity tests (DPO, ORPO, CPO, KTO).

Lengths vary (prompts of 5-25 tokens, completions of 2-25): with max_length=20, keep_start drops rows 1 and 6 and
cuts three completions; keep_end cuts prompts instead.
"""

from __future__ import annotations

from datasets import Dataset

PROMPTS = ["2+2=", "What is 13+29? Answer:", "Add 7 and 8.\n", "17-9=", "Q: 120+35\nA:", "9+10=",
           "The sum of 3, 4 and 5 is", "55-5="]
CHOSEN = ["4", " 42", "15", "8", " 155, since 120+35 = 155", "19", " 12", "50"]
REJECTED = ["5", " 24", "fifteen", "7", " 15", "21 (nine plus ten)", " 345", "5"]
EVAL_PAIRS = {"prompt": ["3+4=", "8-6=", "Twelve plus one:"], "chosen": ["7", "2", " 13"],
              "rejected": ["8", "14", " 11"]}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


def standard_pairs(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS[:n], "chosen": CHOSEN[:n], "rejected": REJECTED[:n]})


def conversational_pairs(n: int = 8) -> Dataset:
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:n]],
        "chosen": [[{"role": "assistant", "content": c}] for c in CHOSEN[:n]],
        "rejected": [[{"role": "assistant", "content": r}] for r in REJECTED[:n]],
    })


def pair_rows(**columns) -> Dataset:
    """The 8 pairs with ``columns`` replaced; a column given as ``None`` is left out (the bad-row cases)."""
    rows = {"prompt": list(PROMPTS), "chosen": list(CHOSEN), "rejected": list(REJECTED)}
    rows.update(columns)
    return Dataset.from_dict({k: v for k, v in rows.items() if v is not None})
