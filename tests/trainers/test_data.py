"""fusedrl.trainers.data against trl.data_utils (the peer) on the same rows, plus every validation error message.

Rows come in both formats (standard strings, conversational messages). The tokenizer is the bundled
character-level one (ids: <bos>=1, <eos>=2; one token per character), so token counts below are hand-countable.
"""

from __future__ import annotations

import random
import warnings

import pytest
import trl.data_utils as trl_data
from datasets import Dataset, DatasetDict, Features, IterableDataset, LargeList, Sequence, Value
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from fusedrl.cli.presets.datasets import preference_dataset, prompt_dataset, unpaired_preference_dataset
from fusedrl.cli.presets.tokenizer import build_tokenizer
from fusedrl.trainers import data
from fusedrl.trainers.data import DatasetFormatError

# A template whose generation prompt ("<|assistant|>think:") is not a prefix of the rendered answer turn, like
# DeepSeek-R1's: apply_chat_template must cut the prompt back to the shared prefix.
THINK_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>think:' }}{% endif %}"
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


STANDARD = {
    "messages": {"text": "The sky is blue."},
    "prompt_only": {"prompt": "The sky is"},
    "prompt_completion": {"prompt": "The sky is", "completion": " blue."},
    "preference": {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    "implicit_preference": {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    "unpaired": {"prompt": "The sky is", "completion": " blue.", "label": True},
}
CONVERSATIONAL = {
    "messages": {"messages": [user("What color is the sky?"), assistant("Blue.")]},
    "prompt_only": {"prompt": [user("What color is the sky?")]},
    "prompt_continue": {"prompt": [user("What color is the sky?"), assistant("It is")]},
    "prompt_completion": {"prompt": [user("What color is the sky?")], "completion": [assistant("Blue.")]},
    "preference": {
        "prompt": [user("What color is the sky?")],
        "chosen": [assistant("Blue.")],
        "rejected": [assistant("Green.")],
    },
    "implicit_preference": {
        "chosen": [user("What color is the sky?"), assistant("Blue.")],
        "rejected": [user("What color is the sky?"), assistant("Green.")],
    },
    "unpaired": {"prompt": [user("What color is the sky?")], "completion": [assistant("Blue.")], "label": False},
    "multi_turn": {
        "prompt": [user("Hi"), assistant("Hello!"), user("6*7?")],
        "completion": [assistant("The answer is 42.")],
    },
    "row_template_kwargs": {
        "prompt": [user("Hi")],
        "chosen": [assistant("A")],
        "rejected": [assistant("B")],
        "chat_template_kwargs": {"enable_thinking": False},
    },
}


@pytest.mark.parametrize(
    "example",
    [*STANDARD.values(), *CONVERSATIONAL.values(), {"prompt": []}, {"other": 1}],
    ids=[*(f"standard-{k}" for k in STANDARD), *(f"chat-{k}" for k in CONVERSATIONAL), "empty-list", "no-text-key"],
)
def test_is_conversational(example):
    if example == {"prompt": []}:  # TRL indexes [0] and raises; fusedrl answers False
        with pytest.raises(IndexError):
            trl_data.is_conversational(example)
        assert data.is_conversational(example) is False
    else:
        assert data.is_conversational(example) == trl_data.is_conversational(example)


@pytest.mark.parametrize("template", [None, THINK_TEMPLATE], ids=["bundled-template", "think-template"])
@pytest.mark.parametrize("name", [*STANDARD, *CONVERSATIONAL])
def test_maybe_apply_chat_template_matches_trl(tokenizer, name, template):
    examples = [e[name] for e in (STANDARD, CONVERSATIONAL) if name in e]
    kwargs = {} if template is None else {"chat_template": template}
    for example in examples:
        ours = data.maybe_apply_chat_template(dict(example), tokenizer, **kwargs)
        assert ours == trl_data.maybe_apply_chat_template(dict(example), tokenizer, **kwargs)
        assert list(ours) == list(trl_data.maybe_apply_chat_template(dict(example), tokenizer, **kwargs))


def test_apply_chat_template_cuts_prompt_to_shared_prefix(tokenizer):
    """THINK_TEMPLATE: prompt alone '<|user|>Hi<eos><|assistant|>think:', with the answer '<|user|>Hi<eos>
    <|assistant|>A<eos>'; the shared prefix ends after '<|assistant|>', so chosen is 'A<eos>'."""
    out = data.apply_chat_template(CONVERSATIONAL["row_template_kwargs"], tokenizer, chat_template=THINK_TEMPLATE)
    assert out == {"prompt": "<|user|>Hi<eos><|assistant|>", "chosen": "A<eos>", "rejected": "B<eos>"}


def test_apply_chat_template_tool_last_matches_trl(tokenizer):
    """A prompt ending in a tool message gets the generation prompt, like a user one (THINK_TEMPLATE: the bundled
    template has no tool role)."""
    example = {"prompt": [user("6*7?"), {"role": "tool", "content": "42"}], "completion": [assistant("42.")]}
    ours = data.apply_chat_template(example, tokenizer, chat_template=THINK_TEMPLATE)
    assert ours == trl_data.apply_chat_template(example, tokenizer, chat_template=THINK_TEMPLATE)
    assert ours["completion"] == "42.<eos>"


def test_apply_chat_template_errors_match_trl(tokenizer):
    bad_keys = {"prompt": [user("a")], "chosen": [assistant("b")]}
    for fn in (data.apply_chat_template, trl_data.apply_chat_template):
        with pytest.raises(KeyError, match="Invalid keys in the example"):
            fn(bad_keys, tokenizer)
        with pytest.raises(ValueError, match="Invalid role in the last message: system"):
            fn({"prompt": [{"role": "system", "content": "be brief"}]}, tokenizer)


EXTRACT_CASES = {
    "space-goes-to-completion": {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    "no-space": {"chosen": "2+2=4", "rejected": "2+2=5"},
    "prefix": {"chosen": "ab", "rejected": "abc"},
    "identical": {"chosen": "abc", "rejected": "abc"},
    "chat": CONVERSATIONAL["implicit_preference"],
    "chat-multi-turn": {
        "chosen": [user("Hi"), assistant("Hello"), user("2+2?"), assistant("4")],
        "rejected": [user("Hi"), assistant("Hello"), user("2+2?"), assistant("5")],
    },
}


@pytest.mark.parametrize("example", EXTRACT_CASES.values(), ids=EXTRACT_CASES.keys())
def test_extract_prompt_matches_trl(example):
    assert data.extract_prompt(example) == trl_data.extract_prompt(example)


def test_extract_prompt_divergences():
    """TRL: empty side -> UnboundLocalError; a first-character mismatch looks at chosen[-1], so 'x ' vs 'y' gives
    prompt 'x'. fusedrl raises ValueError and returns an empty prompt."""
    with pytest.raises(ValueError, match="non-empty 'chosen' and 'rejected'"):
        data.extract_prompt({"chosen": "", "rejected": "a"})
    assert trl_data.extract_prompt({"chosen": "x ", "rejected": "y"})["prompt"] == "x"
    assert data.extract_prompt({"chosen": "x ", "rejected": "y"}) == {"prompt": "", "chosen": "x ", "rejected": "y"}


MAYBE_EXTRACT_CASES = {
    "explicit-standard": STANDARD["preference"],
    "explicit-chat": CONVERSATIONAL["preference"],
    "implicit-standard": STANDARD["implicit_preference"],
    "implicit-chat": CONVERSATIONAL["implicit_preference"],
    "leftover-standard-prompt": {"prompt": "What color is the sky?", **CONVERSATIONAL["implicit_preference"]},
    "not-preference": STANDARD["prompt_completion"],
}


@pytest.mark.parametrize("example", MAYBE_EXTRACT_CASES.values(), ids=MAYBE_EXTRACT_CASES.keys())
def test_maybe_extract_prompt_matches_trl(example):
    assert data.maybe_extract_prompt(example) == trl_data.maybe_extract_prompt(example)


def test_extract_prompt_via_map_matches_trl():
    dataset = Dataset.from_list([CONVERSATIONAL["implicit_preference"]] * 3)
    assert dataset.map(data.extract_prompt).to_list() == dataset.map(trl_data.extract_prompt).to_list()


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "chat"])
def test_unpair_preference_dataset_matches_trl(conversational):
    """5 pairs in map batches of 2: rows come chosen-first per batch, extra columns copied to both halves."""
    dataset = preference_dataset(5, conversational=conversational).add_column("id", list(range(5)))
    ours = data.unpair_preference_dataset(dataset, batch_size=2)
    theirs = trl_data.unpair_preference_dataset(dataset, batch_size=2)
    assert ours.features == theirs.features
    assert ours.to_list() == theirs.to_list()
    assert ours.column_names == theirs.column_names
    assert set(ours.column_names) == {"prompt", "completion", "label", "id"}
    assert ours["label"][:4] == [True, True, False, False]


def test_unpair_dict_and_iterable_and_maybe():
    dataset = preference_dataset(4)
    splits = DatasetDict(train=dataset, test=preference_dataset(2, split="test"))
    ours, theirs = data.unpair_preference_dataset(splits), trl_data.unpair_preference_dataset(splits)
    assert {k: v.to_list() for k, v in ours.items()} == {k: v.to_list() for k, v in theirs.items()}
    stream = dataset.to_iterable_dataset()
    assert list(data.unpair_preference_dataset(stream)) == list(trl_data.unpair_preference_dataset(stream))
    unpaired = unpaired_preference_dataset(4)
    assert data.maybe_unpair_preference_dataset(unpaired) is unpaired
    assert data.maybe_unpair_preference_dataset(dataset).to_list() == (
        trl_data.maybe_unpair_preference_dataset(dataset).to_list()
    )


def _token_dataset(num_rows, max_len, seed, *, ids_type="int64", large=False, with_empty=True):
    """Rows of random lengths in [0, max_len] (an empty row first when with_empty) with three aligned columns."""
    rng = random.Random(seed)
    lengths = [0] * with_empty + [rng.randint(1, max_len) for _ in range(num_rows - with_empty)]
    ids = [[rng.randrange(1000) for _ in range(n)] for n in lengths]
    sequence = (lambda t: LargeList(Value(t))) if large else (lambda t: Sequence(Value(t)))
    features = Features(input_ids=sequence(ids_type), attention_mask=sequence("int8"), labels=sequence("int64"))
    columns = {"input_ids": ids, "attention_mask": [[1] * n for n in lengths], "labels": [[-100] + r[1:] for r in ids]}
    return Dataset.from_dict(
        {k: [v if lengths[i] else [] for i, v in enumerate(c)] for k, c in columns.items()}, features=features
    )


PACK_CASES = {
    "docstring-seq4": (
        Dataset.from_dict(
            {
                "input_ids": [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]],
                "attention_mask": [[1, 1, 1, 0, 0], [1, 0], [1, 1, 0], [1]],
            }
        ),
        4,
        None,
    ),
    "awkward-seq37-batch47": (_token_dataset(123, 60, seed=0), 37, {"batch_size": 47}),
    "int32-ids-seq64": (_token_dataset(50, 64, seed=1, ids_type="int32"), 64, None),
    "large-list-seq10": (_token_dataset(30, 25, seed=2, large=True), 10, {"batch_size": 7}),
    "seq1": (_token_dataset(20, 5, seed=3), 1, None),
}


