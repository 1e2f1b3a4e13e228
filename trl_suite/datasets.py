"""Stand-ins of TRL's test datasets (``trl-internal-testing/zen`` and its configs) and the redirect of
``datasets.load_dataset`` to them.

Two sources, each config with TRL's columns and split sizes (19 rows: 17 train, the last 2 test):

- TRL's own rows, when a TRL checkout is at hand: its ``scripts/generate_zen_dataset.py`` is parsed (``ast``, its
  dict literals read with ``literal_eval``; nothing of it is executed or copied here). A few tests pin the rows
  (``test_prepare_input_called_with_correct_data`` expects the first prompts by text), so this is the default;
- our own rows otherwise (proverbs split into a prompt and its ending).

Saved as one parquet file per split, so ``streaming=True`` (an ``IterableDataset``) works as on the hub.

``zen-image`` / ``zen-multi-image`` (vision): the conversational configs with TRL's column layout (read off its
``generate_zen_image_dataset.py`` / ``generate_zen_multi_image_dataset.py``): ``zen-image`` keeps plain-text
messages beside one ``image`` per row; ``zen-multi-image`` puts ``{"type": "image"}`` blocks in the user turn
(1-3, before, after or around the text) and one entry per block in ``images``. Our own rows and our own random
images (32-63 px a side, as TRL's, from a fixed seed); no test pins their text. Written on first use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import Dataset, Features, Image, List, Value

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


IMAGE_DATASETS = {"trl-internal-testing/zen-image": False, "trl-internal-testing/zen-multi-image": True}
_CONVERSATIONAL = ("conversational_language_modeling", "conversational_prompt_only", "conversational_prompt_completion",
                   "conversational_preference", "conversational_unpaired_preference")
# Where the image blocks sit in a zen-multi-image user turn (row i takes layout i % 5), as in TRL's rows.
_LAYOUTS = (("image", "text"), ("text", "image"), ("image", "text", "image"), ("image", "image", "text"),
            ("text", "image", "image"))


def _with_images(messages: list[dict], layout: tuple[str, ...]) -> list[dict]:
    """A conversation with its user turn's text split into content blocks placed by ``layout`` and every other
    turn's text as one text block (TRL's multi-image rows)."""
    blocks = []
    for message in messages:
        if message["role"] == "user":
            content = [{"type": "image"} if kind == "image" else {"type": "text", "text": message["content"]}
                       for kind in layout]
        else:
            content = [{"type": "text", "text": message["content"]}]
        blocks.append({"role": message["role"], "content": content})
    return blocks


def zen_image_configs(multi: bool, seed: int = 0) -> dict[str, tuple[dict[str, list], Features]]:
    """``{config: (columns, features)}`` of ``zen-image`` (``multi=False``) or ``zen-multi-image``."""
    rng = np.random.default_rng(seed)

    def image():
        height, width = rng.integers(32, 64, size=2)
        return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    text = zen_configs()
    message = [{"content": Value("string"), "role": Value("string")}]
    if multi:
        block = {"type": Value("string"), "text": Value("string")}
        message = [{"content": List(block), "role": Value("string")}]
    configs = {}
    for name in _CONVERSATIONAL:
        columns = dict(text[name])
        features = {column: message for column in columns if column != "label"}
        if "label" in columns:
            features["label"] = Value("bool")
        if multi:
            for column in features.keys() - {"label"}:
                columns[column] = [_with_images(row, _LAYOUTS[i % len(_LAYOUTS)])
                                   for i, row in enumerate(columns[column])]
            first = "messages" if "messages" in columns else "prompt"
            columns["images"] = [[image() for part in row[0]["content"] if part["type"] == "image"]
                                 for row in columns[first]]
            features["images"] = List(Image())
        else:
            columns["image"] = [image() for _ in range(len(next(iter(columns.values()))))]
            features["image"] = Image()
        configs[name] = (columns, Features(features))
    return configs


def write_zen_images(root: Path, path: str) -> None:
    """Write ``path`` (a key of IMAGE_DATASETS) as ``root/<dataset>/<config>/{train,test}.parquet``."""
    for name, (columns, features) in zen_image_configs(IMAGE_DATASETS[path]).items():
        split = Dataset.from_dict(columns, features=features).train_test_split(test_size=NUM_TEST, shuffle=False)
        for part, dataset in split.items():
            file = root / path.replace("/", "--") / name / f"{part}.parquet"
            file.parent.mkdir(parents=True, exist_ok=True)
            dataset.to_parquet(str(file))


def redirected_load_dataset(original, root: Path):
    """``datasets.load_dataset`` that serves ``trl-internal-testing/zen`` configs from ``root`` (as
    :func:`write_zen` left them), ``zen-image`` / ``zen-multi-image`` (written on first use), and passes every
    other call to ``original``."""

    def load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
        if path != DATASET and path not in IMAGE_DATASETS:
            return original(path, name, *args, split=split, streaming=streaming, **kwargs)
        if name is None:
            raise ValueError(f"{path} needs a config name (trl_suite stand-in)")
        if path in IMAGE_DATASETS and not (root / path.replace("/", "--")).is_dir():
            write_zen_images(root, path)
        folder = root / path.replace("/", "--") / name
        if not folder.is_dir():
            raise FileNotFoundError(f"trl_suite has no stand-in of {path} config {name!r}")
        files = {part: str(folder / f"{part}.parquet") for part in ("train", "test")}
        return original("parquet", data_files=files, split=split, streaming=streaming)

    return load_dataset
