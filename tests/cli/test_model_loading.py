"""Loud model loading, on the command line and in Python: every model option reaches ``from_pretrained``, a model
directory without a tokenizer and a tokenizer larger than the model's embeddings are errors naming the fix.

The checkpoints are the tiny Llama (``tests/helpers/models.py``, vocabulary 128) saved once per module, with and
without the presets' 103-token character tokenizer beside it. ``from_pretrained`` is spied on (the real one still
runs) to see the keyword arguments a run passes; the loaded model's dtype and attention implementation show they
took effect.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

from fusedrl.cli import launch, presets
from fusedrl.cli import main as cli_main
from fusedrl.trainers import DPOConfig, DPOTrainer, PPOConfig, PPOTrainer
from fusedrl.trainers import models as trainer_models
from fusedrl.trainers.models import load_causal_lm, pretrained_kwargs
from fusedrl.trainers.rewards import resolve_rewards
from tests.helpers.data import standard_pairs
from tests.helpers.models import tiny_llama

NUM_TOKENS = len(presets.build_tokenizer())  # 103


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """``with_tokenizer``: model + tokenizer; ``bare``: the model alone; ``tokenizer``: the tokenizer alone;
    ``small_vocab``: a model with 64 embedding rows + the 103-token tokenizer; ``scorer``: a sequence classifier
    (a reward / value model) + tokenizer."""
    root = tmp_path_factory.mktemp("model_loading")
    tokenizer = presets.build_tokenizer()
    paths = {name: root / name for name in ("with_tokenizer", "bare", "tokenizer", "small_vocab", "scorer")}
    for name in ("with_tokenizer", "bare"):
        tiny_llama().save_pretrained(paths[name])
    tiny_llama(vocab_size=64).save_pretrained(paths["small_vocab"])
    tiny_llama(model_cls=LlamaForSequenceClassification, num_labels=1).save_pretrained(paths["scorer"])
    for name in ("with_tokenizer", "tokenizer", "small_vocab", "scorer"):
        tokenizer.save_pretrained(paths[name])
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture
def loads(monkeypatch) -> list[dict]:
    """The keyword arguments of every ``AutoModelForCausalLM.from_pretrained`` call fusedrl's loader makes."""
    calls: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained

    class Spy:
        @staticmethod
        def from_pretrained(path, **kwargs):
            calls.append({"path": path, **kwargs})
            return real(path, **kwargs)

    monkeypatch.setattr(trainer_models, "AutoModelForCausalLM", Spy)
    return calls


def _job_argv(model: str, tmp_path, *extra: str) -> list[str]:
    return ["--model", model, "--dataset", "arithmetic", "--num_rows", "8", "--output_dir", str(tmp_path),
            "--report_to", "none", "--bf16", "False", "--kernels", "all=reference", *extra]


# --- every model option reaches from_pretrained -------------------------------------------------------------------

def test_cli_model_init_kwargs_reach_from_pretrained(dirs, loads, tmp_path):
    """The issue's command: `fusedrl dpo --model PATH --model_init_kwargs '{"dtype": "bfloat16", ...}'` trains the
    checkpoint in bf16 (it loaded fp32 before), with the asked attention, revision and trust_remote_code; the saved
    model is bf16 too."""
    kwargs = {"dtype": "bfloat16", "attn_implementation": "eager", "revision": "main"}
    out = tmp_path / "run"
    code = cli_main(["dpo", *_job_argv(dirs["with_tokenizer"], out, "--model_init_kwargs", json.dumps(kwargs),
                                       "--trust_remote_code", "True", "--max_steps", "1",
                                       "--per_device_train_batch_size", "2", "--save_strategy", "no",
                                       "--gradient_checkpointing", "False")])
    assert code == 0
    assert loads == [{"path": dirs["with_tokenizer"], "dtype": torch.bfloat16, "attn_implementation": "eager",
                      "revision": "main", "trust_remote_code": True}]
    saved = json.loads((out / "config.json").read_text())
    assert saved["dtype"] == "bfloat16"