@pytest.mark.parametrize("strategy", data.packing.STRATEGIES)
@pytest.mark.parametrize("case", PACK_CASES.values(), ids=PACK_CASES.keys())
def test_pack_dataset_matches_trl(case, strategy):
    dataset, seq_length, map_kwargs = case
    ours = data.pack_dataset(dataset, seq_length, strategy, map_kwargs)
    theirs = trl_data.pack_dataset(dataset, seq_length, strategy, map_kwargs)
    assert ours.features == theirs.features
    assert ours.format == theirs.format
    assert ours.to_list() == theirs.to_list()
    assert all(len(row) <= seq_length for row in ours["input_ids"])


def test_pack_dataset_many_ties_matches_trl():
    """2000 rows, lengths 1..8 into bins of 16: many bins with equal free space, so the FIFO tie-break shows."""
    dataset = _token_dataset(2000, 8, seed=4, with_empty=False)
    ours = data.pack_dataset(dataset, 16, map_kwargs={"batch_size": 2000})
    assert ours.to_list() == trl_data.pack_dataset(dataset, 16, map_kwargs={"batch_size": 2000}).to_list()


def test_pack_dataset_keeps_format_and_dict():
    dataset = _token_dataset(40, 20, seed=5).with_format("torch", columns=["input_ids", "labels"])
    ours, theirs = data.pack_dataset(dataset, 16), trl_data.pack_dataset(dataset, 16)
    assert ours.format == theirs.format
    assert ours.format["columns"] == ["input_ids", "labels", "seq_lengths"]
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys() and all(a[k].tolist() == b[k].tolist() for k in a)
    splits = DatasetDict(train=_token_dataset(10, 9, seed=6), test=_token_dataset(7, 9, seed=7))
    ours, theirs = data.pack_dataset(splits, 8, "wrapped"), trl_data.pack_dataset(splits, 8, "wrapped")
    assert {k: v.to_list() for k, v in ours.items()} == {k: v.to_list() for k, v in theirs.items()}


