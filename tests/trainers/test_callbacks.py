"""Callbacks and judges on a tiny Llama (hidden 32, 2 layers) with the character-level preset tokenizer.

Hooks are driven directly with a TrainerState/TrainerControl where that is enough; one test runs a 3-step
transformers.Trainer with all four callbacks attached.
"""

from __future__ import annotations

import contextlib
import io
import sys
import types

import pytest
import torch
from datasets import Dataset
from rich.console import Console
from transformers import (
    DataCollatorForLanguageModeling,
    GenerationConfig,
    LlamaForSequenceClassification,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from fusedrl.cli.presets.tokenizer import build_tokenizer
from fusedrl.trainers.callbacks import (
    LogCompletionsCallback,
    RichProgressCallback,
    SyncRefModelCallback,
    WinRateCallback,
    judge_against_reference,
    mix_into_,
    use_rich_progress,
)
from fusedrl.trainers.online.judges import (
    TIE,
    RewardModelJudge,
    RuleJudge,
    arithmetic_answer_score,
    arithmetic_judge,
    check_verdicts,
)
from tests.helpers.models import tiny_llama

GREEDY_3 = GenerationConfig(max_new_tokens=3, do_sample=False)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# The model of these tests: tests/helpers/models.TINY_LLAMA at hidden 32, 2 attention heads / 1 KV head, drawn from
# the global generator as this file always has (see tiny_llama's isolate_rng).
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
         "isolate_rng": False}


def state_at(step: int, *, main: bool = True, max_steps: int = 3) -> TrainerState:
    return TrainerState(global_step=step, max_steps=max_steps, is_world_process_zero=main)


# SyncRefModelCallback ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 1.0], ids=["alpha0.5", "alpha1.0-hard-copy"])
def test_sync_mixes_on_sync_steps_only(alpha):
    """alpha 0.5: ref' = (ref + policy) / 2, bitwise (halving is exact in fp32, so 0.5*r + 0.5*p rounds once like
    (r + p) / 2). alpha 1.0: ref' = policy, bitwise."""
    policy, ref = tiny_llama(0, **SMALL), tiny_llama(1, **SMALL)
    ref_before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    policy_before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    args = types.SimpleNamespace(ref_model_sync_steps=2, ref_model_mixup_alpha=alpha)
    callback = SyncRefModelCallback(ref)

    callback.on_step_end(args, state_at(1), TrainerControl(), model=policy)
    assert all(torch.equal(p, ref_before[n]) for n, p in ref.named_parameters()), "synced off a sync step"

    callback.on_step_end(args, state_at(2), TrainerControl(), model=policy)
    assert callback.num_syncs == 1
    for name, param in ref.named_parameters():
        expected = policy_before[name] if alpha == 1.0 else (ref_before[name] + policy_before[name]) / 2
        assert torch.equal(param, expected), name
    assert all(torch.equal(p, policy_before[n]) for n, p in policy.named_parameters()), "policy changed"


def test_sync_bf16_reference_mixes_in_fp32():
    """ref' = bf16(0.99 * fp32(ref) + 0.01 * policy): one rounding, so the small step is not lost."""
    ref = torch.nn.Parameter(torch.full((5,), 1.0, dtype=torch.bfloat16), requires_grad=False)
    policy = torch.linspace(2.0, 3.0, 5)
    expected = (ref.float() * 0.99 + policy * 0.01).bfloat16()
    mix_into_(ref, policy, 0.01)
    assert torch.equal(ref, expected)
    assert (ref > 1.0).all(), "the 0.01 step rounded away"