def test_cli_dtype_and_attention_flags(dirs, loads, tmp_path):
    """TRL's ModelConfig flags `--dtype` / `--attn_implementation` are model_init_kwargs entries: the model the
    trainer loads has them; the directory is handed over as a path, so nothing loads it twice."""
    job = launch.build_job("dpo", _job_argv(dirs["with_tokenizer"], tmp_path, "--dtype", "bfloat16",
                                            "--attn_implementation", "eager"))
    assert job.model == dirs["with_tokenizer"] and loads == []
    assert job.config.model_init_kwargs == {"dtype": "bfloat16", "attn_implementation": "eager"}
    model = load_causal_lm(job.model, job.config)
    assert loads[0]["dtype"] == torch.bfloat16 and loads[0]["trust_remote_code"] is False
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


def test_cli_model_options_in_the_yaml_config(dirs, tmp_path):
    """The model options may sit in the --config file beside the config fields, as in TRL's YAML recipes; a flag
    still wins over the file."""
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model: {dirs['bare']}\ntokenizer: {dirs['tokenizer']}\ndtype: bfloat16\n"
                      f"attn_implementation: eager\noutput_dir: {tmp_path / 'from_yaml'}\nlearning_rate: 0.002\n")
    job = launch.build_job("dpo", ["--config", str(config), "--dataset", "arithmetic", "--num_rows", "4",
                                   "--bf16", "False", "--report_to", "none", "--attn_implementation", "sdpa"])
    assert job.model == dirs["bare"] and len(job.tokenizer) == NUM_TOKENS
    assert job.config.model_init_kwargs == {"dtype": "bfloat16", "attn_implementation": "sdpa"}
    assert job.config.output_dir == str(tmp_path / "from_yaml") and job.config.learning_rate == 0.002


def test_cli_flag_contradicting_model_init_kwargs_is_refused(dirs, tmp_path):
    with pytest.raises(SystemExit, match=r"--dtype float32 contradicts model_init_kwargs \{'dtype': 'bfloat16'\}"):
        launch.build_job("dpo", _job_argv(dirs["with_tokenizer"], tmp_path, "--dtype", "float32",
                                          "--model_init_kwargs", '{"dtype": "bfloat16"}'))


def test_cli_preset_takes_dtype_and_attention_and_refuses_the_rest(tmp_path, caplog):
    """A preset is built in code: dtype and attention are applied to it (and not left in model_init_kwargs for the
    trainer to warn about); an entry only from_pretrained understands is refused."""
    job = launch.build_job("dpo", _job_argv("tiny", tmp_path, "--dtype", "bfloat16", "--attn_implementation",
                                            "eager"))
    assert job.model.dtype == torch.bfloat16 and job.model.config._attn_implementation == "eager"
    assert job.config.model_init_kwargs is None
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        job.trainer_cls(model=job.model, args=job.config, train_dataset=job.train_dataset,
                        processing_class=job.tokenizer)
    assert "model_init_kwargs is ignored" not in caplog.text
    with pytest.raises(SystemExit, match=r"model_init_kwargs \['revision'\] only apply to a model loaded from a "
                                         "directory"):
        launch.build_job("dpo", _job_argv("tiny", tmp_path, "--model_init_kwargs", '{"revision": "v2"}'))


def test_reward_and_value_models_take_model_init_kwargs(dirs):
    """Reward and value models given by path read model_init_kwargs too: TRL's scripts put trust_remote_code there
    (the value model passed it twice: a TypeError) and old configs spell the dtype torch_dtype."""
    kwargs = {"trust_remote_code": False, "torch_dtype": "bfloat16"}
    (reward,) = resolve_rewards([dirs["scorer"]], model_init_kwargs=kwargs)
    assert reward.is_model and reward.func.dtype == torch.bfloat16 and len(reward.processing_class) == NUM_TOKENS
    args = PPOConfig(output_dir="unused", report_to="none", bf16=False, model_init_kwargs=kwargs)
    value_model = PPOTrainer._value_model(dirs["scorer"], None, args)
    assert value_model.dtype == torch.bfloat16 and value_model.score.out_features == 1


# --- model_init_kwargs checked before anything loads --------------------------------------------------------------

