"""The shared-prefix forward (fusedrl/runtime/shared_prefix/): final hidden states and gradients equal the plain
layout's on awkward batches, for every supported model type and both mask forms; siblings never see each other;
unsupported models keep the plain layout with a reason."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from fusedrl.runtime.hidden import final_hidden_states
from fusedrl.runtime.shared_prefix import PrefixSharing, shared_layout, unsupported_reason, visible_SLL
from tests.helpers.models import TINY_LLAMA, tiny_llama

_SMALL = {key: TINY_LLAMA[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "max_position_embeddings")}


def _model(kind: str, implementation: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        model = tiny_llama()
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**_SMALL, sliding_window=None))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_SMALL))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**_SMALL, head_dim=12))
    elif kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**_SMALL, head_dim=12, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=32))
    else:
        raise AssertionError(kind)
    model.config._attn_implementation = implementation
    return model.eval()


def _pair_batch(padding: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """3 pairs laid out [chosen; rejected] (DPO): prompts of 29, 14 and 1 tokens, completions of 1 to 8 tokens (the
    second pair's chosen is one token), padded to 40 positions on the ``padding`` side."""
    generator = torch.Generator().manual_seed(1)
    prompts = [29, 14, 1]
    completions = [(3, 5), (1, 8), (4, 2)]
    rows = []
    for prompt_length in prompts:
        rows.append(torch.randint(3, 120, (prompt_length,), generator=generator))
    chosen = [torch.cat([rows[i], torch.randint(3, 120, (c,), generator=generator)]) for i, (c, _) in
              enumerate(completions)]
    rejected = [torch.cat([rows[i], torch.randint(3, 120, (r,), generator=generator)]) for i, (_, r) in
                enumerate(completions)]
    sequences = chosen + rejected
    length = 40
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if padding == "right" else slice(length - len(sequence), length)
        ids[row, span], mask[row, span] = sequence, 1
    return ids, mask


def _group_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO-like: 2 prompts (30 and 17 tokens, left-padded to 30) x 3 completions (right-padded to 5; one of a
    single token)."""
    generator = torch.Generator().manual_seed(2)
    prompt_ids = torch.zeros(2, 30, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for row, length in enumerate((30, 17)):
        prompt_ids[row, 30 - length:] = torch.randint(3, 120, (length,), generator=generator)
        prompt_mask[row, 30 - length:] = 1
    completion_ids = torch.randint(3, 120, (6, 5), generator=generator)
    completion_mask = torch.ones_like(completion_ids)
    for row, length in enumerate((5, 1, 3, 2, 5, 4)):
        completion_mask[row, length:] = 0
    ids = torch.cat([prompt_ids.repeat_interleave(3, 0), completion_ids * completion_mask], dim=1)
    return ids, torch.cat([prompt_mask.repeat_interleave(3, 0), completion_mask], dim=1)


def _assert_grads_close(actual: dict, expected: dict) -> None:
    """fp32 gradients summed over differently ordered positions: compared by norm (a 650-sized gradient entry carries
    ~1e-4 of rounding, which elementwise tolerances would read as an error in its small neighbours)."""
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        error = (actual[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 1e-5, (name, float(error))


def _hidden_and_grads(model, ids, mask, *, shared: bool, keep_padding: bool = False):
    model.zero_grad()
    inputs = {"input_ids": ids, "attention_mask": mask}
    if shared:
        _, hidden = PrefixSharing(True).forward(model, inputs, keep_padding=keep_padding)
    else:
        _, hidden = final_hidden_states(model, **inputs)
    positions = torch.ones_like(mask, dtype=torch.bool) if keep_padding else mask.bool()
    weights = torch.linspace(-1, 1, hidden.shape[-1])
    (hidden[positions] * weights).sum().backward()
    return hidden.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", ["pairs-right", "pairs-left", "groups-left-right"])
def test_hidden_states_and_gradients_equal_the_plain_layout(kind, implementation, batch):
    model = _model(kind, implementation)
    ids, mask = _group_batch() if batch == "groups-left-right" else _pair_batch(batch.split("-")[1])
    plain_hidden, plain_grads = _hidden_and_grads(model, ids, mask, shared=False)
    shared_hidden, shared_grads = _hidden_and_grads(model, ids, mask, shared=True)
    real = mask.bool()
    torch.testing.assert_close(shared_hidden[real], plain_hidden[real], rtol=1e-5, atol=1e-5)
    _assert_grads_close(shared_grads, plain_grads)
    layout = PrefixSharing(True).layout(model, {"input_ids": ids, "attention_mask": mask})
    if batch == "pairs-left":
        # Left-padded pairs put a prompt at different positions in its two rows: nothing is shared (exactly).
        assert layout is None
    else:
        assert layout is not None and layout.shared_tokens < layout.plain_tokens
        assert torch.all(shared_hidden[~real] == 0)  # dropped padding gathers as zeros


def test_keep_padding_reproduces_every_position():
    """ORPO's logits metric averages over padded positions too: with keep_padding they are queries (never keys)."""
    model = _model("llama")
    ids, mask = _pair_batch("right")
    plain_hidden, plain_grads = _hidden_and_grads(model, ids, mask, shared=False, keep_padding=True)
    shared_hidden, shared_grads = _hidden_and_grads(model, ids, mask, shared=True, keep_padding=True)
    torch.testing.assert_close(shared_hidden, plain_hidden, rtol=1e-5, atol=1e-5)
    _assert_grads_close(shared_grads, plain_grads)


def test_a_completion_never_sees_its_sibling():
    """Changing every token of one completion leaves its siblings' hidden states bitwise unchanged, in the same
    shared layout (same grouping, same row lengths)."""
    model = _model("llama")
    ids, mask = _group_batch()
    sharing = PrefixSharing(True)
    _, before = sharing.forward(model, {"input_ids": ids, "attention_mask": mask})
    perturbed = ids.clone()
    perturbed[1, 30:] = (perturbed[1, 30:] + 7) % 120 + 3  # completion 1 of prompt 0
    layout = shared_layout(perturbed, mask)
    assert layout.group_N.tolist() == [0, 0, 0, 1, 1, 1]
    _, after = sharing.forward(model, {"input_ids": perturbed, "attention_mask": mask})
    real = mask.bool()
    for row in (0, 2, 3, 4, 5):
        assert torch.equal(after[row][real[row]], before[row][real[row]]), row
    assert not torch.equal(after[1][real[1]], before[1][real[1]])


def test_mask_keeps_prefix_shared_and_siblings_apart():
    ids, mask = _group_batch()
    layout = shared_layout(ids, mask)
    visible = visible_SLL(layout)
    segment = layout.segment_SL
    for s in range(visible.shape[0]):
        for q in range(visible.shape[1]):
            for k in range(visible.shape[2]):
                if not visible[s, q, k]:
                    continue
                assert layout.key_SL[s, k]
                assert segment[s, k] == 0 or segment[s, k] == segment[s, q]
                assert layout.column_SL[s, k] <= layout.column_SL[s, q]


def test_group_results_do_not_depend_on_the_rest_of_the_batch():
    """A pair's hidden states are the same bits alone or batched with longer pairs (shared rows padded to 16)."""
    model = _model("llama")
    ids, mask = _pair_batch("right")
    sharing = PrefixSharing(True)
    with torch.no_grad():
        _, batched = sharing.forward(model, {"input_ids": ids, "attention_mask": mask})
        pair = [1, 4]
        _, alone = sharing.forward(model, {"input_ids": ids[pair], "attention_mask": mask[pair]})
    assert sharing.counts["trunk"] < sharing.counts["plain"]
    real = mask[pair].bool()
    assert torch.equal(batched[pair][real], alone[real])


def test_layout_groups_pairs_and_counts_tokens():
    ids, mask = _pair_batch("right")
    layout = shared_layout(ids, mask)
    assert layout.group_N.tolist() == [0, 1, 2, 0, 1, 2]
    # Each pair: its prompt once plus both completions (29 + 3 + 5 = 37 for the longest), padding dropped, rows
    # padded to a multiple of 16.
    assert layout.input_ids_SL.shape[1] == 48
    assert layout.shared_tokens == 3 * 48
    assert layout.plain_tokens == 6 * 40
    assert layout.key_SL.sum(dim=1).tolist() == [37, 23, 7]


def test_rows_with_different_keys_never_share():
    ids, mask = _pair_batch("right")
    layout = shared_layout(ids, mask, row_keys_N=torch.tensor([0, 1, 0, 1, 0, 1]))
    assert layout.group_N.tolist() == [0, 1, 2, 3, 4, 5]


def test_batch_without_shared_prefixes_keeps_the_plain_layout():
    model = _model("llama")
    ids = torch.arange(3, 3 + 4 * 30).reshape(4, 30)
    sharing = PrefixSharing(True)
    assert sharing.layout(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) is None
    _, hidden = sharing.forward(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert sharing.counts == {"plain": 120, "trunk": 120}
    torch.testing.assert_close(hidden, final_hidden_states(model, input_ids=ids)[1])


def test_counts_report_trunk_positions():
    model = _model("llama")
    ids, mask = _pair_batch("right")
    sharing = PrefixSharing(True)
    sharing.forward(model, {"input_ids": ids, "attention_mask": mask})
    assert sharing.counts == {"plain": 240, "trunk": 3 * 48}


def test_unsupported_models_are_refused_with_a_reason(caplog):
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=8))
    assert "encoder-decoder" in unsupported_reason(t5)
    flash = _model("llama")
    flash.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in unsupported_reason(flash)
    sharing = PrefixSharing(True)
    ids, mask = _pair_batch("right")
    with caplog.at_level("WARNING", logger="fusedrl"):
        assert sharing.layout(flash, {"input_ids": ids, "attention_mask": mask}) is None
    assert "shared_prefix: off" in caplog.text