def test_pack_dataset_errors():
    with pytest.raises(ValueError, match="Invalid packing strategy 'ffd'"):
        data.pack_dataset(PACK_CASES["docstring-seq4"][0], 4, "ffd")
    with pytest.raises(TypeError, match="Packing requires all columns to be lists of lists."):
        data.pack_dataset(Dataset.from_dict({"input_ids": [[1, 2]], "label": [1]}), 4)
    with pytest.raises(ValueError, match="All columns must have values of the same length."):
        data.pack_dataset(Dataset.from_dict({"input_ids": [[1, 2]], "attention_mask": [[1]]}), 4)


def test_pack_bfd_docstring_example():
    """TRL's docstring: lengths 5, 2, 3, 1 into 4 -> [1,2,3,4] (5 truncated), [8,9,10,11] (3 + 1), [6,7]."""
    packed = data.pack_dataset(PACK_CASES["docstring-seq4"][0], 4)
    assert packed["input_ids"] == [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7]]
    assert packed["seq_lengths"] == [[4], [3, 1], [2]]


@pytest.mark.parametrize("max_length", [1, 7, 100])
def test_truncate_dataset_matches_trl(max_length):
    with warnings.catch_warnings():  # "you are importing from trl.experimental"
        warnings.simplefilter("ignore")
        from trl.experimental.utils import truncate_dataset as trl_truncate_dataset
    dataset = _token_dataset(30, 20, seed=8).add_column("id", list(range(30)))
    ours = data.truncate_dataset(dataset, max_length, {"batch_size": 7})
    theirs = trl_truncate_dataset(dataset, max_length, {"batch_size": 7})
    assert ours.features == theirs.features and ours.to_list() == theirs.to_list()


