"""fusedrl.trainers.online.rollout: prompt tokenization and truncation, padding, completion masks, generation on the tiny
preset model (layout of num_generations, left padding, KV cache, restored training state)."""

from __future__ import annotations

import pytest
import torch

from fusedrl.cli import presets
from fusedrl.trainers.online.rollout import (
    completion_mask_after_eos,
    generate_completions,
    pad_sequences,
    tokenize_prompts,
)

TOKENIZER = presets.build_tokenizer()
EOS = TOKENIZER.eos_token_id
PAD = TOKENIZER.pad_token_id


@pytest.fixture(scope="module")
def model():
    return presets.load_preset_model("tiny", seed=0, tokenizer=TOKENIZER)


def _ids(text: str) -> list[int]:
    return TOKENIZER(text)["input_ids"]


def test_truncation_keeps_the_last_tokens():
    """"<bos>12+34=" is 7 tokens; max_prompt_length=4 keeps "+34=" (the end, where the question is)."""
    (ids,) = tokenize_prompts(TOKENIZER, ["12+34="], max_prompt_length=4)
    assert ids == _ids("12+34=")[-4:]
    assert TOKENIZER.decode(ids) == "+34="
    (whole,) = tokenize_prompts(TOKENIZER, ["12+34="], max_prompt_length=None)
    assert whole == _ids("12+34=") and len(whole) == 7
    (fits,) = tokenize_prompts(TOKENIZER, ["12+34="], max_prompt_length=7)
    assert fits == whole


def test_truncation_error_mode_names_the_row():
    with pytest.raises(ValueError, match=r"prompt 1 has 7 tokens, more than max_prompt_length=5"):
        tokenize_prompts(TOKENIZER, ["1+2=", "12+34="], max_prompt_length=5, prompt_truncation="error")
    with pytest.raises(ValueError, match="prompt_truncation must be one of"):
        tokenize_prompts(TOKENIZER, ["1+2="], prompt_truncation="keep_start")
    with pytest.raises(ValueError, match="prompt 0 is a int"):
        tokenize_prompts(TOKENIZER, [3])


def test_conversational_prompts_use_the_chat_template():
    (ids,) = tokenize_prompts(TOKENIZER, [[{"role": "user", "content": "1+2="}]])
    assert TOKENIZER.decode(ids) == "<bos><|user|>1+2=<eos><|assistant|>"


def test_padding_sides():
    ids, mask = pad_sequences([[5, 6, 7], [8]], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], 0, side="right", pad_to_multiple_of=4)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]] and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_completion_mask_runs_through_the_first_eos():
    """EOS = 2: [7, 2, 9, 2] -> the first EOS at 1 is kept: [1, 1, 0, 0]; no EOS -> all ones; EOS first -> [1, 0...]."""
    ids = torch.tensor([[7, 2, 9, 2], [7, 8, 9, 10], [2, 5, 5, 5]])
    assert completion_mask_after_eos(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    # Several EOS ids: whichever comes first ends the completion.
    assert completion_mask_after_eos(ids, [9, 2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


def test_generation_layout_masks_and_texts(model):
    prompts = ["3+4=", "12-5=", "19+19="]
    torch.manual_seed(0)
    rollout = generate_completions(model, TOKENIZER, prompts, num_generations=2, max_completion_length=6,
                                   temperature=1.0)
    assert rollout.prompts == ["3+4=", "3+4=", "12-5=", "12-5=", "19+19=", "19+19="]
    # Left padding: every prompt ends at the last column; the shortest one has pad on its left.
    assert rollout.prompt_mask[:, -1].all()
    assert rollout.prompt_mask[0].tolist() == [0, 0] + [1] * 5
    assert rollout.prompt_ids[0, :2].tolist() == [PAD, PAD]
    assert rollout.prompt_ids[0, 2:].tolist() == _ids("3+4=")
    # Each row: mask through the first EOS, pad after it, truncated iff no EOS was sampled.
    for row in range(6):
        ids, mask = rollout.completion_ids[row], rollout.completion_mask[row]
        kept = ids[mask.bool()].tolist()
        assert kept == rollout.completion_ids_list[row]
        assert (ids[~mask.bool()] == PAD).all()
        assert (EOS in kept) == (not rollout.is_truncated[row])
        if EOS in kept:
            assert kept.index(EOS) == len(kept) - 1
        else:
            assert len(kept) == 6
        text = TOKENIZER.decode(kept, skip_special_tokens=True)
        assert rollout.completions_text[row] == text == rollout.completions[row]
    assert rollout.completion_ids.shape[1] == max(len(ids) for ids in rollout.completion_ids_list)
    assert rollout.input_ids.shape == (6, rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1])


def test_generation_is_reproducible_and_conversational_completions_are_messages(model):
    prompts = [[{"role": "user", "content": "2+2="}]]
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(generate_completions(model, TOKENIZER, prompts, num_generations=3, max_completion_length=5))
    assert torch.equal(outs[0].completion_ids, outs[1].completion_ids)
    assert outs[0].prompts_text == ["<bos><|user|>2+2=<eos><|assistant|>"] * 3
    assert outs[0].completions == [[{"role": "assistant", "content": t}] for t in outs[0].completions_text]


def test_left_padded_greedy_generation_matches_each_prompt_alone(model):
    """Padding must not change what a prompt generates: greedy completions of a batch with prompts of 5, 6 and 7
    tokens equal those of each prompt generated on its own."""
    prompts = ["1+1=", "10+1=", "10+10="]
    batch = generate_completions(model, TOKENIZER, prompts, max_completion_length=5, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = generate_completions(model, TOKENIZER, [prompt], max_completion_length=5, do_sample=False)
        assert batch.completion_ids_list[row] == alone.completion_ids_list[0]


def test_generation_uses_the_kv_cache_and_restores_training_state(model):
    """Under gradient checkpointing in training mode, generation still decodes one token per step (KV cache) and
    the model is back in training mode with checkpointing on afterwards."""
    model.gradient_checkpointing_enable()
    model.train()
    widths = []
    handle = model.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(
        kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"].shape[1]),
        with_kwargs=True)
    try:
        generate_completions(model, TOKENIZER, ["3+4="], max_completion_length=4, eos_token_ids=[EOS],
                             generation_kwargs={"min_new_tokens": 4})
    finally:
        handle.remove()
    assert widths == [5, 1, 1, 1]  # the prompt, then one new token per step
    assert model.training
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    model.gradient_checkpointing_disable()


def test_bad_generation_arguments():
    tiny = presets.load_preset_model("tiny", seed=0, tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="num_generations must be >= 1"):
        generate_completions(tiny, TOKENIZER, ["1+1="], num_generations=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate_completions(tiny, TOKENIZER, ["1+1="], temperature=0.0)
    with pytest.raises(ValueError, match="mix strings and chat-message lists"):
        generate_completions(tiny, TOKENIZER, ["1+1=", [{"role": "user", "content": "2+2="}]])