def test_pretrained_kwargs_resolve_dtype_and_keep_every_entry():
    assert pretrained_kwargs(None, False) == {"dtype": torch.float32, "trust_remote_code": False}
    assert pretrained_kwargs({"torch_dtype": "float16", "revision": "v1", "device_map": "cpu"}, True) == {
        "dtype": torch.float16, "revision": "v1", "device_map": "cpu", "trust_remote_code": True}
    assert pretrained_kwargs({"dtype": "auto", "trust_remote_code": True}, False)["trust_remote_code"] is True
    assert pretrained_kwargs({}, False, default_dtype=None) == {"trust_remote_code": False}


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "bf16"}, r"model_init_kwargs\['dtype'\] must be 'auto', a torch.dtype or one of"),
    ({"dtype": "bfloat16", "torch_dtype": "float32"}, "sets both dtype='bfloat16' and torch_dtype='float32'"),
    ("dtype=bfloat16", "model_init_kwargs must be a dict of from_pretrained arguments"),
], ids=["unknown-dtype", "dtype-twice", "not-a-dict"])
def test_bad_model_init_kwargs_fail_when_the_config_is_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOConfig(output_dir="unused", report_to="none", bf16=False, model_init_kwargs=kwargs)


def test_revision_of_a_local_directory_is_said_to_do_nothing(dirs, caplog):
    args = DPOConfig(output_dir="unused", report_to="none", bf16=False, model_init_kwargs={"revision": "v2"})
    with caplog.at_level(logging.INFO, logger="fusedrl"):
        load_causal_lm(dirs["bare"], args)
    assert f"model_init_kwargs['revision']='v2' has no effect: {dirs['bare']} is a local directory" in caplog.text
    assert f"loaded LlamaForCausalLM from {dirs['bare']} (torch.float32, attention sdpa)" in caplog.text


# --- the tokenizer --------------------------------------------------------------------------------------------------

def test_cli_model_directory_without_tokenizer_is_an_error(dirs, tmp_path):
    """It used to train on the presets' character tokenizer without a word."""
    with pytest.raises(SystemExit) as error:
        launch.build_job("dpo", _job_argv(dirs["bare"], tmp_path))
    message = str(error.value.code)
    assert f"--model '{dirs['bare']}': the directory has no tokenizer files" in message
    assert "--tokenizer PATH" in message


def test_cli_tokenizer_flag(dirs, tmp_path):
    """--tokenizer gives the tokenizer of a bare model directory, or replaces a preset's (the preset's vocabulary is
    sized to it); a path that is not a tokenizer directory names the flag."""
    job = launch.build_job("dpo", _job_argv(dirs["bare"], tmp_path, "--tokenizer", dirs["tokenizer"]))
    assert len(job.tokenizer) == NUM_TOKENS and job.model == dirs["bare"]
    job = launch.build_job("dpo", _job_argv("tiny", tmp_path, "--tokenizer", dirs["tokenizer"]))
    assert job.model.get_input_embeddings().num_embeddings == 128
    with pytest.raises(SystemExit, match="--tokenizer 'nowhere': not a local tokenizer directory"):
        launch.build_job("dpo", _job_argv(dirs["bare"], tmp_path, "--tokenizer", "nowhere"))
    with pytest.raises(SystemExit, match=f"--tokenizer '{dirs['bare']}': the directory has no tokenizer files"):
        launch.build_job("dpo", _job_argv(dirs["with_tokenizer"], tmp_path, "--tokenizer", dirs["bare"]))


def test_cli_tokenizer_larger_than_the_embeddings_is_an_error(dirs, tmp_path):
    with pytest.raises(ValueError, match=f"the tokenizer has {NUM_TOKENS} tokens but the model .* has 64 "
                                         "embedding rows: ids >= 64 would index past them"):
        cli_main(["dpo", *_job_argv(dirs["small_vocab"], tmp_path, "--max_steps", "1")])


def test_python_tokenizer_larger_than_the_embeddings_is_an_error(tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False)
    with pytest.raises(ValueError, match=r"has 64 embedding rows.*--tokenizer PATH.*resize_token_embeddings"):
        DPOTrainer(model=tiny_llama(vocab_size=64), args=args, train_dataset=standard_pairs(),
                   processing_class=presets.build_tokenizer())


def test_python_model_path_without_tokenizer_names_the_path(dirs, tmp_path):
    """No processing_class: the tokenizer is read from the model's path; none there is a ValueError naming the path
    and the fix (transformers' own message asked to install sentencepiece)."""
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False)
    with pytest.raises(ValueError, match=f"no tokenizer could be loaded from the model's path '{dirs['bare']}'.*"
                                         "pass the tokenizer the model was trained with as processing_class"):
        DPOTrainer(model=dirs["bare"], args=args, train_dataset=standard_pairs())
    trainer = DPOTrainer(model=dirs["with_tokenizer"], args=args, train_dataset=standard_pairs())
    assert len(trainer.processing_class) == NUM_TOKENS
