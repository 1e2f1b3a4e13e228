"""Resuming a model that transformers saved under its original checkpoint names.

transformers 5 saves some models under the names of the checkpoints they were converted from (``save_pretrained``'s
``save_original_format=True``, its default: a LLaVA built from a config writes ``language_model.model.layers.0...``
for its own ``model.language_model.layers.0...``) and maps those names back in ``from_pretrained`` only. Trainer's
resume loads the checkpoint file with ``load_state_dict(strict=False)``, which matches none of the renamed tensors and
only warns, so a resumed run silently continued from the initial weights (seen on the tiny LLaVA: every LLaVA tensor
renamed, the step after the resume logged a KL of 0 against the uninterrupted run's 0.0020).
:func:`restore_renamed_weights` loads them under the model's own names, through the same renaming reversed.
"""

from __future__ import annotations

import json
import os

import safetensors
import torch
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


def saved_names(model: PreTrainedModel) -> dict[str, str]:
    """``{name in a saved file: the model's state-dict name}`` for every tensor ``save_pretrained`` renames. A tensor
    is followed by identity through the reverted conversion; tensors it converts (e.g. experts fused into one) are
    not renames and stay out."""
    state = model.state_dict()
    owner = {id(tensor): name for name, tensor in state.items()}
    reverted = revert_weight_conversion(model, dict(state))
    return {saved: owner[id(tensor)] for saved, tensor in reverted.items()
            if id(tensor) in owner and saved != owner[id(tensor)]}


def _weight_files(checkpoint_dir: str) -> list[str]:
    index = os.path.join(checkpoint_dir, _INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        return [os.path.join(checkpoint_dir, shard) for shard in shards]
    single = os.path.join(checkpoint_dir, _SINGLE_FILE)
    return [single] if os.path.isfile(single) else []


@torch.no_grad()
def restore_renamed_weights(model: torch.nn.Module, checkpoint_dir: str) -> int:
    """Load the tensors of ``checkpoint_dir`` that are saved under renamed keys into ``model`` (a whole, unwrapped
    ``PreTrainedModel``); returns how many. Nothing to do (0) for models saved under their own names."""
    if not isinstance(model, PreTrainedModel):
        return 0
    files = _weight_files(checkpoint_dir)
    names = saved_names(model) if files else {}
    restored = {}
    for path in files:
        with safetensors.safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                if key in names:
                    restored[names[key]] = handle.get_tensor(key)
    if restored:
        model.load_state_dict(restored, strict=False)
    return len(restored)
