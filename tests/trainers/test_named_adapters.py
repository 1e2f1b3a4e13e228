"""Named adapters (``model_adapter_name`` / ``ref_adapter_name``, ``fusedrl.use_adapter``, ``null_ref_context``):
validation, switching, the reference of the preference trainers, TR-DPO syncing into a reference adapter, and the
callbacks. Saving, resume and the online trainers: tests/trainers/test_named_adapters_training.py.

The model: tests/helpers/models.tiny_llama (seed 0) with LoRA adapters ``policy`` (trained) and ``anchor`` (the
reference), each with its own random ``lora_B`` (tests/helpers/adapters.py), so base, policy and anchor all differ.
"""

from __future__ import annotations

import re
import types
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import GenerationConfig, HfArgumentParser

import fusedrl
from fusedrl.cli.presets.tokenizer import build_tokenizer
from fusedrl.runtime.compile import compile_blocks
from fusedrl.trainers import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, ORPOConfig, ORPOTrainer
from fusedrl.trainers.adapters import check_adapter_names
from fusedrl.trainers.adapters.named import create_adapters
from fusedrl.trainers.callbacks import LogCompletionsCallback, WinRateCallback
from fusedrl.trainers.callbacks.generation import EvalPrompts, generate_eval_completions
from fusedrl.trainers.online.judges import TIE
from tests.helpers.adapters import adapter_copy, adapter_state, named_adapter_model
from tests.helpers.data import CHOSEN, EVAL_PAIRS, LORA, PROMPTS, standard_pairs
from tests.helpers.models import tiny_llama
from tests.helpers.parity import base_settings, first_step, train_logs
from tests.utils import assert_close

ADAPTERS = re.escape("['anchor', 'policy']")  # how the messages list the model's adapters
GREEDY_3 = GenerationConfig(max_new_tokens=3, do_sample=False)
TOKENIZER = build_tokenizer()


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids(), **kwargs).logits


def _flags(model) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in model.named_parameters()}


def _trainer(kind: str, model, tmp_path, **overrides):
    cls, config_cls, data = {
        "dpo": (DPOTrainer, DPOConfig, standard_pairs()),
        "kto": (KTOTrainer, KTOConfig, Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN,
                                                          "label": [True, False] * 4})),
        "orpo": (ORPOTrainer, ORPOConfig, standard_pairs()),
    }[kind]
    eval_dataset, peft_config = overrides.pop("eval_dataset", None), overrides.pop("peft_config", None)
    ref_model = overrides.pop("ref_model", None)
    extra = {} if kind == "orpo" else {"ref_model": ref_model}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=model, args=config_cls(**base_settings(tmp_path, **overrides)), train_dataset=data,
                   eval_dataset=eval_dataset, processing_class=TOKENIZER, peft_config=peft_config, **extra)


# --- config and validation -----------------------------------------------------------------------------------------


def _args(**fields):
    return types.SimpleNamespace(**{"model_adapter_name": None, "ref_adapter_name": None, "sync_ref_model": False,
                                    **fields})


@pytest.mark.parametrize("fields, match", [
    ({"model_adapter_name": "nope"}, "model_adapter_name: 'nope' is not an adapter"),
    ({"model_adapter_name": ["policy", "nope"]}, "model_adapter_name: 'nope' is not an adapter"),
    ({"ref_adapter_name": "nope"}, "ref_adapter_name: 'nope' is not an adapter"),
    ({"model_adapter_name": ["policy", "anchor"], "ref_adapter_name": "anchor"}, "ref_adapter_name='anchor' is also"),
    ({"model_adapter_name": ["policy", "policy"]}, "model_adapter_name lists an adapter twice"),
    ({"model_adapter_name": ["policy", "anchor"], "ref_adapter_name": "extra", "sync_ref_model": True},
     "sync_ref_model=True"),
], ids=["unknown", "unknown-in-list", "unknown-ref", "ref-also-trained", "duplicate", "sync-into-several"])
def test_check_adapter_names_refuses(fields, match):
    model = named_adapter_model(tiny_llama(0), ("policy", "anchor", "extra"))
    with pytest.raises(ValueError, match=match) as error:
        check_adapter_names(model, _args(**fields))
    assert "['anchor', 'extra', 'policy']" in str(error.value)


