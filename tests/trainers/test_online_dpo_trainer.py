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
  rewrites it).
"""

from __future__ import annotations

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


def make_trainer(tmp_path, *, reward_funcs=None, judge=None, **overrides):
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
                                processing_class=tokenizer)


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
