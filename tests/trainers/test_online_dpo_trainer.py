"""OnlineDPOTrainer on the tiny preset model and the bundled arithmetic prompts (CPU, reference kernels).

- a few steps train with a reward function and with a pairwise judge: finite losses, the policy moves, TRL's
  metric names are logged;
- ``kernels="preference=..."`` runs that backend's DPO loss and no other (counted calls);
- the loss on the sampled pairs equals the DPO formula computed by hand from full-vocabulary log-softmax
  (sigmoid: ``mean -log sigmoid(beta d)``; ipo on sums: ``mean (d - 1/(2 beta))^2``, ``d`` the chosen-minus-rejected
  log-ratio difference), and the judged winner is the chosen row; tied pairs leave the loss;
- bad input: judges that answer out of range / the wrong count / raise, and reward functions that raise or return
  NaN, raise errors naming them; constructor errors;
- a golden loss trajectory with the reward function (tests/golden/online_dpo_tiny.json; FUSEDRL_UPDATE_GOLDEN=1
  rewrites it);
- TRL's surface (what TRL's own test file reads): every TRL config field with TRL's default, ``use_vllm=True``
  refused, ``generation_config`` built from the fields (``generation_kwargs`` on top, and what sampling uses), the
  ``reward_funcs`` / ``reward_processing_classes`` / ``reward_weights`` attributes, eval datasets as one dataset or
  a dict of them, ``ref_model`` that is the model refused.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusedrl.cli import presets
from fusedrl.trainers.online.judges import TIE, RuleJudge
from fusedrl.trainers.online.online_dpo import OnlineDPOTrainer
from fusedrl.trainers.online.online_dpo_config import OnlineDPOConfig
from tests.helpers.online import digit_count, train_quietly
from tests.utils import PAIR_ENTRY_POINTS, assert_close, count_calls

GOLDEN = Path(__file__).parents[1] / "golden" / "online_dpo_tiny.json"

TRL_METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "rewards/chosen",
               "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
               "val/contain_eos_token", "beta")


def make_trainer(tmp_path, *, reward_funcs=None, judge=None, trainer_kwargs=None, **overrides):
    """OnlineDPOTrainer on the tiny preset, 8 arithmetic prompts; ``overrides`` go to the config, ``trainer_kwargs``
    (eval_dataset, ref_model, reward_processing_classes...) to the trainer."""
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "max_steps": 2, "max_new_tokens": 5,
                "learning_rate": 1e-3, "bf16": False, "gradient_checkpointing": False, "logging_steps": 1,
                "report_to": [], "save_strategy": "no", "use_cpu": True, "kernels": "all=reference",
                "dataloader_pin_memory": False, "disable_tqdm": True, "seed": 0}
    settings.update(overrides)
    tokenizer = presets.build_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OnlineDPOTrainer(presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer),
                                reward_funcs=reward_funcs, judge=judge, args=OnlineDPOConfig(**settings),
                                train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=8),
                                processing_class=tokenizer, **(trainer_kwargs or {}))


@pytest.mark.parametrize("ranking", ["reward", "judge"])
def test_online_dpo_trains(tmp_path, ranking):
    kwargs = ({"reward_funcs": [digit_count]} if ranking == "reward"
              else {"judge": RuleJudge(lambda prompt, completion: sum(ch.isdigit() for ch in completion))})
    trainer = make_trainer(tmp_path, **kwargs)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    logs = train_quietly(trainer)
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert all(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters()
               if name.startswith("lm_head"))
    assert set(TRL_METRICS) <= logs[0].keys()
    assert logs[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is the initial policy
    if ranking == "reward":
        assert {"objective/scores", "objective/scores_margin", "objective/rlhf_reward"} <= logs[0].keys()
        assert logs[0]["objective/scores_margin"] >= 0  # the higher score is chosen
        losses = [entry["loss"] for entry in logs]
        if os.environ.get("FUSEDRL_UPDATE_GOLDEN") == "1":
            GOLDEN.write_text(json.dumps({"loss": losses}, indent=1) + "\n")
        assert_close(torch.tensor(losses), torch.tensor(json.loads(GOLDEN.read_text())["loss"]),
                     name="loss trajectory")
    else:
        assert "val/judge_ties" in logs[0]


@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
def test_selected_preference_backend_runs(backend, tmp_path, monkeypatch):
    counts = count_calls(monkeypatch, PAIR_ENTRY_POINTS)
    logs = train_quietly(make_trainer(tmp_path, reward_funcs=[digit_count], max_steps=1,
                                      kernels=f"all=reference,preference={backend}"))
    assert counts == {name: int(name == backend) for name in PAIR_ENTRY_POINTS}
    assert math.isfinite(logs[0]["loss"])


class FixedJudge:
    """Prefers the second completion of every pair except those listed as ties; remembers what it saw."""

    def __init__(self, ties=()):
        self.ties, self.pairs = set(ties), []

    def __call__(self, prompts, completion_pairs):
        self.pairs = list(completion_pairs)
        return [TIE if i in self.ties else 1 for i in range(len(prompts))]


def hand_sequence_logps(model, inputs):
    """Sum over completion tokens of log_softmax(full logits): the obvious path, ``[2B, V]`` logits included."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   position_ids=inputs["position_ids"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    mask = inputs["labels"][:, 1:] != -100
    return (logps * mask).sum(1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_equals_dpo_formula(tmp_path, loss_type):
    judge = FixedJudge(ties={1})
    trainer = make_trainer(tmp_path, judge=judge, loss_type=loss_type, beta=0.5)
    with torch.no_grad():  # move the policy away from the reference so the log-ratios are not 0
        for param in trainer.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    rows = [trainer.train_dataset[i] for i in range(4)]
    inputs = trainer._prepare_inputs(rows)
    num_pairs = len(rows)
    tokenizer = trainer.processing_class
    completion_length = inputs["completion_mask"].shape[1]
    for i, (_, second) in enumerate(judge.pairs):  # the judged winner (index 1) is the chosen row i
        ids = inputs["input_ids"][i, -completion_length:][inputs["completion_mask"][i].bool()]
        assert tokenizer.decode(ids, skip_special_tokens=True) == second
    with torch.no_grad(), trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, inputs)
        policy = hand_sequence_logps(trainer.model, inputs)
        reference = hand_sequence_logps(trainer.ref_model, inputs)
    logratios = policy - reference
    d = logratios[:num_pairs] - logratios[num_pairs:]
    losses = -F.logsigmoid(0.5 * d) if loss_type == "sigmoid" else (d - 1 / (2 * 0.5)) ** 2
    ranked = torch.tensor([i not in judge.ties for i in range(num_pairs)])
    expected = losses[ranked].mean()
    assert d.abs().max() > 1e-3
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("answer,match", [
    (lambda prompts, pairs: [2] * len(prompts), r"judge 'bad_judge': judge verdicts must be 0, 1 or -1"),
    (lambda prompts, pairs: [0], r"judge 'bad_judge': judge returned 1 verdicts for 4 pairs"),
    (lambda prompts, pairs: {}["missing"], r"judge 'bad_judge' raised KeyError"),
], ids=["out-of-range", "wrong-count", "raises"])
def test_bad_judge_is_named(tmp_path, answer, match):
    answer.__name__ = "bad_judge"
    trainer = make_trainer(tmp_path, judge=answer, max_steps=1)
    with pytest.raises(ValueError, match=match):
        train_quietly(trainer)