@pytest.mark.parametrize("field", ["model_adapter_name", "ref_adapter_name"])
def test_names_on_a_model_without_peft_are_refused(field, tmp_path):
    with pytest.raises(ValueError, match=rf"{field} is set but LlamaForCausalLM is not a PEFT model .*\[\]"):
        check_adapter_names(tiny_llama(0), _args(**{field: "policy"}))
    with pytest.raises(ValueError, match=f"{field} is set"):
        _trainer("dpo", tiny_llama(0), tmp_path, **{field: "policy"})


def test_config_fields():
    def config(**fields):
        return DPOConfig("out", bf16=False, **fields)

    assert config(model_adapter_name="a,b").model_adapter_name == ["a", "b"]  # the command line's list
    assert config(model_adapter_name="a").model_adapter_name == "a"
    for fields, match in [({"model_adapter_name": ["a", "a"]}, "twice"),
                          ({"model_adapter_name": "a", "ref_adapter_name": "a"}, "is also in model_adapter_name"),
                          ({"model_adapter_name": []}, "model_adapter_name must be"),
                          ({"ref_adapter_name": ""}, "ref_adapter_name must be")]:
        with pytest.raises(ValueError, match=match):
            config(**fields)
    (config,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(
        ["--output_dir", "out", "--bf16", "False", "--model_adapter_name", "policy", "--ref_adapter_name", "anchor"])
    assert (config.model_adapter_name, config.ref_adapter_name) == ("policy", "anchor")


def test_trainer_refusals(tmp_path):
    model = named_adapter_model(tiny_llama(0))
    with pytest.raises(ValueError, match=rf"model_adapter_name: 'nope' is not an adapter of the model; it has {ADAPTERS}"):
        _trainer("dpo", model, tmp_path, model_adapter_name="nope")
    with pytest.raises(ValueError, match="both ref_model and ref_adapter_name"):
        _trainer("dpo", model, tmp_path, ref_adapter_name="anchor", ref_model=tiny_llama(0))
    with pytest.raises(ValueError, match="ref_adapter_name='anchor' but this trainer uses no reference"):
        _trainer("orpo", model, tmp_path, ref_adapter_name="anchor")


def test_single_name_is_the_trained_adapter(tmp_path):
    """The named adapter becomes active and the only trainable one; without ref_adapter_name the reference is the
    base with adapters disabled (TRL's old null_ref_context, and the reference of several adapters trained together,
    so a joint run equals its separate runs): no ``ref`` copy is made; with it, no copy is made either."""
    model = named_adapter_model(tiny_llama(0))
    model.set_adapter("anchor")
    trainer = _trainer("dpo", model, tmp_path, model_adapter_name="policy")
    assert trainer.model.active_adapter == "policy"
    assert {name for name, flag in _flags(trainer.model).items() if flag} == set(adapter_state(model, "policy"))
    assert "ref" not in trainer.model.peft_config
    input_ids = torch.tensor([[4, 9, 13, 20]])
    with torch.no_grad(), trainer.reference_context() as reference:
        reference_logits = reference(input_ids=input_ids).logits
    with torch.no_grad(), trainer.model.disable_adapter():
        torch.testing.assert_close(reference_logits, trainer.model(input_ids=input_ids).logits, rtol=0, atol=0)
    trainer = _trainer("dpo", named_adapter_model(tiny_llama(0)), tmp_path, model_adapter_name="policy",
                       ref_adapter_name="anchor")
    assert sorted(trainer.model.peft_config) == ["anchor", "policy"]


def test_peft_config_creates_the_named_adapters():
    """With peft_config, the named adapters are created; each adapter of a list starts from the random state the
    first did, so each begins as a run creating it alone (with the same seed) would."""
    def create(names):
        torch.manual_seed(3)
        return create_adapters(tiny_llama(0), LoraConfig(**LORA), names)

    alone = adapter_state(create("a"), "a")
    joint = create(["a", "b"])
    assert sorted(joint.peft_config) == ["a", "b"]
    for name, value in alone.items():
        assert torch.equal(joint.get_parameter(name), value)
        assert torch.equal(joint.get_parameter(name.replace(".a.", ".b.")), value)


# --- use_adapter -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["anchor", "policy", None], ids=["anchor", "active", "base"])
def test_use_adapter_runs_the_named_adapter_and_restores(name):
    model = named_adapter_model(tiny_llama(0))
    flags = _flags(model)
    with fusedrl.use_adapter(model, name):
        assert _flags(model) == flags  # trainability never changes inside
        inside = _logits(model)
    assert torch.equal(inside, _logits(adapter_copy(model, name)))
    assert model.active_adapter == "policy" and _flags(model) == flags
    assert torch.equal(_logits(model), _logits(adapter_copy(model, "policy")))


@pytest.mark.parametrize("name", ["anchor", None], ids=["anchor", "base"])
def test_use_adapter_restores_after_an_exception(name):
    """A flag layout PEFT would not produce (the active adapter half frozen, the other half trainable) survives."""
    model = named_adapter_model(tiny_llama(0))
    for key, param in model.named_parameters():
        if "lora_A.policy" in key or "lora_B.anchor" in key:
            param.requires_grad_(not param.requires_grad)
    flags = _flags(model)
    with pytest.raises(RuntimeError, match="inside"), fusedrl.use_adapter(model, name):
        raise RuntimeError("inside")
    assert model.active_adapter == "policy" and _flags(model) == flags
    assert torch.equal(_logits(model), _logits(adapter_copy(model, "policy")))


def test_use_adapter_refusals_wrappers_and_router():
    model = named_adapter_model(tiny_llama(0))
    with pytest.raises(ValueError, match=rf"'nope' is not an adapter of the model; it has {ADAPTERS}"), \
            fusedrl.use_adapter(model, "nope"):
        pass
    with pytest.raises(ValueError, match=r"use_adapter needs a PEFT model; LlamaForCausalLM has no adapters"), \
            fusedrl.use_adapter(tiny_llama(0), None):
        pass

    wrapper = torch.nn.Module()
    wrapper.module = model  # as DDP and accelerate wrap a model
    with fusedrl.use_adapter(wrapper, "anchor"):
        assert torch.equal(_logits(wrapper.module), _logits(adapter_copy(model, "anchor")))
    assert model.active_adapter == "policy"

    class Router:  # joint mode's router (trainers/adapters/routing.py) takes the switch over
        def __init__(self):
            self.calls = []

        def use(self, name):
            self.calls.append(name)
            return torch.no_grad()

    model.fusedrl_router = router = Router()
    with fusedrl.use_adapter(wrapper, "anchor"), fusedrl.use_adapter(model, None):
        pass
    assert router.calls == ["anchor", None] and model.active_adapter == "policy"


def test_use_adapter_under_gradient_checkpointing():
    """A no-grad reference forward under ``use_adapter`` between the policy's checkpointed forward and its backward:
    the backward recomputes with the policy adapter again, so the gradients are those of a plain, uncheckpointed
    step."""
    def step(checkpointing: bool):
        model = named_adapter_model(tiny_llama(0))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        loss = model(_ids()).logits.logsumexp(-1).mean()
        if checkpointing:
            with torch.no_grad(), fusedrl.use_adapter(model, "anchor"):
                model(_ids())
        loss.backward()
        return {name: param.grad for name, param in model.named_parameters() if param.grad is not None}

    expected, actual = step(False), step(True)
    assert actual.keys() == expected.keys() == {name for name in expected if "lora_" in name and ".policy." in name}
    for name, grad in actual.items():
        assert_close(grad, expected[name], name=name)


def test_use_adapter_with_compiled_blocks():
    model = named_adapter_model(tiny_llama(0))
    eager = adapter_copy(model, "policy")
    assert compile_blocks(model) == 2
    for name in ("anchor", None):
        with fusedrl.use_adapter(model, name):
            compiled = _logits(model)
        assert_close(compiled, _logits(adapter_copy(eager, name)), name=f"{name} compiled vs eager")
    assert_close(_logits(model), _logits(eager), name="policy after the switches")


# --- the reference of the preference trainers ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_reference_is_the_ref_adapter(kind, tmp_path):
    """The first step with ``ref_adapter_name="anchor"`` is the step against an explicit reference model that is the
    anchor adapter (loss and gradients); training never moves the anchor, and moves the policy."""
    model = named_adapter_model(tiny_llama(0))
    anchor = adapter_copy(model, "anchor")
    trainer = _trainer(kind, model, tmp_path / "named", model_adapter_name="policy", ref_adapter_name="anchor")
    explicit = _trainer(kind, named_adapter_model(tiny_llama(0)), tmp_path / "explicit", model_adapter_name="policy",
                        ref_model=anchor)
    assert trainer.ref_model is None
    with trainer.reference_context() as reference:
        assert reference is trainer.model
        assert torch.equal(_logits(reference), _logits(anchor))
    loss, grads = first_step(trainer)
    expected_loss, expected_grads = first_step(explicit)
    assert_close(loss, expected_loss, name="loss")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], name=name)

    anchor_before, policy_before = adapter_state(model, "anchor"), adapter_state(model, "policy")
    trainer.model.zero_grad()
    train_logs(trainer)
    assert all(torch.equal(model.get_parameter(name), value) for name, value in anchor_before.items())
    assert not any(torch.equal(model.get_parameter(name), value) for name, value in policy_before.items()
                   if "lora_B" in name)
    assert trainer.model.active_adapter == "policy"