def test_sync_peft_reference_adapter():
    """The reference is adapter 'ref' of the policy: only its tensors move, to (ref + default) / 2."""
    peft = pytest.importorskip("peft")
    lora = {"r": 2, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}  # random B: adapters differ
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(0, **SMALL), peft.LoraConfig(**lora))
    model.add_adapter("ref", peft.LoraConfig(**lora))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = SyncRefModelCallback("ref", sync_steps=1, alpha=0.5)
    callback.on_step_end(None, state_at(1), TrainerControl(), model=model)

    num_ref = 0
    for name, param in model.named_parameters():
        if ".ref." in name:
            num_ref += 1
            expected = (before[name] + before[name.replace(".ref.", ".default.")]) / 2
            assert torch.equal(param, expected), name
        else:
            assert torch.equal(param, before[name]), f"{name} is not the reference adapter but changed"
    assert num_ref == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_sync_rejects_mismatched_models():
    peft = pytest.importorskip("peft")
    policy = peft.get_peft_model(tiny_llama(0, **SMALL), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="pass the adapter's name"):
        SyncRefModelCallback(tiny_llama(1, **SMALL), sync_steps=1, alpha=0.5).sync(policy, 0.5)
    with pytest.raises(ValueError, match="needs sync_steps and alpha"):
        SyncRefModelCallback(tiny_llama(1, **SMALL)).on_train_begin(types.SimpleNamespace(), state_at(0), None)
    with pytest.raises(ValueError, match="alpha must be in"):
        SyncRefModelCallback(tiny_llama(1, **SMALL), sync_steps=1, alpha=0.0).on_train_begin(None, state_at(0), None)


def _fake_deepspeed(rank: int, calls: list):
    @contextlib.contextmanager
    def gathered(params, modifier_rank=None):
        calls.append((len(params), modifier_rank))
        yield

    return types.SimpleNamespace(
        zero=types.SimpleNamespace(GatheredParameters=gathered),
        comm=types.SimpleNamespace(get_rank=lambda: rank),
    )


@pytest.mark.parametrize(
    "rank, ref_partitioned", [(0, True), (1, True), (1, False)], ids=["rank0-writes", "rank1-reads", "rank1-replica"]
)
def test_sync_zero3_gathers_per_pair(monkeypatch, rank, ref_partitioned):
    """Parameters carrying ds_id go through deepspeed.zero.GatheredParameters (a recording stand-in here): the
    policy read-only (modifier_rank None), the reference with modifier_rank 0. A partitioned reference is written by
    rank 0 only; a replicated one (no ds_id) by every rank."""
    policy, ref = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for i, param in enumerate([*policy.parameters(), *(ref.parameters() if ref_partitioned else [])]):
        param.ds_id = i
    ref_before = [p.detach().clone() for p in ref.parameters()]
    calls = []
    monkeypatch.setitem(sys.modules, "deepspeed", _fake_deepspeed(rank, calls))
    SyncRefModelCallback(ref, sync_steps=1, alpha=1.0).sync(policy, 1.0)

    assert calls == [(1, None), (1, 0)] * 2  # weight, bias
    for param, old, source in zip(ref.parameters(), ref_before, policy.parameters()):
        assert torch.equal(param, source if rank == 0 or not ref_partitioned else old)