@pytest.mark.parametrize("reward,match", [
    (lambda completions, **kw: 1 / 0, r"reward function 'broken' raised ZeroDivisionError"),
    (lambda completions, **kw: [math.inf] * len(completions), r"reward function 'broken' returned inf"),
], ids=["raises", "inf"])
def test_bad_reward_function_is_named(tmp_path, reward, match):
    reward.__name__ = "broken"
    trainer = make_trainer(tmp_path, reward_funcs=[reward], max_steps=1)
    with pytest.raises(ValueError, match=match):
        train_quietly(trainer)


def test_constructor_errors(tmp_path):
    import fusedrl

    assert fusedrl.OnlineDPOTrainer is OnlineDPOTrainer and fusedrl.OnlineDPOConfig is OnlineDPOConfig
    with pytest.raises(ValueError, match=r"either reward_funcs .* or judge, not both"):
        make_trainer(tmp_path, reward_funcs=[digit_count], judge=FixedJudge())
    with pytest.raises(ValueError, match=r"needs reward_funcs .* or a pairwise judge"):
        make_trainer(tmp_path)
    with pytest.raises(ValueError, match=r"loss_type must be one of"):
        OnlineDPOConfig(output_dir=str(tmp_path), loss_type="hinge")


def test_beta_list_is_per_epoch(tmp_path):
    trainer = make_trainer(tmp_path, judge=FixedJudge(), beta=[0.3, 0.2])
    assert trainer.beta == 0.3
    trainer.state.epoch = 1.5
    assert trainer.beta == 0.2
    trainer.state.epoch = 7.0
    assert trainer.beta == 0.2