def test_null_ref_context(tmp_path):
    model = named_adapter_model(tiny_llama(0))
    trainer = _trainer("dpo", model, tmp_path, model_adapter_name="policy", ref_adapter_name="anchor")
    with trainer.null_ref_context():
        assert torch.equal(_logits(trainer.model), _logits(adapter_copy(model, "anchor")))
    assert torch.equal(_logits(trainer.model), _logits(adapter_copy(model, "policy")))

    # peft_config with a name: the adapter is created under it, and the reference is the base (adapters disabled).
    base = _trainer("dpo", tiny_llama(0), tmp_path, peft_config=LoraConfig(**LORA), model_adapter_name="mine")
    assert sorted(base.model.peft_config) == ["mine"] and base.model.active_adapter == "mine"
    with torch.no_grad():
        for name, param in base.model.named_parameters():
            if "lora_B.mine." in name:
                param.fill_(0.1)
    with base.null_ref_context():
        assert torch.equal(_logits(base.model), _logits(tiny_llama(0)))
    assert not torch.allclose(_logits(base.model), _logits(tiny_llama(0)))

    plain = _trainer("dpo", tiny_llama(0), tmp_path)  # no PEFT: a no-op; the reference is the separate copy
    with plain.null_ref_context():
        assert torch.equal(_logits(plain.model), _logits(tiny_llama(0)))
    with plain.reference_context() as reference:
        assert reference is plain.ref_model


