"""A character-level tokenizer built in code, so the demo and the tests need nothing from a hub.

One token per printable ASCII character (plus newline) after seven special tokens. Character level means no merges,
so a tokenized prompt is always a prefix of the tokenized prompt + completion: TRL's DPO/KTO preprocessing warns and
drops tokens when that fails, and GRPO's exact-answer reward never sees a completion split oddly across the boundary.
The vocabulary (103 tokens) is far smaller than any preset's ``vocab_size``; models pad the embedding rows up.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
# string.printable minus the rarely meaningful \t\r\x0b\x0c: 95 printable characters and newline.
CHARACTERS = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")

# Every message is "<|role|>content<eos>", the whole conversation starts with <bos>. The assistant content and its
# <eos> sit in a {% generation %} block so `return_assistant_tokens_mask=True` (SFT assistant-only loss) works.
# With add_generation_prompt the rendering ends in "<|assistant|>", a prefix of the rendering with the answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer: ids 0-6 are the special tokens, then ``CHARACTERS`` in order.

    Plain-text calls add ``<bos>`` in front (Llama convention, and what TRL's non-conversational preprocessing
    expects); chat-template calls get ``<bos>`` from the template instead. ``padding_side`` is ``"right"``, the
    training convention (TRL's collators pad on their own; generation callers pass ``padding_side="left"``).
    """
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split into single characters; special tokens are matched before pre-tokenization, so they stay whole.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