# --- TRL's surface --------------------------------------------------------------------------------------------------


def test_every_trl_config_field_has_trls_default():
    """TRL's OnlineDPOConfig fields (vLLM ones included) exist here with TRL's defaults, so a TRL config carries over;
    fusedrl's extra fields are the engine's and the reward/prompt fields named in online_dpo_config.py."""
    import dataclasses

    with warnings.catch_warnings():  # TRL warns that trl.experimental may change
        warnings.simplefilter("ignore")
        from trl.experimental.online_dpo import OnlineDPOConfig as TRLOnlineDPOConfig

    def defaults(cls):
        return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls)}

    theirs, ours = defaults(TRLOnlineDPOConfig), defaults(OnlineDPOConfig)
    assert {name: ours.get(name, "<missing>") for name in theirs} == theirs
    assert {"use_vllm", "vllm_mode", "vllm_server_port", "ds3_gather_for_generation"} <= theirs.keys()


def test_vllm_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"vllm_mode must be one of \('server', 'colocate'\), got 'remote'"):
        OnlineDPOConfig(output_dir=str(tmp_path), vllm_mode="remote")
    with pytest.raises(ValueError, match=r"use_vllm=True is not supported .* set use_vllm=False"):
        make_trainer(tmp_path, reward_funcs=[digit_count], use_vllm=True)
    assert make_trainer(tmp_path, reward_funcs=[digit_count]).use_vllm is False


def test_generation_config_follows_the_fields(tmp_path):
    trainer = make_trainer(tmp_path, reward_funcs=[digit_count], temperature=0.7, top_p=0.8, top_k=12, min_p=0.05,
                           repetition_penalty=1.3, max_new_tokens=6, cache_implementation="dynamic",
                           generation_kwargs={"do_sample": False, "top_k": 3})
    config = trainer.generation_config
    assert (config.temperature, config.top_p, config.min_p, config.repetition_penalty) == (0.7, 0.8, 0.05, 1.3)
    assert config.max_new_tokens == 6 and config.cache_implementation == "dynamic"
    assert config.do_sample is False and config.top_k == 3  # generation_kwargs win over the named fields
    tokenizer = trainer.processing_class
    assert tokenizer.eos_token_id in config.eos_token_id and config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("do_sample", [True, False], ids=["sampled", "greedy"])
