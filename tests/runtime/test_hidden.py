"""runtime.hidden.head_input_forward: the hidden states a model hands its LM head, caught without building its logits.

- T5 with and without its d_model**-0.5 decoder scaling: the head applied to the caught tensor gives the model's own
  logits bitwise, while the forward only projected the last position (``[N, 1, V]``);
- through a PEFT wrapper the caught tensor is the same, and no hook outlives the call;
- on a causal LM it equals the trunk hook's final hidden states (the two catch points agree where no scaling sits
  between them);
- a model without an LM head is refused by name.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import T5EncoderModel

from fusedrl.runtime.hidden import final_hidden_states, head_input_forward
from tests.helpers.models import TINY_T5, tiny_llama, tiny_t5

# Odd sizes on purpose: 3 rows, 7 prompt positions, 5 decoder positions.
INPUT_IDS = torch.randint(7, 100, (3, 7), generator=torch.Generator().manual_seed(1))
DECODER_INPUT_IDS = torch.randint(7, 100, (3, 5), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("scaled", [True, False], ids=["scaled-head", "unscaled-head"])
def test_t5_head_input_gives_the_models_logits(scaled):
    model = tiny_t5(tie_word_embeddings=scaled).eval()
    assert model.config.scale_decoder_outputs == scaled
    with torch.no_grad():
        expected = model(input_ids=INPUT_IDS, decoder_input_ids=DECODER_INPUT_IDS, use_cache=False).logits
        outputs, hidden = head_input_forward(model, input_ids=INPUT_IDS, decoder_input_ids=DECODER_INPUT_IDS)
        assert hidden.shape == (3, 5, TINY_T5["d_model"])
        assert outputs.logits.shape == (3, 1, TINY_T5["vocab_size"])
        assert torch.equal(model.lm_head(hidden), expected)
        # The decoder's own output differs from the head's input exactly by the scaling.
        trunk = model.decoder(input_ids=DECODER_INPUT_IDS,
                              encoder_hidden_states=model.encoder(input_ids=INPUT_IDS).last_hidden_state)
        factor = TINY_T5["d_model"] ** -0.5 if scaled else 1.0
        torch.testing.assert_close(hidden, trunk.last_hidden_state * factor, rtol=0, atol=0)


def test_peft_wrapper_and_hook_removal():
    model = tiny_t5().eval()
    with torch.no_grad():
        _, plain = head_input_forward(model, input_ids=INPUT_IDS, decoder_input_ids=DECODER_INPUT_IDS)
        wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q", "v"], lora_dropout=0.0))
        _, through_peft = head_input_forward(wrapped, input_ids=INPUT_IDS, decoder_input_ids=DECODER_INPUT_IDS)
    assert torch.equal(through_peft, plain)  # LoRA's B starts at zero: the same function
    assert not model.lm_head._forward_pre_hooks


def test_causal_lm_head_input_is_the_final_hidden_state():
    model = tiny_llama().eval()
    with torch.no_grad():
        _, expected = final_hidden_states(model, input_ids=INPUT_IDS)
        outputs, hidden = head_input_forward(model, input_ids=INPUT_IDS)
    assert torch.equal(hidden, expected) and outputs.logits.shape[1] == 1


def test_model_without_head_is_refused():
    encoder = T5EncoderModel(tiny_t5().config)
    with pytest.raises(ValueError, match="T5EncoderModel exposes no LM head"):
        head_input_forward(encoder, input_ids=INPUT_IDS)
