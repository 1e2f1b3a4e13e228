"""Embedded presets: tokenizer, chat template, arithmetic datasets and Llama model presets (all built in code)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusedrl.cli import presets
from fusedrl.cli.presets import (
    ARITHMETIC,
    DATASET_PRESETS,
    MODEL_PRESETS,
    ArithmeticTask,
    answer_reward,
    build_model,
    build_tokenizer,
    load_preset_dataset,
    load_preset_model,
    preference_dataset,
    prompt_dataset,
    unpaired_preference_dataset,
)
from fusedrl.cli.presets.tokenizer import CHARACTERS, SPECIAL_TOKENS

MESSAGES = [
    {"role": "system", "content": "Be exact."},
    {"role": "user", "content": "13+18="},
    {"role": "assistant", "content": "31"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _solve(prompt: str) -> int:
    a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt).groups()
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def _text(value) -> str:
    return value[-1]["content"] if isinstance(value, list) else value


# --- tokenizer -------------------------------------------------------------------------------------------------------


def test_tokenizer_is_deterministic(tokenizer):
    assert build_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_ids_and_special_tokens(tokenizer):
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(CHARACTERS) == 103
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.padding_side == "right"
    ids = tokenizer("13+18=31" + tokenizer.eos_token)["input_ids"]
    # <bos>, one id per character, and the literal "<eos>" text becomes the eos id.
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 10
    assert tokenizer("é")["input_ids"] == [tokenizer.bos_token_id, tokenizer.unk_token_id]


def test_tokenizer_round_trips_every_character(tokenizer):
    text = "".join(CHARACTERS)
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Ids of the padded model vocabulary (above len(tokenizer)) decode to nothing rather than raising.
    assert tokenizer.decode([ids[1], 31_999, ids[2]]) == text[:2]


def test_tokenizer_save_pretrained_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "13+18=\n31<eos>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.padding_side == tokenizer.padding_side
    assert loaded.all_special_ids == tokenizer.all_special_ids
    assert loaded.apply_chat_template(MESSAGES)["input_ids"] == tokenizer.apply_chat_template(MESSAGES)["input_ids"]


def test_chat_template_rendering(tokenizer):
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered == "<bos><|system|>Be exact.<eos><|user|>13+18=<eos><|assistant|>31<eos>"
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><|system|>Be exact.<eos><|user|>13+18=<eos><|assistant|>"
    with pytest.raises(Exception, match="Unsupported role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_template_prompt_is_token_prefix_and_assistant_mask(tokenizer):
    """TRL splits prompt from completion where the two tokenizations diverge: the prompt must be an exact prefix."""
    prompt_ids = tokenizer.apply_chat_template(MESSAGES[:2], add_generation_prompt=True)["input_ids"]
    full = tokenizer.apply_chat_template(MESSAGES, return_assistant_tokens_mask=True, return_dict=True)
    assert full["input_ids"][: len(prompt_ids)] == prompt_ids
    # The mask covers the assistant's "31" and its <eos>: the tokens an SFT assistant-only loss trains.
    assert full["assistant_masks"] == [0] * len(prompt_ids) + [1, 1, 1]
    plain_prompt = tokenizer("13+18=")["input_ids"]
    assert tokenizer("13+18=31<eos>")["input_ids"][: len(plain_prompt)] == plain_prompt


# --- datasets --------------------------------------------------------------------------------------------------------


def test_splits_partition_the_problems():
    train, test = set(ARITHMETIC.problems("train")), set(ARITHMETIC.problems("test"))
    assert not train & test
    # 20 * 20 additions + 20 * 21 / 2 subtractions with a >= b.
    assert len(train | test) == 400 + 210
    assert 0.05 < len(test) / (len(train) + len(test)) < 0.15


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_preference_dataset_format_and_labels(conversational):
    data = preference_dataset(300, seed=3, conversational=conversational)
    assert data.column_names == ["prompt", "chosen", "rejected"]
    for row in data:
        if conversational:
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
        answer = _solve(_text(row["prompt"]))
        assert _text(row["chosen"]) == str(answer)
        assert _text(row["rejected"]).isdigit() and int(_text(row["rejected"])) != answer


def test_datasets_are_deterministic_per_seed():
    assert preference_dataset(64, seed=5).to_dict() == preference_dataset(64, seed=5).to_dict()
    assert preference_dataset(64, seed=5).to_dict() != preference_dataset(64, seed=6).to_dict()
    assert prompt_dataset(64, seed=5).to_dict() == prompt_dataset(64, seed=5).to_dict()


def test_train_and_test_datasets_do_not_overlap():
    train = set(load_preset_dataset("arithmetic", "train", n=2000)["prompt"])
    test = set(load_preset_dataset("arithmetic", "test", n=500)["prompt"])
    assert not train & test
    # A draw of the split's size covers every problem once before repeating any.
    assert len(set(prompt_dataset(len(ARITHMETIC.problems("test")), split="test")["prompt"])) == len(
        ARITHMETIC.problems("test")
    )


@pytest.mark.parametrize(
    "mistake, prompt, expected",
    [
        ("off_by_one", "17+5=", {21, 23}),
        ("off_by_ten", "17+5=", {12, 32}),
        ("wrong_op", "17+5=", {12}),
        ("no_carry", "17+5=", {12}),  # 7+5 = 12, keep the 2, drop the carry: 1|2 -> 12
        ("no_carry", "13-5=", {18}),  # 3-5 borrows; digit-wise (3-5) mod 10 = 8 and 1-0 = 1 -> 18
        ("swapped_digits", "17+6=", {32}),
        ("swapped_digits", "17+5=", {23}),  # 22 swaps to itself: no usable mistake, so the fallback answer+1
    ],
)
def test_mistake_kinds(mistake, prompt, expected):
    task = ArithmeticTask(mistakes=(mistake,), test_fraction=0.0)
    rejected = {
        int(row["rejected"])
        for row in preference_dataset(len(task.problems("train")), seed=0, task=task)
        if row["prompt"] == prompt
    }
    assert rejected <= expected and rejected


def test_unpaired_dataset_labels():
    data = unpaired_preference_dataset(101, seed=2)
    assert data.column_names == ["prompt", "completion", "label"] and len(data) == 101
    for row in data:
        assert (row["completion"] == str(_solve(row["prompt"]))) == row["label"]
    assert data["label"][:4] == [True, False, True, False]


def test_prompt_dataset_and_answer_reward():
    data = prompt_dataset(20, seed=1, conversational=True)
    assert data.column_names == ["prompt", "answer"]
    assert all(_solve(row["prompt"][0]["content"]) == int(row["answer"]) for row in data)
    completions = [
        "31",
        " 31\n",
        "3 1",
        [{"role": "assistant", "content": "31"}],
        [{"role": "assistant", "content": "30"}],
    ]
    assert answer_reward(completions, answer=["31"] * 5, prompts=None) == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_dataset_registry_rejects_unknown_names():
    assert set(DATASET_PRESETS) == {"arithmetic", "arithmetic-hard"}
    with pytest.raises(ValueError, match="unknown dataset preset"):
        load_preset_dataset("gsm8k")
    with pytest.raises(ValueError, match="unknown dataset kind"):
        load_preset_dataset("arithmetic", kind="sft")
    with pytest.raises(ValueError, match="unknown split"):
        load_preset_dataset("arithmetic", "validation")
    with pytest.raises(ValueError, match="mistakes"):
        ArithmeticTask(mistakes=("typo",))
    with pytest.raises(ValueError, match="no problems"):
        preference_dataset(1, split="test", task=ArithmeticTask(test_fraction=0.0))


# --- models ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, hidden, layers, heads, vocab",
    [("tiny", 64, 2, 4, 128), ("demo", 128, 4, 4, 128), ("bench-head", 256, 4, 4, 32000)],
)
def test_model_preset_shapes(tokenizer, name, hidden, layers, heads, vocab):
    model = build_model(name, tokenizer, seed=0)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (hidden, layers, heads)
    assert model.lm_head.weight.shape == model.model.embed_tokens.weight.shape == (vocab, hidden)
    assert vocab >= len(tokenizer)
    assert not config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    batch = tokenizer(["13+18=31", "2-1=1"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], vocab) and torch.isfinite(logits).all()


def test_build_model_is_deterministic_per_seed(tokenizer):
    rng_before = torch.random.get_rng_state()
    first, again, other = (build_model("tiny", tokenizer, seed=s) for s in (7, 7, 8))
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    for (key, a), b, c in zip(first.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), key
        if key.endswith("proj.weight"):
            assert not torch.equal(a, c), key


def test_model_save_pretrained_round_trip(tokenizer, tmp_path):
    model = load_preset_model("tiny", seed=3, tokenizer=tokenizer)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key


def test_model_registry_errors(tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("gpt2", tokenizer)
    monkeypatch.setitem(MODEL_PRESETS, "too-small", presets.ModelPreset(64, 1, 4, 4, 128, vocab_size=64))
    with pytest.raises(ValueError, match="below the tokenizer"):
        build_model("too-small", tokenizer)
