"""Named PEFT adapters: which adapter trains, which one is the reference, switching between them, and saving them.

TRL's old config names, on PEFT's API underneath:

- ``model_adapter_name``: the adapter trained (the others frozen), or a list of adapters trained together (joint
  mode, ``joint.py``); unset: the active adapter, as before.
- ``ref_adapter_name``: an adapter of the policy that is the reference: never trained, no ``ref`` copy is made;
  unset: the adapters disabled (the bare base) when ``model_adapter_name`` is set (TRL's old rule, and the one of
  joint mode); both unset: the frozen ``ref`` copy of a pretrained adapter, or the bare base, as before.

:func:`use_adapter` runs forwards with one adapter active (or none) and puts everything back on exit: PEFT's
``set_adapter`` and ``disable_adapter`` also flip ``requires_grad`` (enabling an adapter makes it trainable), so the
flags of every parameter are restored too, and they are restored right after the switch as well, so the forward
inside sees the trainability of the run (a compiled block then keeps its graph guards; only the adapter changes).

With either field set, checkpoints and ``save_model`` write each trained adapter to ``output_dir/<name>/`` (PEFT's
``adapter_config.json`` + ``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained(base, path)``),
and the reference adapter there too when ``sync_ref_model`` moves it; a resume loads them back in place (the
parameters keep their identity, so the optimizer state restored by Trainer still points at them).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

logger = logging.getLogger("fusedrl")

# The adapter that holds a frozen copy of a pretrained adapter when no reference is named (models.prepare_model).
REF_ADAPTER = "ref"


def peft_model_of(model: torch.nn.Module):
    """The ``PeftModel`` inside ``model`` (DDP / accelerate ``.module`` and ``torch.compile`` ``._orig_mod`` peeled
    off), or None when there is none."""
    from peft import PeftModel

    while not isinstance(model, PeftModel):
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, torch.nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return None
        model = inner
    return model


def adapter_names(model: torch.nn.Module) -> list[str]:
    """The adapters of ``model``, sorted (empty for a model without PEFT)."""
    peft_model = peft_model_of(model)
    return [] if peft_model is None else sorted(peft_model.peft_config)


def trained_adapter_names(args, model: torch.nn.Module | None = None) -> list[str]:
    """The adapters training updates: ``model_adapter_name`` as a list; unset, the active adapter of ``model`` when
    ``ref_adapter_name`` is set (the named layout then applies), else ``[]`` (today's layout)."""
    names = getattr(args, "model_adapter_name", None)
    if names is not None:
        return [names] if isinstance(names, str) else list(names)
    peft_model = None if model is None else peft_model_of(model)
    if getattr(args, "ref_adapter_name", None) is None or peft_model is None:
        return []
    return list(peft_model.active_adapters)


def saved_adapter_names(args, model: torch.nn.Module) -> list[str]:
    """What a checkpoint holds in the named layout: the trained adapters, plus the reference adapter when
    ``sync_ref_model`` moves it (a frozen one is rebuilt from the model the trainer was given)."""
    names = trained_adapter_names(args, model)
    if names and getattr(args, "sync_ref_model", False) and args.ref_adapter_name is not None:
        names.append(args.ref_adapter_name)
    return names


def check_adapter_names(model: torch.nn.Module, args) -> None:
    """Refuse ``model_adapter_name`` / ``ref_adapter_name`` that do not fit ``model``: a name it does not have, a
    reference adapter that is also trained, a name listed twice, a model without PEFT, a synced reference adapter
    with several trained adapters. Each message names the field and lists the model's adapters."""
    names, ref_name = args.model_adapter_name, args.ref_adapter_name
    if names is None and ref_name is None:
        return
    listed = [] if names is None else [names] if isinstance(names, str) else list(names)
    peft_model = peft_model_of(model)
    if peft_model is None:
        field = "model_adapter_name" if names is not None else "ref_adapter_name"
        raise ValueError(f"{field} is set but {type(model).__name__} is not a PEFT model (it has no adapters: []); "
                         "pass a PeftModel, or peft_config to create the trained adapter, or unset it")
    available = sorted(peft_model.peft_config)
    if len(set(listed)) != len(listed):
        raise ValueError(f"model_adapter_name lists an adapter twice: {listed}; the model's adapters: {available}")
    for name in listed:
        if name not in available:
            raise ValueError(f"model_adapter_name: {name!r} is not an adapter of the model; it has {available}")
    if ref_name is not None and ref_name not in available:
        raise ValueError(f"ref_adapter_name: {ref_name!r} is not an adapter of the model; it has {available}")
    if ref_name in listed:
        raise ValueError(f"ref_adapter_name={ref_name!r} is also trained (model_adapter_name={names!r}); the reference "
                         f"adapter is never updated: choose another of {available}")
    if len(listed) > 1 and ref_name is not None and getattr(args, "sync_ref_model", False):
        raise ValueError(f"sync_ref_model=True with ref_adapter_name={ref_name!r} and {len(listed)} trained adapters "
                         f"({listed}): it is undefined which one to sync into the reference; train one adapter (the model's "
                         f"adapters: {available})")


def select_trained_adapter(model: torch.nn.Module, args) -> None:
    """A single ``model_adapter_name`` becomes the active adapter, the only trainable one (PEFT's ``set_adapter``
    freezes every other adapter, the reference included). A list (joint mode) is left to ``joint.py``; unset leaves
    the model as it is, except that a named reference adapter is frozen."""
    peft_model = peft_model_of(model)
    names = args.model_adapter_name
    if isinstance(names, list) and len(names) == 1:
        names = names[0]
    if isinstance(names, str):
        peft_model.set_adapter(names)
    if args.ref_adapter_name is not None:
        peft_model.set_requires_grad(args.ref_adapter_name, requires_grad=False)


def create_adapters(model: torch.nn.Module, peft_config, names: str | list[str] | None):
    """``get_peft_model(model, peft_config)`` with the adapter(s) named by ``model_adapter_name`` (``default`` when
    unset). Each further adapter of a list starts from the random state the first one started from, so every adapter
    begins where a run training it alone (same seed and config) would."""
    from peft import get_peft_model

    if names is None:
        return get_peft_model(model, peft_config)
    names = [names] if isinstance(names, str) else list(names)
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    peft_model = get_peft_model(model, copy.deepcopy(peft_config), adapter_name=names[0])
    for name in names[1:]:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        peft_model.add_adapter(name, copy.deepcopy(peft_config))
    return peft_model


def reference_adapter(model: torch.nn.Module, args) -> str | None:
    """The adapter that plays the reference on the PEFT policy ``model``: ``ref_adapter_name``, else the ``ref`` copy
    when there is one; None means the adapters disabled (the base)."""
    if getattr(args, "ref_adapter_name", None) is not None:
        return args.ref_adapter_name
    peft_model = peft_model_of(model)
    return REF_ADAPTER if peft_model is not None and REF_ADAPTER in peft_model.peft_config else None


def _activate(peft_model, names: list[str]) -> None:
    if len(names) == 1:
        peft_model.set_adapter(names[0])
    else:  # several adapters active at once (LoRA adds them up): the tuner takes the list
        peft_model.base_model.set_adapter(names)


@contextlib.contextmanager
def use_adapter(model: torch.nn.Module, name: str | None) -> Iterator[None]:
    """Run ``model``'s forwards with adapter ``name`` active, or with every adapter disabled (the bare base) for
    None; on exit (also after an exception) the previously active adapter(s) and every parameter's
    ``requires_grad`` are back. Trainability never changes inside either: gradients of a forward run here reach
    the parameters that were trainable before.

    ``model``: a ``PeftModel``, possibly wrapped by DDP / accelerate (``.module``) or ``torch.compile``. Works with
    compiled blocks (the switch is a guarded module attribute: the first forward per adapter compiles a graph) and
    with gradient checkpointing; with checkpointing, run the backward of a forward made here inside the block too,
    since the backward recomputes it with whatever adapter is active then. A joint-mode policy (an attribute
    ``fusedrl_router``, ``routing.py``) switches through its router instead.
    """
    peft_model = peft_model_of(model)
    if peft_model is None:
        raise ValueError(f"use_adapter needs a PEFT model; {type(model).__name__} has no adapters ([])")
    router = getattr(peft_model, "fusedrl_router", None)
    if router is not None:
        with router.use(name):
            yield
        return
    if name is not None and name not in peft_model.peft_config:
        raise ValueError(f"use_adapter: {name!r} is not an adapter of the model; it has {sorted(peft_model.peft_config)}")
    flags = [(param, param.requires_grad) for param in peft_model.parameters()]

    def restore_flags() -> None:
        for param, flag in flags:
            param.requires_grad_(flag)

    previous, previous_attribute = list(peft_model.active_adapters), peft_model.active_adapter
    try:
        with peft_model.disable_adapter() if name is None else contextlib.nullcontext():
            if name is not None:
                _activate(peft_model, [name])
            restore_flags()
            try:
                yield
            finally:
                if name is not None:
                    _activate(peft_model, previous)
                    peft_model.active_adapter = previous_attribute
    finally:
        restore_flags()


# --- checkpoints -----------------------------------------------------------------------------------------------------


def save_adapters(model: torch.nn.Module, output_dir: str, names: list[str], *, state_dict=None,
                  is_main: bool = True) -> None:
    """Write each adapter of ``names`` to ``output_dir/<name>/`` (PEFT's files). ``state_dict``: the gathered
    state of the whole model under FSDP / DeepSpeed, as Trainer hands it over."""
    peft_model = peft_model_of(model)
    for name in names:
        # PEFT writes a non-default adapter to <save_directory>/<name> and the `default` one to save_directory
        # itself; both end up in output_dir/<name>.
        directory = os.path.join(output_dir, name) if name == "default" else output_dir
        peft_model.save_pretrained(directory, selected_adapters=[name], state_dict=state_dict,
                                   is_main_process=is_main)


def load_adapters(model: torch.nn.Module, checkpoint_dir: str, names: list[str]) -> None:
    """Copy the weights in ``checkpoint_dir/<name>/`` into adapter ``name`` of ``model``, in place, for each name;
    a missing directory or a weight that does not fit the adapter fails naming both."""
    from peft import load_peft_weights, set_peft_model_state_dict

    peft_model = peft_model_of(model)
    for name in names:
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isdir(path):
            raise ValueError(f"{checkpoint_dir} has no directory {name!r} for adapter {name!r}; it was not saved with "
                             f"this model_adapter_name / ref_adapter_name (it holds {sorted(os.listdir(checkpoint_dir))})")
        result = set_peft_model_state_dict(peft_model, load_peft_weights(path, device="cpu"), adapter_name=name)
        missing = [key for key in result.missing_keys if name in key.split(".")]
        if result.unexpected_keys or missing:
            raise ValueError(f"{path} does not fit adapter {name!r}: unexpected {result.unexpected_keys[:3]}, "
                             f"missing {missing[:3]}")


class NamedAdapterTrainer(Trainer):
    """The ``transformers.Trainer`` layer that saves and restores named adapters (module docstring); with neither
    field set it is Trainer itself. Also builds TR-DPO's sync callback, into a reference adapter when one is named."""

    def _named_adapters(self, model: torch.nn.Module | None) -> tuple[object, list[str]]:
        peft_model = peft_model_of(self.accelerator.unwrap_model(self.model if model is None else model))
        return peft_model, [] if peft_model is None else saved_adapter_names(self.args, peft_model)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        peft_model, names = self._named_adapters(None)
        if not names:
            return super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:  # a gathered state_dict was collected before: nothing collective is left
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapters(peft_model, output_dir, names, state_dict=state_dict)
        # The rest of Trainer._save: the tokenizer and the training arguments.
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        peft_model, names = self._named_adapters(model)
        if not names:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters(peft_model, resume_from_checkpoint, names)
        logger.info("fusedrl: adapters %s restored from %s", names, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        peft_model, names = self._named_adapters(None)
        if not names:
            return super()._load_best_model()
        load_adapters(peft_model, self.state.best_model_checkpoint, names)

    def reference_sync_callback(self):
        """TR-DPO's callback for ``sync_ref_model``: into the reference adapter (``ref_adapter_name``) from the
        trained one when the reference is an adapter, else into ``self.ref_model``."""
        # Imported here: the callbacks package imports models.py, which imports this module.
        from fusedrl.trainers.callbacks.sync_ref import SyncRefModelCallback

        if getattr(self, "ref_model", None) is None and self.args.ref_adapter_name is not None:
            trained = trained_adapter_names(self.args, self.model)
            return SyncRefModelCallback(self.args.ref_adapter_name, self.accelerator,
                                        policy_adapter=trained[0] if trained else None)
        return SyncRefModelCallback(self.ref_model, self.accelerator)