def test_sliding_window_shorter_than_the_rows_keeps_the_plain_layout():
    model = MistralForCausalLM(MistralConfig(**_SMALL, sliding_window=8))
    model.config._attn_implementation = "sdpa"
    ids, mask = _pair_batch("right")  # 40 positions > window 8
    assert PrefixSharing(True).layout(model, {"input_ids": ids, "attention_mask": mask}) is None
    wide = MistralForCausalLM(MistralConfig(**_SMALL, sliding_window=40))
    wide.config._attn_implementation = "sdpa"
    assert PrefixSharing(True).layout(wide, {"input_ids": ids, "attention_mask": mask}) is not None


def test_disabled_and_extra_outputs_keep_the_plain_layout():
    model = _model("qwen3_moe")
    ids, mask = _pair_batch("right")
    assert PrefixSharing(False).layout(model, {"input_ids": ids, "attention_mask": mask}) is None
    sharing = PrefixSharing(True)
    sharing.forward(model, {"input_ids": ids, "attention_mask": mask}, output_router_logits=True)
    assert sharing.counts["trunk"] == sharing.counts["plain"]  # the router loss counts every plain token


def test_shared_prompt_prefill_samples_what_the_plain_prefill_samples():
    """generate with each distinct prompt prefilled once and its KV cache copied to its rows: the same greedy
    completions and the same first-step logits as generate's own prefill of every row."""
    from fusedrl.runtime.shared_prefix.prefill import cache_keyword, shared_prompt_cache

    model = _model("llama")
    ids, mask = _group_batch()
    prompt_ids, prompt_mask = ids[:, :30], mask[:, :30]
    cache = shared_prompt_cache(model, prompt_ids, prompt_mask)
    assert cache is not None and cache.get_seq_length() == 29
    settings = {"max_new_tokens": 6, "do_sample": False, "output_scores": True, "return_dict_in_generate": True,
                "pad_token_id": 0}
    with torch.no_grad():
        plain = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **settings)
        shared = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **settings,
                                **{cache_keyword(model): cache})
    assert torch.equal(shared.sequences, plain.sequences)
    for shared_scores, plain_scores in zip(shared.scores, plain.scores):
        torch.testing.assert_close(shared_scores, plain_scores, rtol=1e-5, atol=1e-5)
    # Distinct prompts only: nothing to share.
    assert shared_prompt_cache(model, prompt_ids[::3], prompt_mask[::3]) is None
