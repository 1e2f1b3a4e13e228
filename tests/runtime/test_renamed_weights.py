"""Trainer's resume of a model that transformers saves under its original checkpoint names (LLaVA built from a
config): ``restore_renamed_weights`` loads every renamed tensor under the model's own name; a model saved under its
own names (Llama) has nothing to restore."""

from __future__ import annotations

import safetensors
import torch

from fusedrl.runtime.renamed_weights import restore_renamed_weights, saved_names
from tests.helpers.models import tiny_llama
from tests.helpers.vision import tiny_vlm


def test_renamed_tensors_load_under_the_model_names(tmp_path):
    saved, _ = tiny_vlm("llava", seed=0)
    saved.save_pretrained(tmp_path)
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    model, _ = tiny_vlm("llava", seed=1)
    renames = saved_names(model)
    assert renames and set(renames) <= keys and not keys & set(model.state_dict())  # every tensor is renamed
    before = model.load_state_dict(safetensors.torch.load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert before.unexpected_keys  # what Trainer's resume does: nothing matches
    assert restore_renamed_weights(model, str(tmp_path)) == len(keys)
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), saved.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name


def test_a_model_saved_under_its_own_names_has_nothing_to_restore(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    assert restore_renamed_weights(tiny_llama(), str(tmp_path)) == 0