def test_sync_fsdp2_dtensors_mix_local_shards():
    """FSDP2-style DTensor parameters (world size 1, gloo) mix shard-wise; a plain reference takes full_tensor()."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already set up")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        policy_full, ref_full = torch.randn(4, 3), torch.randn(4, 3)
        policy = distribute_tensor(policy_full, mesh, [Shard(0)])
        ref = torch.nn.Parameter(distribute_tensor(ref_full, mesh, [Shard(0)]), requires_grad=False)
        mix_into_(ref, policy, 0.5)
        assert torch.equal(ref.full_tensor(), (ref_full + policy_full) / 2)
        plain_ref = ref_full.clone()
        mix_into_(plain_ref, policy, 1.0)
        assert torch.equal(plain_ref, policy_full)
    finally:
        dist.destroy_process_group()


# Judges ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, completion, score",
    [
        ("What is 23+18?\n", "41", 1.0),
        ("What is 23+18?\n", " 41 because 23+18", 1.0),
        ("What is 23+18?\n", "141", 0.0),
        ("What is 23+18?\n", "40 41", 0.0),  # the first number counts, not any
        ("What is 50-8?\n", "42", 1.0),
        ("<bos><|user|>What is 7+5?<eos><|assistant|>", "12", 1.0),  # chat-rendered prompt
        ("What is 23+18?\n", "", 0.0),
        ("Tell me a joke\n", "41", 0.0),
    ],
    ids=["exact", "leading-space-then-text", "superstring", "right-answer-second", "minus", "chat", "empty", "no-q"],
)
def test_arithmetic_answer_score(prompt, completion, score):
    assert arithmetic_answer_score(prompt, completion) == score


def test_arithmetic_judge_hand_pairs():
    prompts = ["What is 23+18?\n"] * 4 + ["What is 9-9?\n"]
    pairs = [("41", "40"), ("14", "41"), ("41", "41!"), ("1", "2"), ("0", "-0")]
    assert arithmetic_judge()(prompts, pairs) == [0, 1, TIE, TIE, TIE]


def test_rule_judge_score_fn_and_margin():
    shorter = RuleJudge(lambda prompt, completion: -len(completion))
    assert shorter(["p", "p", "p"], [("ab", "abc"), ("abcd", "a"), ("xy", "zw")]) == [0, 1, TIE]
    lenient = RuleJudge(lambda prompt, completion: -len(completion), margin=1.0)
    assert lenient(["p", "p"], [("ab", "abc"), ("abcd", "a")]) == [TIE, 1]
    with pytest.raises(ValueError, match="2 prompts but 1"):
        shorter(["p", "p"], [("a", "b")])


def test_check_verdicts():
    assert check_verdicts([0, 1, -1], 3) == [0, 1, -1]
    with pytest.raises(ValueError, match="2 verdicts for 3"):
        check_verdicts([0, 1], 3)
    with pytest.raises(ValueError, match=r"got \[2\]"):
        check_verdicts([0, 2], 2)


class SevensRewardModel(torch.nn.Module):
    """Reward = how many '7' characters the (unpadded) text holds: hand-checkable verdicts."""

    def __init__(self, seven_id: int):
        super().__init__()
        self.seven_id = seven_id
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the judge a device to read

    def forward(self, input_ids, attention_mask):
        sevens = ((input_ids == self.seven_id) & attention_mask.bool()).sum(-1, keepdim=True)
        return types.SimpleNamespace(logits=sevens.float() + self.dummy)


def test_reward_model_judge_hand_model(tokenizer):
    judge = RewardModelJudge(SevensRewardModel(tokenizer.convert_tokens_to_ids("7")), tokenizer, batch_size=3)
    prompts = ["What is 3+4?\n", "What is 70+7?\n", "q", "q"]
    pairs = [("7", "8"), ("77", "777"), ("a", "b"), ("7", "7")]  # prompt sevens are shared and cancel
    assert judge(prompts, pairs) == [0, 1, TIE, TIE]
    assert RewardModelJudge(judge.model, tokenizer, margin=1.5)(["q"], [("7", "77")]) == [TIE]


def test_reward_model_judge_llama_batched_matches_single(tokenizer):
    """Batched, padded scoring of a tiny LlamaForSequenceClassification gives the verdicts of one-by-one scoring."""
    model = tiny_llama(0, model_cls=LlamaForSequenceClassification, num_labels=1, **SMALL)
    judge = RewardModelJudge(model, tokenizer, batch_size=3)
    prompts = ["What is 1+1?\n", "What is 12+30?\n", "What is 99-9?\n"]
    pairs = [("2", "11"), ("42 is it", "4"), ("90", "ninety")]
    single = [[judge.scores([p + c])[0] for c in pair] for p, pair in zip(prompts, pairs)]
    expected = [0 if s0 > s1 else 1 for s0, s1 in single]
    assert judge(prompts, pairs) == expected
    assert judge(prompts, [(b, a) for a, b in pairs]) == [1 - v for v in expected]
    assert model.training, "the judge must restore the model's training mode"


# Win rate ------------------------------------------------------------------------------------------------------------


def test_judge_against_reference_maps_order_back():
    """policy_first [T, F, T, F] and verdicts [0, 0, -1, 1] -> policy won, lost, tied, won:
    outcomes [1, 0, 0.5, 1], win rate 2.5 / 4 = 0.625, tie rate 1 / 4."""
    judge = lambda prompts, pairs: [0, 0, TIE, 1]
    result = judge_against_reference(judge, ["p"] * 4, ["P"] * 4, ["R"] * 4, [True, False, True, False])
    assert result.outcomes == [1.0, 0.0, 0.5, 1.0]
    assert result.win_rate == 0.625 and result.tie_rate == 0.25


def _lm_dataset(tokenizer, n: int, offset: int = 0) -> Dataset:
    prompts = [f"What is {i}+{i + 1}?\n" for i in range(offset, offset + n)]
    texts = [p + str(2 * i + 1) for i, p in zip(range(offset, offset + n), prompts)]
    return Dataset.from_dict({"prompt": prompts, "input_ids": tokenizer(texts)["input_ids"]})


def make_trainer(tokenizer, tmp_path, *, callbacks=(), **args) -> Trainer:
    args = {
        "output_dir": str(tmp_path),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **args,
    }
    return Trainer(
        model=tiny_llama(0, **SMALL),
        args=TrainingArguments(**args),
        train_dataset=_lm_dataset(tokenizer, 6),
        eval_dataset=_lm_dataset(tokenizer, 5, offset=50),
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=list(callbacks),
    )


@pytest.fixture(scope="module")
def trainer(tokenizer, tmp_path_factory):
    return make_trainer(tokenizer, tmp_path_factory.mktemp("trainer"))


def _policy_picker(prefer_policy: bool):
    """A judge that knows the reference texts ('REF...') and picks the policy's (or the reference's) position."""

    def judge(prompts, pairs):
        picks = [0 if first.startswith("REF") else 1 for first, _ in pairs]  # index of the reference
        return [1 - p for p in picks] if prefer_policy else picks

    return judge


@pytest.mark.parametrize(
    "judge, win_rate, tie_rate",
    [
        (_policy_picker(True), 1.0, 0.0),
        (_policy_picker(False), 0.0, 0.0),
        (lambda prompts, pairs: [TIE] * len(pairs), 0.5, 1.0),
    ],
    ids=["always-policy", "always-reference", "all-ties"],
)
def test_win_rate_callback_stored_references(trainer, judge, win_rate, tie_rate):
    references = [f"REF{i}" for i in range(10)]  # more than needed: the first num_prompts are used
    callback = WinRateCallback(judge, trainer, GREEDY_3, num_prompts=4, reference_completions=references)
    metrics = {}
    callback.on_evaluate(trainer.args, state_at(7), TrainerControl(), metrics=metrics)

    assert metrics["eval_win_rate"] == win_rate
    assert trainer.state.log_history[-1]["eval_win_rate"] == win_rate
    assert trainer.state.log_history[-1]["eval_tie_rate"] == tie_rate
    assert callback.history == [(7, win_rate)]
    assert len(callback.last.outcomes) == 4
    # Shuffling is seeded by (args.seed, step): this step shows the policy both first and second.
    assert set(callback.last.policy_first) == {True, False}


def test_win_rate_callback_generates_reference_from_ref_model(trainer):
    """With trainer.ref_model a copy of the policy, greedy reference completions equal the policy's: all ties."""
    trainer.ref_model = tiny_llama(0, **SMALL)
    try:
        judge = RuleJudge(lambda prompt, completion: 0.0)
        callback = WinRateCallback(judge, trainer, GREEDY_3, num_prompts=3, shuffle_order=False)
        callback.on_train_begin(trainer.args, state_at(0), TrainerControl())
        metrics = {}
        callback.on_evaluate(trainer.args, state_at(0), TrainerControl(), metrics=metrics)
    finally:
        del trainer.ref_model
    assert callback.reference_completions == callback.last_policy_completions
    assert len(callback.reference_completions) == 3
    assert metrics["eval_win_rate"] == 0.5 and callback.last.policy_first == [False] * 3