def test_position_ids_match_trl_collator():
    rows = data.pack_dataset(_token_dataset(40, 20, seed=9), 32)["seq_lengths"]
    expected = DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths(rows)
    assert [data.position_ids_from_seq_lengths(r) for r in rows] == [t.tolist() for t in expected]
    assert data.position_ids_from_seq_lengths([3, 2]) == [0, 1, 2, 0, 1]


# ---- validation -------------------------------------------------------------------------------------------------

PAIRED_EXPECTED = (
    "Expected columns 'chosen' and 'rejected', plus 'prompt' unless the prompt is implicit (the shared start of "
    "chosen and rejected)."
)
UNPAIRED_EXPECTED = "Expected columns 'prompt', 'completion' and a boolean 'label' (True = desirable)."
LENGTH_ADVICE = "and truncation is off; raise max_length, turn truncation on, or drop the row"
GOOD_PAIR = {"prompt": "What is 1+1?\n", "chosen": "2", "rejected": "3"}

# (layout, rows, expected message); layout: "paired" / "unpaired" / "prompt". Rows are a list of dicts, or a
# Dataset where Arrow's behaviour matters (a missing message key reads back as None).
VALIDATION_ERRORS = {
    "paired-missing-rejected": (
        "paired",
        [{"prompt": "a", "chosen": "b"}],
        (
            f"paired preference dataset is missing column(s) ['rejected']; its columns are ['prompt', 'chosen']. "
            f"{PAIRED_EXPECTED}"
        ),
    ),
    "paired-given-unpaired": (
        "paired",
        [STANDARD["unpaired"]],
        (
            "paired preference dataset is missing column(s) ['chosen', 'rejected']; its columns are ['prompt', "
            f"'completion', 'label']. {PAIRED_EXPECTED} It looks unpaired (KTO format): a paired trainer needs "
            "chosen/rejected pairs."
        ),
    ),
    "unpaired-given-paired": (
        "unpaired",
        [GOOD_PAIR],
        (
            "unpaired preference dataset is missing column(s) ['completion', 'label']; its columns are ['prompt', "
            f"'chosen', 'rejected']. {UNPAIRED_EXPECTED} It looks paired: convert it with "
            "unpair_preference_dataset(dataset)."
        ),
    ),
    "prompt-only-given-messages": (
        "prompt",
        [CONVERSATIONAL["messages"]],
        (
            "prompt-only dataset is missing column(s) ['prompt']; its columns are ['messages']. Expected a column "
            "'prompt'."
        ),
    ),
    "no-rows": (
        "paired",
        Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}),
        "paired preference dataset has no rows",
    ),
    "chosen-none": (
        "paired",
        Dataset.from_list([GOOD_PAIR, {**GOOD_PAIR, "chosen": None}]),
        (
            "row 1, field 'chosen': expected a string (standard format) or a list of {'role', 'content'} messages "
            "(conversational format), got None"
        ),
    ),
    "prompt-int": (
        "prompt",
        [{"prompt": 7}],
        (
            "row 0, field 'prompt': expected a string (standard format) or a list of {'role', 'content'} messages "
            "(conversational format), got int 7"
        ),
    ),
    "prompt-no-messages": (
        "unpaired",
        [{**CONVERSATIONAL["unpaired"], "prompt": []}],
        "row 0, field 'prompt': has no messages",
    ),
    "message-not-dict": (
        "paired",
        [{"chosen": ["Hi", "Blue"], "rejected": ["Hi", "Green"]}],
        "row 0, field 'chosen', message 0: expected a dict, got str 'Hi'",
    ),
    "message-without-role": (
        "prompt",
        [{"prompt": [{"content": "Hi"}]}],
        "row 0, field 'prompt', message 0: 'role' must be a non-empty string, got None",
    ),
    "message-without-content-arrow": (
        "paired",
        Dataset.from_list(
            [CONVERSATIONAL["preference"], {**CONVERSATIONAL["preference"], "rejected": [{"role": "assistant"}]}]
        ),
        "row 1, field 'rejected', message 0: 'content' must be a string, got None",
    ),
    "content-int": (
        "unpaired",
        Dataset.from_list(
            [
                {
                    "prompt": [{"role": "user", "content": 3}],
                    "completion": [{"role": "assistant", "content": 4}],
                    "label": True,
                }
            ]
        ),
        "row 0, field 'prompt', message 0: 'content' must be a string, got int 3",
    ),
    "mixed-formats": (
        "paired",
        [{**CONVERSATIONAL["preference"], "prompt": "Q"}],
        (
            "row 0: fields mix formats ('prompt' is standard, 'chosen' is conversational, 'rejected' is "
            "conversational); use one format for every field of a row"
        ),
    ),
    "empty-chosen": ("paired", [GOOD_PAIR, GOOD_PAIR, {**GOOD_PAIR, "chosen": ""}], "row 2, field 'chosen': is empty"),
    "whitespace-rejected": ("paired", [{**GOOD_PAIR, "rejected": " \n"}], "row 0, field 'rejected': is empty"),
    "empty-chat-completion": (
        "unpaired",
        [{**CONVERSATIONAL["unpaired"], "completion": [assistant("")]}],
        "row 0, field 'completion': is empty",
    ),
    "prompt-ends-with-system": (
        "prompt",
        [{"prompt": [user("Hi"), {"role": "system", "content": "Be brief."}]}],
        (
            "row 0, field 'prompt': the last message has role 'system'; a prompt must end with a 'user', 'tool' or "
            "'assistant' message"
        ),
    ),
    "empty-prompt-only": ("prompt", [{"prompt": "Hi"}, {"prompt": ""}], "row 1, field 'prompt': is empty"),
    "implicit-prompt-empty": (
        "paired",
        [{"chosen": "Blue.", "rejected": "Green."}],
        (
            "row 0: there is no 'prompt' column and 'chosen' and 'rejected' share no common start, so the implicit "
            "prompt would be empty; add a 'prompt' column"
        ),
    ),
    "label-int": (
        "unpaired",
        [{**STANDARD["unpaired"], "label": 1}],
        "row 0, field 'label': expected a bool (True = desirable), got int 1",
    ),
    "split-name": (
        "paired",
        DatasetDict(train=Dataset.from_list([GOOD_PAIR]), test=Dataset.from_list([{**GOOD_PAIR, "chosen": ""}])),
        "split 'test', row 0, field 'chosen': is empty",
    ),
}


