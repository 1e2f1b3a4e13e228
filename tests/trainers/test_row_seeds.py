"""fusedrl.trainers.online.row_seeds (``rank_invariant_sampling=True``): each row samples from its own stream, so its
completion does not depend on the batch it shares or on the global RNG; the Gumbel-max draw is a sample of the warped
softmax; seeds are laid out so that process p's rows are the rows p * n.. of one process with the whole batch.
The 2-process parity runs are tests/runtime/test_distributed_online.py; here one process, the tiny preset model.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig

from fusedrl.cli import presets
from fusedrl.trainers.online import rollout as rollout_module
from fusedrl.trainers.online.rollout import generate_completions
from fusedrl.trainers.online.row_seeds import RowSeededSampling, RowSeedSchedule, row_seed, row_seeded_generation

TOKENIZER = presets.build_tokenizer()
PROMPTS = ["1+1=", "10+1=", "10+10=", "7-3=", "12+30=", "5+5="]


@pytest.fixture(scope="module")
def model():
    return presets.load_preset_model("tiny", seed=0, tokenizer=TOKENIZER)


def _sample(model, prompts, seeds, **kwargs):
    settings = {"max_completion_length": 6, "temperature": 0.9, "top_k": 20, "top_p": 0.95, **kwargs}
    return generate_completions(model, TOKENIZER, prompts, row_seeds=seeds, **settings).completion_ids_list


def test_a_rows_completion_depends_on_its_seed_only(model):
    """The 6 rows sampled together equal rows 0-2 and 3-5 sampled as two batches (other padding, other neighbours),
    whatever the global RNG holds; other seeds give other completions."""
    seeds = [row_seed(0, "train", 0, 0, row) for row in range(6)]
    torch.manual_seed(1)
    together = _sample(model, PROMPTS, seeds)
    torch.manual_seed(2)
    first = _sample(model, PROMPTS[:3], seeds[:3])
    torch.manual_seed(3)
    second = _sample(model, PROMPTS[3:], seeds[3:])
    assert together == first + second
    assert _sample(model, PROMPTS, [seed + 1 for seed in seeds]) != together


def test_top_k_one_is_greedy(model):
    """With every token but the most likely filtered out by the warpers, the seeded draw is greedy decoding."""
    seeded = _sample(model, PROMPTS, list(range(6)), top_k=1, top_p=1.0)
    greedy = generate_completions(model, TOKENIZER, PROMPTS, max_completion_length=6, do_sample=False)
    assert seeded == greedy.completion_ids_list


def test_gumbel_max_draws_the_softmax():
    """4000 rows, one draw each, of logits [ln 0.5, ln 0.3, ln 0.2, -inf]: frequencies within 4 standard errors of
    (0.5, 0.3, 0.2), the filtered token never drawn."""
    num_rows = 4000
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    scores = probs.log().expand(num_rows, 4).clone()
    picks = RowSeededSampling([row_seed(5, row) for row in range(num_rows)])(None, scores).argmax(-1)
    counts = torch.bincount(picks, minlength=4).float() / num_rows
    assert counts[3] == 0
    for p, share in zip(probs[:3].tolist(), counts[:3].tolist(), strict=True):
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / num_rows), (p, share)


def test_schedule_lays_out_global_rows():
    """Process 1 of 2 with 3 rows gets the seeds of rows 3-5 of one process with 6; a second round at the same step
    and the next step draw new seeds; the round count restarts at each step (what a resumed run recomputes) and is
    kept per stream."""
    whole = RowSeedSchedule(0).next(mode="train", global_step=4, process_index=0, num_rows=6)
    assert RowSeedSchedule(0).next(mode="train", global_step=4, process_index=1, num_rows=3) == whole[3:]
    schedule = RowSeedSchedule(0)
    first = schedule.next(mode="train", global_step=4, process_index=0, num_rows=6)
    second = schedule.next(mode="train", global_step=4, process_index=0, num_rows=6)
    later = schedule.next(mode="train", global_step=5, process_index=0, num_rows=6)
    assert first == whole and len({*first, *second, *later}) == 18
    # Another stream (a joint run's second adapter) counts its own rounds: its first round draws the step's first.
    assert schedule.next(mode="train", global_step=5, process_index=0, num_rows=6, stream="b/") == later
    assert RowSeedSchedule(0).next(mode="eval", global_step=4, process_index=0, num_rows=6) != whole
    assert RowSeedSchedule(1).next(mode="train", global_step=4, process_index=0, num_rows=6) != whole


def test_greedy_configs_pass_through_and_errors_name_the_fix(model):
    greedy = GenerationConfig(do_sample=False, max_new_tokens=3)
    config, processors = row_seeded_generation(greedy, model, [0], torch.device("cpu"))
    assert config is greedy and processors is None
    with pytest.raises(ValueError, match="cannot drive beam search"):
        row_seeded_generation(GenerationConfig(do_sample=True, num_beams=2), model, [0], torch.device("cpu"))
    with pytest.raises(ValueError, match="row_seeds has 2 seeds for 3 rows"):
        _sample(model, PROMPTS[:3], [0, 1])


def test_sharded_models_generate_in_step(model, monkeypatch):
    """A model with a partitioned parameter (ZeRO-3's ds_id; FSDP2 DTensors alike) generates with synced_gpus=True
    on several processes, so a process whose rows ended keeps joining the others' collective forwards; a whole
    model leaves transformers' default."""
    calls = []

    def fake_generate(input_ids, attention_mask, generation_config, logits_processor, synced_gpus):
        calls.append(synced_gpus)
        return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), TOKENIZER.eos_token_id)], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    monkeypatch.setattr(rollout_module.torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(rollout_module.torch.distributed, "get_world_size", lambda: 2)
    generate_completions(model, TOKENIZER, PROMPTS[:1], max_completion_length=2)
    monkeypatch.setattr(model.lm_head.weight, "ds_id", 0, raising=False)
    generate_completions(model, TOKENIZER, PROMPTS[:1], max_completion_length=2)
    assert calls == [None, True]