def test_win_rate_callback_needs_prompts(trainer, tokenizer):
    saved = trainer.eval_dataset
    trainer.eval_dataset = saved.remove_columns("prompt")
    try:
        with pytest.raises(ValueError, match="'prompt' column"):
            WinRateCallback(arithmetic_judge(), trainer)
    finally:
        trainer.eval_dataset = saved


# LogCompletionsCallback ----------------------------------------------------------------------------------------------


def test_log_completions_at_evaluations_to_console(trainer):
    out = io.StringIO()
    callback = LogCompletionsCallback(trainer, GREEDY_3, num_prompts=2, console=Console(file=out, width=120))
    callback.on_step_end(trainer.args, state_at(2), TrainerControl())  # no freq: steps do not log
    assert callback.table == []
    callback.on_evaluate(trainer.args, state_at(2), TrainerControl())
    callback.on_evaluate(trainer.args, state_at(2), TrainerControl())  # same step: once
    assert [(step, prompt) for step, prompt, _ in callback.table] == [(2, "What is 50+51?\n"), (2, "What is 51+52?\n")]
    printed = out.getvalue()
    assert "completions at step 2" in printed and "What is 51+52?" in printed and "\x1b[" not in printed


def test_log_completions_every_freq_steps_to_wandb(trainer, monkeypatch):
    logged = []

    class FakeTable:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    fake_wandb = types.SimpleNamespace(run=object(), Table=FakeTable, log=logged.append)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    args = types.SimpleNamespace(report_to=["wandb"], per_device_eval_batch_size=4)
    callback = LogCompletionsCallback(trainer, GREEDY_3, num_prompts=2, freq=2, console=Console(file=io.StringIO()))
    for step in (1, 2, 3, 4):
        callback.on_step_end(args, state_at(step), TrainerControl())
    assert len(logged) == 2
    table = logged[-1]["completions"]
    assert table.columns == ["step", "prompt", "completion"]
    assert [row[0] for row in table.data] == [2, 2, 4, 4]  # all rows so far
    assert callback.console.file.getvalue() == ""