def _validate(layout, rows, **kwargs):
    if layout == "prompt":
        return data.validate_prompt_dataset(rows, **kwargs)
    return data.validate_preference_dataset(rows, paired=layout == "paired", **kwargs)


@pytest.mark.parametrize("case", VALIDATION_ERRORS.values(), ids=VALIDATION_ERRORS.keys())
def test_validation_error_messages(case):
    layout, rows, expected = case
    with pytest.raises(DatasetFormatError) as error:
        _validate(layout, rows)
    assert str(error.value) == expected
    assert isinstance(error.value, ValueError)


# Hand-counted with the character-level tokenizer (1 token per character, <bos> in front, each chat message
# "<|role|>content<eos>"):
# - standard pair: <bos> + "What is 1+1?\n" (13) + "2" + <eos> = 16;
# - chat pair: <bos> <|user|> H i <eos> <|assistant|> Y o <eos> = 9;
# - standard prompt "Hi": <bos> H i = 3;
# - chat prompt [user "Hi"] with the generation prompt: <bos> <|user|> H i <eos> <|assistant|> = 6.
LENGTH_CASES = {
    "standard-pair": ("paired", [GOOD_PAIR], 16, "field 'chosen': prompt + chosen is 16 tokens"),
    "chat-pair": (
        "paired",
        [{"prompt": [user("Hi")], "chosen": [assistant("Yo")], "rejected": [assistant("No")]}],
        9,
        "field 'chosen': prompt + chosen is 9 tokens",
    ),
    "chat-rejected-longer": (
        "paired",
        [{"prompt": [user("Hi")], "chosen": [assistant("Y")], "rejected": [assistant("No")]}],
        9,
        "field 'rejected': prompt + rejected is 9 tokens",
    ),
    "chat-implicit-pair": (
        "paired",
        [{"chosen": [user("Hi"), assistant("Yo")], "rejected": [user("Hi"), assistant("No")]}],
        9,
        "field 'chosen': prompt + chosen is 9 tokens",
    ),
    "chat-unpaired": (
        "unpaired",
        [{"prompt": [user("Hi")], "completion": [assistant("Yo")], "label": True}],
        9,
        "field 'completion': prompt + completion is 9 tokens",
    ),
    "standard-prompt": ("prompt", [{"prompt": "Hi"}], 3, "field 'prompt': the prompt is 3 tokens"),
    "chat-prompt": ("prompt", [{"prompt": [user("Hi")]}], 6, "field 'prompt': the prompt is 6 tokens"),
}


