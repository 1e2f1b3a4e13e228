"""Stand-ins of TRL's test datasets (``trl-internal-testing/zen`` and its configs) and the redirect of
``datasets.load_dataset`` to them.

Two sources, each config with TRL's columns and split sizes (19 rows: 17 train, the last 2 test):

- TRL's own rows, when a TRL checkout is at hand: its ``scripts/generate_zen_dataset.py`` is parsed (``ast``, its
  dict literals read with ``literal_eval``; nothing of it is executed or copied here). A few tests pin the rows
  (``test_prepare_input_called_with_correct_data`` expects the first prompts by text), so this is the default;
- our own rows otherwise (proverbs split into a prompt and its ending).

Saved as one parquet file per split, so ``streaming=True`` (an ``IterableDataset``) works as on the hub.
``zen-image`` / ``zen-multi-image`` (vision) have no stand-in.
"""

from __future__ import annotations

import ast
from pathlib import Path

from datasets import Dataset

DATASET = "trl-internal-testing/zen"
NUM_TEST = 2

# (prompt, good ending, worse ending, question, answer); 19 rows as in TRL's generator.
_ROWS = [
    ("Measure twice,", " cut once.", " cut twice.", "How often should you measure?", "Twice, then cut once."),
    ("A stitch in time", " saves nine.", " saves none.", "What does a timely stitch save?", "Nine."),
    ("Still waters", " run deep.", " run dry.", "How do still waters run?", "Deep."),
    ("Slow and steady", " wins the race.", " loses the race.", "What wins the race?", "Slow and steady."),
    ("Many hands", " make light work.", " make a mess.", "What do many hands make?", "Light work."),
    ("Look before", " you leap.", " you sleep.", "What comes before a leap?", "A look."),
    ("Practice", " makes perfect.", " makes tired.", "What makes perfect?", "Practice."),
    ("Actions speak louder", " than words.", " than music.", "What speaks louder than words?", "Actions."),
    ("Better late", " than never.", " than early.", "Is late better than never?", "Yes, it is."),
    ("Every cloud has", " a silver lining.", " a grey lining.", "What does every cloud have?", "A silver lining."),
    ("Fortune favours", " the bold.", " the timid.", "Whom does fortune favour?", "The bold."),
    ("Knowledge", " is power.", " is heavy.", "What is power?", "Knowledge."),
    ("Rome was not built", " in a day.", " at all.", "How long did Rome take?", "More than a day."),
    ("The early bird", " catches the worm.", " misses the worm.", "Who catches the worm?", "The early bird."),
    ("Two heads are", " better than one.", " worse than one.", "Are two heads better than one?", "Usually."),
    ("When in doubt,", " leave it out.", " put it in.", "What to do when in doubt?", "Leave it out."),
    ("Easy come,", " easy go.", " hard go.", "How does easy come go?", "Easily."),
    ("Haste", " makes waste.", " makes sense.", "What does haste make?", "Waste."),
    ("Less", " is more.", " is less.", "What is more?", "Less."),
]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def zen_configs() -> dict[str, dict[str, list]]:
    """``{config name: columns}`` of every stand-in config (all rows; :func:`write_zen` splits them)."""
    prompts, good, bad, questions, answers = (list(column) for column in zip(*_ROWS, strict=True))
    labels = [i % 3 != 1 for i in range(len(_ROWS))]  # unpaired preference: a fixed mix of True and False
    worse = [b.strip().capitalize() for b in bad]
    return {
        "standard_language_modeling": {"text": [p + g for p, g in zip(prompts, good, strict=True)]},
        "standard_prompt_only": {"prompt": prompts},
        "standard_prompt_completion": {"prompt": prompts, "completion": good},
        "standard_preference": {"prompt": prompts, "chosen": good, "rejected": bad},
        "standard_implicit_prompt_preference": {"chosen": [p + g for p, g in zip(prompts, good, strict=True)],
                                                "rejected": [p + b for p, b in zip(prompts, bad, strict=True)]},
        "standard_unpaired_preference": {"prompt": prompts,
                                         "completion": [g if keep else b for g, b, keep in
                                                        zip(good, bad, labels, strict=True)], "label": labels},
        "standard_stepwise_supervision": {"prompt": prompts, "completions": [[g, " Indeed."] for g in good],
                                          "labels": [[True, i % 2 == 0] for i in range(len(_ROWS))]},
        "conversational_language_modeling": {"messages": [_user(q) + _assistant(a)
                                                          for q, a in zip(questions, answers, strict=True)]},
        "conversational_prompt_only": {"prompt": [_user(q) for q in questions]},
        "conversational_prompt_completion": {"prompt": [_user(q) for q in questions],
                                             "completion": [_assistant(a) for a in answers]},
        "conversational_preference": {"prompt": [_user(q) for q in questions],
                                      "chosen": [_assistant(a) for a in answers],
                                      "rejected": [_assistant(w) for w in worse]},
        "conversational_implicit_prompt_preference": {
            "chosen": [_user(q) + _assistant(a) for q, a in zip(questions, answers, strict=True)],
            "rejected": [_user(q) + _assistant(w) for q, w in zip(questions, worse, strict=True)]},
        "conversational_unpaired_preference": {"prompt": [_user(q) for q in questions],
                                               "completion": [_assistant(a if keep else w) for a, w, keep in
                                                              zip(answers, worse, labels, strict=True)],
                                               "label": labels},
    }