def test_callback_completions_are_the_rollouts(trainer, tokenizer):
    """The callbacks generate through the online trainers' rollout (rollout.generate_completions): 5 chat prompts in
    eval batches of 4 give the completions of one greedy rollout of all 5, and the table shows the prompts as
    rendered by the chat template."""
    from fusedrl.trainers.online.rollout import generate_completions

    saved = trainer.eval_dataset
    chats = [[{"role": "user", "content": f"What is {i}+{i + 1}?"}] for i in range(5)]
    trainer.eval_dataset = Dataset.from_dict({"prompt": chats})
    try:
        callback = LogCompletionsCallback(trainer, GREEDY_3, console=Console(file=io.StringIO()))
        callback.log_completions(trainer.args, state_at(1))
    finally:
        trainer.eval_dataset = saved
    rollout = generate_completions(trainer.model, tokenizer, chats, generation_config=callback.generation_config,
                                   eos_token_ids=[tokenizer.eos_token_id])
    assert trainer.args.per_device_eval_batch_size == 4
    assert [completion for _, _, completion in callback.table] == rollout.completions_text
    assert [prompt for _, prompt, _ in callback.table] == [
        f"<bos><|user|>What is {i}+{i + 1}?<eos><|assistant|>" for i in range(5)
    ]


# RichProgressCallback --------------------------------------------------------------------------------------------