@pytest.mark.parametrize("case", LENGTH_CASES.values(), ids=LENGTH_CASES.keys())
def test_validation_max_length(tokenizer, case):
    layout, rows, num_tokens, what = case
    assert _validate(layout, rows, max_length=num_tokens, truncation=False, tokenizer=tokenizer) is None
    assert _validate(layout, rows, max_length=num_tokens - 1, truncation=True, tokenizer=tokenizer) is None
    with pytest.raises(DatasetFormatError) as error:
        _validate(layout, rows, max_length=num_tokens - 1, truncation=False, tokenizer=tokenizer)
    assert str(error.value) == f"row 0, {what}, longer than max_length={num_tokens - 1}, {LENGTH_ADVICE}"


def test_validation_argument_and_tokenizer_errors(tokenizer):
    with pytest.raises(ValueError) as error:
        data.validate_preference_dataset([GOOD_PAIR], max_length=8, truncation=False)
    assert (
        str(error.value) == "max_length=8 with truncation=False needs a tokenizer to measure the sequences; pass "
        "tokenizer=..."
    )
    no_template = build_tokenizer()
    no_template.chat_template = None
    with pytest.raises(DatasetFormatError) as error:
        data.validate_prompt_dataset([CONVERSATIONAL["prompt_only"]], tokenizer=no_template)
    assert str(error.value) == "row 0: the row is conversational but the tokenizer has no chat template"


