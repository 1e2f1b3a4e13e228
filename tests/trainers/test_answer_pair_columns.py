"""ORPO/CPO datasets carry trl.experimental 1.16's tokenized columns, with TRL's values, and take data TRL tokenized.

- the tokenized train set has TRL's column names and, row by row, TRL's token ids for every one of them (decoder-only:
  standard, conversational, answers cut by ``max_length``; encoder-decoder: T5, answers cut by
  ``max_completion_length``), read from a TRL trainer built on the same data;
- TRL's ``test_init_with_eval_dataset`` scenario: an eval ``Dataset`` or ``DatasetDict`` is tokenized at
  construction, each split into TRL's columns;
- a dataset already tokenized in TRL's format (TRL's own ``train_dataset``, with or without its text columns) is
  used as it is and trains to the same first-step loss and gradients as the text it came from;
- bad pre-tokenized rows fail with the field named.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset, DatasetDict

import fusedrl.trainers as fused
from fusedrl.cli.presets.tokenizer import build_tokenizer
from fusedrl.trainers.preference.answer_pairs import (
    ANSWER_PAIR_COLUMNS,
    ENCODER_DECODER_COLUMNS,
    AnswerPairCollator,
)
from tests.helpers.data import EVAL_PAIRS, conversational_pairs, standard_pairs
from tests.helpers.models import tiny_t5
from tests.helpers.parity import base_settings, first_step
from tests.utils import assert_close

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning: the peer is only compared against
    from trl.experimental import cpo as trl_cpo
    from trl.experimental import orpo as trl_orpo

PEERS = {"ORPO": (trl_orpo, fused), "CPO": (trl_cpo, fused)}


def make_trainer(module, method: str, model, output_dir, *, train=None, eval_dataset=None, **overrides):
    trainer_cls, config_cls = getattr(module, f"{method}Trainer"), getattr(module, f"{method}Config")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer_cls(model=model, args=config_cls(**base_settings(output_dir, **overrides)),
                           train_dataset=standard_pairs() if train is None else train, eval_dataset=eval_dataset,
                           processing_class=build_tokenizer())


def _rows(dataset, columns) -> list[dict]:
    return [{column: list(row[column]) for column in columns} for row in dataset]


# (method, encoder-decoder?, train data factory, config overrides)
TOKENIZATION_CASES = {
    "orpo-standard": ("ORPO", False, standard_pairs, {}),
    "orpo-conversational": ("ORPO", False, conversational_pairs, {}),
    "cpo-answers-cut-26": ("CPO", False, standard_pairs, {"max_length": 26}),
    "orpo-t5": ("ORPO", True, standard_pairs, {}),
    "cpo-t5-answers-cut-5": ("CPO", True, standard_pairs, {"max_completion_length": 5}),
}


@pytest.mark.parametrize("name", sorted(TOKENIZATION_CASES))
def test_columns_and_ids_match_trl(name, model_dir, tmp_path):
    method, encoder_decoder, make_data, overrides = TOKENIZATION_CASES[name]
    columns = ENCODER_DECODER_COLUMNS if encoder_decoder else ANSWER_PAIR_COLUMNS
    datasets = []
    for module in PEERS[method]:
        model = tiny_t5() if encoder_decoder else model_dir
        trainer = make_trainer(module, method, model, tmp_path / module.__name__, train=make_data(), **overrides)
        datasets.append(trainer.train_dataset)
    theirs, ours = datasets
    assert set(columns) <= set(theirs.column_names)
    assert set(theirs.column_names) - {"prompt", "chosen", "rejected"} == set(columns)
    assert set(columns) <= set(ours.column_names)
    assert _rows(ours, columns) == _rows(theirs, columns)


@pytest.mark.parametrize("method", sorted(PEERS))
@pytest.mark.parametrize("kind", ["dataset", "dataset_dict"])
def test_eval_splits_are_tokenized(method, kind, model_dir, tmp_path):
    """TRL's test_init_with_eval_dataset: each eval split is tokenized at construction, into TRL's columns."""
    split = Dataset.from_dict(EVAL_PAIRS)
    eval_dataset = split if kind == "dataset" else DatasetDict({"data1": split, "data2": split})
    trainer = make_trainer(fused, method, model_dir, tmp_path, eval_dataset=eval_dataset)
    splits = [trainer.eval_dataset] if kind == "dataset" else [trainer.eval_dataset[k] for k in ("data1", "data2")]
    assert kind == "dataset" or set(trainer.eval_dataset) == {"data1", "data2"}
    for tokenized in splits:
        assert set(ANSWER_PAIR_COLUMNS) <= set(next(iter(tokenized)))


@pytest.mark.parametrize("keep_text", [True, False], ids=["with-text", "tokens-only"])
@pytest.mark.parametrize("encoder_decoder", [False, True], ids=["decoder-only", "t5"])
def test_trl_tokenized_data_trains_like_text(encoder_decoder, keep_text, model_dir, tmp_path):
    def model():
        return tiny_t5() if encoder_decoder else model_dir

    pretokenized = make_trainer(trl_orpo, "ORPO", model(), tmp_path / "trl").train_dataset
    if not keep_text:
        pretokenized = pretokenized.remove_columns(["prompt", "chosen", "rejected"])
    from_tokens = make_trainer(fused, "ORPO", model(), tmp_path / "tokens", train=pretokenized)
    assert from_tokens.train_dataset is pretokenized  # taken as it is, not tokenized again
    from_text = make_trainer(fused, "ORPO", model(), tmp_path / "text")
    loss, grads = first_step(from_tokens)
    expected_loss, expected_grads = first_step(from_text)
    assert_close(loss, expected_loss, name="loss")
    assert grads.keys() == expected_grads.keys()
    for key, grad in grads.items():
        assert_close(grad, expected_grads[key], name=key)


def test_encoder_decoder_refuses_decoder_only_tokens(model_dir, tmp_path):
    decoder_only = make_trainer(fused, "ORPO", model_dir, tmp_path / "dec").train_dataset
    with pytest.raises(ValueError, match="tokenized for a decoder-only model"):
        make_trainer(fused, "ORPO", tiny_t5(), tmp_path / "t5", train=decoder_only)


BAD_ROWS = {
    "length-mismatch": ({"chosen_labels": [-100, 9]}, r"field 'chosen_labels': .* one entry per token"),
    "label-not-token": ({"rejected_labels": [-100, -100, 7]}, r"field 'rejected_labels': each label must be"),
}


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_bad_pretokenized_rows_name_the_field(name):
    row = {"prompt_input_ids": [1, 5], "prompt_attention_mask": [1, 1]}
    for side in ("chosen", "rejected"):
        row.update({f"{side}_input_ids": [1, 5, 9], f"{side}_attention_mask": [1, 1, 1],
                    f"{side}_labels": [-100, -100, 9]})
    change, message = BAD_ROWS[name]
    with pytest.raises(ValueError, match=message):
        AnswerPairCollator(pad_token_id=0)([{**row, **change}])


def test_collator_reads_trl_columns():
    """Two pairs -> 4 rows [chosen; rejected], right-padded; the completion mask is labels != -100."""
    rows = [{"chosen_input_ids": [1, 5, 9], "chosen_attention_mask": [1, 1, 1], "chosen_labels": [-100, 5, 9],
             "rejected_input_ids": [1, 5, 8, 8], "rejected_attention_mask": [1, 1, 1, 1],
             "rejected_labels": [-100, -100, 8, 8]},
            {"chosen_input_ids": [1, 7], "chosen_attention_mask": [1, 1], "chosen_labels": [-100, 7],
             "rejected_input_ids": [1, 6], "rejected_attention_mask": [1, 1], "rejected_labels": [-100, 6]}]
    batch = AnswerPairCollator(pad_token_id=3)(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 9, 3], [1, 7, 3, 3], [1, 5, 8, 8], [1, 6, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())