def _drive_progress(callback: RichProgressCallback, main: bool = True) -> None:
    args, control = None, TrainerControl()
    callback.on_train_begin(args, state_at(0, main=main), control)
    for step in (1, 2):
        callback.on_step_end(args, state_at(step, main=main), control)
        callback.on_log(args, state_at(step, main=main), control, logs={"loss": 0.5, "rewards/chosen": 1e-7})
    for _ in range(2):
        callback.on_prediction_step(args, state_at(2, main=main), control, eval_dataloader=[0, 1])
    callback.on_evaluate(args, state_at(2, main=main), control, metrics={"eval_loss": 0.25})
    callback.on_log(args, state_at(2, main=main), control, logs={"eval_loss": 0.25})
    callback.on_step_end(args, state_at(3, main=main), control)
    callback.on_train_end(args, state_at(3, main=main), control)


def test_progress_not_a_tty_prints_plain_lines():
    out = io.StringIO()
    _drive_progress(RichProgressCallback(console=Console(file=out, width=40)))
    lines = out.getvalue().splitlines()
    assert lines == [
        "Training for 3 steps",
        "step 1/3 | loss 0.5 | rewards/chosen 1e-07",  # one line even past the 40-column width
        "step 2/3 | loss 0.5 | rewards/chosen 1e-07",
        "step 2/3 | eval_loss 0.25",
        "Training done at step 3",
    ]


def test_progress_terminal_live_display():
    out = io.StringIO()
    callback = RichProgressCallback(console=Console(file=out, force_terminal=True, width=100, color_system=None))
    assert callback.is_live
    _drive_progress(callback)
    final = out.getvalue()  # the display refreshes 4 times a second: this fast run shows only its last frame
    assert "Training" in final and "3/3" in final and "eval_loss  0.25" in final
    assert callback._display is None, "the live display must be stopped at train end"
    # trainer.evaluate() outside training: a transient display starts and stops.
    callback.on_prediction_step(None, state_at(3), TrainerControl(), eval_dataloader=[0])
    assert callback._display is not None
    callback.on_evaluate(None, state_at(3), TrainerControl())
    assert callback._display is None


def test_progress_silent_off_main_process():
    for console in (Console(file=io.StringIO()), Console(file=io.StringIO(), force_terminal=True)):
        _drive_progress(RichProgressCallback(console=console), main=False)
        assert console.file.getvalue() == ""


# A real Trainer run ------------------------------------------------------------------------------------------------


def test_trainer_run_with_all_callbacks(tokenizer, tmp_path):
    """3 steps, evaluations at step 2 and (transformers' end-of-training evaluation) 3: the win rate is logged and returned, the reference tracks the policy
    (alpha 1 every step: equal at the end), completions are tabled, progress is printed as plain lines."""
    trainer = make_trainer(tokenizer, tmp_path)
    trainer.ref_model = tiny_llama(1, **SMALL)
    out = io.StringIO()
    use_rich_progress(trainer, console=Console(file=out))
    sync = SyncRefModelCallback(trainer.ref_model, trainer.accelerator, sync_steps=1, alpha=1.0)
    win_rate = WinRateCallback(arithmetic_judge(), trainer, GREEDY_3, num_prompts=4)
    completions = LogCompletionsCallback(trainer, GREEDY_3, num_prompts=2, console=Console(file=io.StringIO()))
    for callback in (sync, win_rate, completions):
        trainer.add_callback(callback)
    trainer.train()

    assert sync.num_syncs == 3
    for (name, param), ref_param in zip(trainer.model.named_parameters(), trainer.ref_model.parameters()):
        assert torch.equal(param, ref_param), name
    logged = [entry for entry in trainer.state.log_history if "eval_win_rate" in entry]
    assert [entry["step"] for entry in logged] == [2, 3]
    assert 0.0 <= logged[0]["eval_win_rate"] <= 1.0
    assert [step for step, _, _ in completions.table] == [2, 2, 3, 3]
    assert "step 3/3 | loss" in out.getvalue()
    assert not any(
        type(cb).__name__ in ("ProgressCallback", "PrinterCallback") for cb in trainer.callback_handler.callbacks
    )
    assert "eval_win_rate" in trainer.evaluate()