def trl_zen_configs(script: Path) -> dict[str, dict[str, list]]:
    """``{config name: columns}`` read from TRL's ``generate_zen_dataset.py``: each ``<var> =
    Dataset.from_dict({...})`` literal, named by the ``<var>.push_to_hub(..., config_name=...)`` call on it."""
    literals, names = {}, {}
    for node in ast.walk(ast.parse(script.read_text())):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "attr", None) == "from_dict" and node.value.args):
            literals[node.targets[0].id] = ast.literal_eval(node.value.args[0])
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "push_to_hub":
            config = next((k.value.value for k in node.keywords if k.arg == "config_name"), None)
            if config is not None and isinstance(node.func.value, ast.Name):
                names[node.func.value.id] = config
    configs = {names[var]: columns for var, columns in literals.items() if var in names}
    if "standard_prompt_only" not in configs:
        raise ValueError(f"{script}: found no zen configs (expected Dataset.from_dict literals + push_to_hub)")
    return configs


def write_zen(root: Path, script: Path | None = None) -> Path:
    """Write every config as ``root/<config>/{train,test}.parquet`` (TRL's rows from ``script`` when given, else
    ours); returns the dataset's folder."""
    folder = root / DATASET.replace("/", "--")
    configs = trl_zen_configs(script) if script is not None else zen_configs()
    for name, columns in configs.items():
        split = Dataset.from_dict(columns).train_test_split(test_size=NUM_TEST, shuffle=False)
        for part, dataset in split.items():
            path = folder / name / f"{part}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            dataset.to_parquet(str(path))
    return folder


def redirected_load_dataset(original, root: Path):
    """``datasets.load_dataset`` that serves ``trl-internal-testing/zen`` configs from ``root`` (as
    :func:`write_zen` left them) and passes every other call to ``original``."""

    def load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
        if path != DATASET:
            return original(path, name, *args, split=split, streaming=streaming, **kwargs)
        if name is None:
            raise ValueError(f"{DATASET} needs a config name (trl_suite stand-in)")
        folder = root / DATASET.replace("/", "--") / name
        if not folder.is_dir():
            raise FileNotFoundError(f"trl_suite has no stand-in of {DATASET} config {name!r}")
        files = {part: str(folder / f"{part}.parquet") for part in ("train", "test")}
        return original("parquet", data_files=files, split=split, streaming=streaming)

    return load_dataset