def test_generation_kwargs_reach_sampling(tmp_path, do_sample):
    """The pair of each prompt comes from trainer.generation_config: greedy decoding (``do_sample=False`` through
    generation_kwargs) gives two identical completions, sampling gives different ones for some prompt."""
    trainer = make_trainer(tmp_path, reward_funcs=[digit_count], generation_kwargs={"do_sample": do_sample})
    rows = [trainer.train_dataset[i] for i in range(4)]
    inputs = trainer._prepare_inputs(rows)
    chosen, rejected = inputs["input_ids"].chunk(2)
    same = (chosen == rejected).all(dim=1)
    assert bool(same.all()) is not do_sample


def _reward_model_dir(tmp_path, policy_config):
    """A sequence-classification reward model saved with a tokenizer that has no pad token (TRL then pads with EOS)."""
    from transformers import AutoModelForSequenceClassification

    path = tmp_path / "reward"
    config = copy.deepcopy(policy_config)
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer = presets.build_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    return path


def test_reward_attributes_follow_the_rewards(tmp_path):
    from transformers import AutoModelForSequenceClassification

    def constant(completions, **kwargs):
        return [0.5] * len(completions)

    trainer = make_trainer(tmp_path, reward_funcs=[digit_count, constant], reward_weights=[0.7, 0.3])
    assert trainer.reward_funcs == [digit_count, constant]
    assert trainer.reward_processing_classes == [None, None]
    torch.testing.assert_close(trainer.reward_weights, torch.tensor([0.7, 0.3]))

    path = _reward_model_dir(tmp_path, trainer.model.config)
    reward_model = AutoModelForSequenceClassification.from_pretrained(path)
    trainer = make_trainer(tmp_path, reward_funcs=[reward_model, digit_count], max_steps=1)
    reward_tokenizer = trainer.reward_processing_classes[0]
    assert trainer.reward_funcs[0] is reward_model and trainer.reward_processing_classes[1] is None
    assert reward_tokenizer.name_or_path == str(path)  # loaded from the reward model's own directory
    assert reward_tokenizer.pad_token == reward_tokenizer.eos_token  # it had none
    assert reward_model.config.pad_token_id == reward_tokenizer.eos_token_id
    torch.testing.assert_close(trainer.reward_weights, torch.ones(2))
    logs = train_quietly(trainer)
    assert math.isfinite(logs[0]["loss"]) and "objective/scores_margin" in logs[0]

    with pytest.raises(ValueError, match=r"The number of reward processing classes \(1\) must match the number of "
                                         r"reward functions \(2\)"):
        make_trainer(tmp_path, reward_funcs=[digit_count, constant],
                     trainer_kwargs={"reward_processing_classes": [None]})


def test_eval_datasets_one_or_a_dict(tmp_path):
    from datasets import DatasetDict

    split = presets.load_preset_dataset("arithmetic", "test", kind="prompt", n=2)
    trainer = make_trainer(tmp_path, reward_funcs=[digit_count], trainer_kwargs={"eval_dataset": split})
    assert trainer.eval_dataset is split
    plain = {"first": split, "second": split}
    trainer = make_trainer(tmp_path, reward_funcs=[digit_count], trainer_kwargs={"eval_dataset": plain})
    assert set(trainer.eval_dataset) == {"first", "second"}
    splits = DatasetDict(plain)
    trainer = make_trainer(tmp_path, reward_funcs=[digit_count], trainer_kwargs={"eval_dataset": splits})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_first_loss"]) and math.isfinite(metrics["eval_second_loss"])

    bad = {"first": split, "second": split.rename_column("prompt", "question")}
    with pytest.raises(ValueError, match=r"eval_dataset\['second'\] needs a 'prompt' column"):
        make_trainer(tmp_path, reward_funcs=[digit_count], trainer_kwargs={"eval_dataset": bad})


def test_ref_model_that_is_the_model_is_refused(tmp_path):
    tokenizer = presets.build_tokenizer()
    model = presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="model and ref_model are the same object; omit ref_model"):
        OnlineDPOTrainer(model, ref_model=model, reward_funcs=[digit_count],
                         args=OnlineDPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                         train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=8),
                         processing_class=tokenizer)