def test_sync_ref_model_syncs_into_the_ref_adapter(tmp_path):
    model = named_adapter_model(tiny_llama(0))
    with pytest.raises(ValueError, match="name a reference adapter to sync into with ref_adapter_name"):
        _trainer("dpo", model, tmp_path, model_adapter_name="policy", sync_ref_model=True)
    trainer = _trainer("dpo", model, tmp_path, model_adapter_name="policy", ref_adapter_name="anchor",
                       sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=1.0, max_steps=1)
    anchor_before = adapter_state(model, "anchor")
    train_logs(trainer)
    for name, value in adapter_state(model, "policy").items():  # alpha 1: a copy of the trained adapter
        assert torch.equal(model.get_parameter(name.replace(".policy.", ".anchor.")), value), name
    assert not torch.equal(model.get_parameter(next(n for n in anchor_before if "lora_A" in n)),
                           anchor_before[next(n for n in anchor_before if "lora_A" in n)])


# --- callbacks -------------------------------------------------------------------------------------------------------


def _completions(model) -> list[str]:
    prompts = EvalPrompts(prompts=EVAL_PAIRS["prompt"], texts=EVAL_PAIRS["prompt"])
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=TOKENIZER.pad_token_id,
                              eos_token_id=TOKENIZER.eos_token_id)
    return generate_eval_completions(model, TOKENIZER, prompts, config, batch_size=8)