def test_validation_max_rows_and_streams():
    rows = [GOOD_PAIR] * 3 + [{**GOOD_PAIR, "chosen": ""}]
    assert data.validate_preference_dataset(rows, max_rows=3) is None
    with pytest.raises(DatasetFormatError, match="^row 3, field 'chosen': is empty$"):
        data.validate_preference_dataset(IterableDataset.from_generator(lambda: iter(rows)))


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "chat"])
def test_validation_accepts_bundled_datasets(tokenizer, conversational):
    """The bundled task in every layout passes, also with a tight-but-sufficient length check (96 tokens)."""
    check = {"max_length": 96, "truncation": False, "tokenizer": tokenizer}
    pairs = preference_dataset(20, conversational=conversational)
    assert data.validate_preference_dataset(pairs.with_format("torch"), **check) is None
    assert data.validate_preference_dataset(DatasetDict(train=pairs), **check) is None
    assert data.validate_preference_dataset(pairs.map(trl_data.maybe_extract_prompt)) is None
    implicit = pairs.map(
        lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]},
        remove_columns=["prompt"],
    )
    assert data.validate_preference_dataset(implicit, **check) is None
    unpaired = unpaired_preference_dataset(20, conversational=conversational)
    assert data.validate_preference_dataset(unpaired, paired=False, **check) is None
    assert data.validate_preference_dataset(data.unpair_preference_dataset(pairs), paired=False, **check) is None
    assert data.validate_prompt_dataset(prompt_dataset(20, conversational=conversational), **check) is None


def test_check_prompt_dataset_is_the_online_trainers_check():
    """The online trainers' construction check: their layout errors in the trainer's terms first, then the rows
    through validate_prompt_dataset, its errors prefixed with the dataset's name (a dict names the entry)."""
    good = prompt_dataset(4)
    assert data.check_prompt_dataset(good, "train_dataset") is None
    assert data.check_prompt_dataset(None, "eval_dataset") is None
    assert data.check_prompt_dataset({"easy": good}, "eval_dataset") is None
    with pytest.raises(ValueError, match=r"^train_dataset needs a 'prompt' column \(TRL's prompt-only format\); it "
                                         r"has \['text'\]$"):
        data.check_prompt_dataset(Dataset.from_dict({"text": ["a"]}), "train_dataset")
    streamed = IterableDataset.from_generator(lambda: iter([{"prompt": "a"}]))
    with pytest.raises(ValueError, match=r"^train_dataset must be a datasets\.Dataset .*, got IterableDataset$"):
        data.check_prompt_dataset(streamed, "train_dataset")
    with pytest.raises(ValueError, match=r"^train_dataset has images: vision prompts are not supported"):
        data.check_prompt_dataset(Dataset.from_dict({"prompt": ["a"], "image": [None]}), "train_dataset")
    # GRPO, RLOO and online DPO take images with a vision-language model's processor (test_vision_online.py).
    assert data.check_prompt_dataset(Dataset.from_dict({"prompt": ["a"], "image": [None]}), "train_dataset",
                                     images_ok=True) is None
    hard = Dataset.from_dict({"prompt": ["Hi", ""]})
    with pytest.raises(DatasetFormatError, match=r"^eval_dataset\['hard'\]: row 1, field 'prompt': is empty$"):
        data.check_prompt_dataset(DatasetDict(easy=good, hard=hard), "eval_dataset")