def test_win_rate_and_log_completions_use_the_named_adapters(tmp_path):
    model = named_adapter_model(tiny_llama(0))
    expected = {name: _completions(adapter_copy(model, name)) for name in ("policy", "anchor")}
    assert expected["policy"] != expected["anchor"]
    trainer = _trainer("dpo", model, tmp_path, model_adapter_name="policy", ref_adapter_name="anchor",
                       eval_dataset=Dataset.from_dict(EVAL_PAIRS), per_device_eval_batch_size=8)
    win_rate = WinRateCallback(lambda prompts, pairs: [TIE] * len(pairs), trainer, GREEDY_3)
    win_rate.on_train_begin(trainer.args, trainer.state, None)
    win_rate.on_evaluate(trainer.args, trainer.state, None, metrics={})
    assert win_rate.reference_completions == expected["anchor"]
    assert win_rate.last_policy_completions == expected["policy"]

    log = LogCompletionsCallback(trainer, GREEDY_3)
    log.log_completions(trainer.args, trainer.state)
    assert [row[-1] for row in log.table] == expected["policy"] and log.columns == log.COLUMNS

    # Several trained adapters (joint mode): each generates, in an `adapter` column; WinRate needs one named.
    joint = types.SimpleNamespace(args=types.SimpleNamespace(model_adapter_name=["policy", "anchor"]), model=model,
                                  processing_class=TOKENIZER, eval_dataset=Dataset.from_dict(EVAL_PAIRS))
    log = LogCompletionsCallback(joint, GREEDY_3)
    log.log_completions(types.SimpleNamespace(per_device_eval_batch_size=8, report_to=[]), trainer.state)
    assert log.columns == ("step", "adapter", "prompt", "completion")
    assert [(row[1], row[-1]) for row in log.table] == [
        (name, text) for name in ("policy", "anchor") for text in expected[name]]
    with pytest.raises(ValueError, match=r"2 adapters are trained together \(\[.policy., .anchor.\]\); pass adapter="):
        WinRateCallback(lambda prompts, pairs: [TIE] * len(pairs), joint, GREEDY_3)


def test_win_rate_reference_is_the_frozen_ref_copy(tmp_path):
    """A pretrained adapter and no names: the trainer's reference is the frozen ``ref`` copy of the adapter, and so is
    WinRate's (it used to generate with the adapters disabled, the base, which was not the trainer's reference)."""
    model = named_adapter_model(tiny_llama(0), ("default",))
    expected = _completions(adapter_copy(model, "default"))
    assert expected != _completions(tiny_llama(0))
    trainer = _trainer("dpo", model, tmp_path, eval_dataset=Dataset.from_dict(EVAL_PAIRS),
                       per_device_eval_batch_size=8)
    assert "ref" in trainer.model.peft_config
    with torch.no_grad():
        trainer.model.get_parameter(next(n for n in adapter_state(model, "default") if "lora_B" in n)).mul_(3.0)
    win_rate = WinRateCallback(lambda prompts, pairs: [TIE] * len(pairs), trainer, GREEDY_3)
    win_rate.on_train_begin(trainer.args, trainer.state, None)
    assert win_rate.reference_completions == expected
