"""The stand-in tokenizer of every tiny model: character-level text, a ChatML chat template, Qwen's special tokens.

Two sizes. ``QWEN_VOCAB`` (151,669 entries, Qwen3's ``len(tokenizer)``) puts the special tokens at Qwen's real ids:
a few TRL tests hard-code them (a mocked ``generate`` returns ``151645`` = ``<|im_end|>`` as EOS and ``151643`` =
``<|endoftext|>`` as padding). But every vocabulary-sized step (sampling, the LM head, log-softmax) then costs 74x
more than at ``SMALL_VOCAB`` (2,048), and TRL's sampling tests take ~2 minutes each on a 2-core CPU instead of
seconds; so the small vocabulary is the default, with the special tokens in the same order at its top, and the
tests that hard-code Qwen ids are run with ``--vocab qwen``. Ordinary characters take the first ids, filler tokens
the rest, so a random model rarely samples EOS (1 in 2,048 per token), which TRL's "all completions truncated"
tests rely on. Ids of ordinary Qwen words decode to filler text here, so tests that fake a tool call with real Qwen
ids cannot parse it (they fail on trl too and are not counted).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Qwen2.5 / Qwen3 special tokens at their real ids (the named ones TRL's tests or chat handling touch); a smaller
# vocabulary keeps their offsets from the top.
QWEN_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<tool_call>": 151657, "</tool_call>": 151658, "<tool_response>": 151665, "</tool_response>": 151666,
    "<think>": 151667, "</think>": 151668,
}
QWEN_VOCAB = 151669  # len(tokenizer) of Qwen3; models get exactly as many embedding rows as the tokenizer has
SMALL_VOCAB = 2048
VOCABS = {"small": SMALL_VOCAB, "qwen": QWEN_VOCAB}
CHARACTERS = tuple(c for c in string.printable if c not in "\r\x0b\x0c")
UNK = "<|unk|>"

# ChatML, written for these stand-ins: system / user / assistant / tool turns, a tools block in the system turn, an
# assistant's tool_calls as <tool_call> JSON, Qwen3's enable_thinking=False empty think block, and {% generation %}
# around assistant text so `return_assistant_tokens_mask=True` works. Content may be a string or a list of parts.
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content -%}{%- for part in content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set has_system = messages and messages[0].role == 'system' -%}"
    "{%- if tools or has_system -%}"
    "{{ '<|im_start|>system\\n' }}{%- if has_system -%}{{ text(messages[0].content) }}{%- endif -%}"
    "{%- if tools -%}"
    "{%- if has_system -%}{{ '\\n\\n' }}{%- endif -%}"
    "{{ 'Tools you may call:\\n<tools>' }}"
    "{%- for tool in tools -%}{{ '\\n' }}{{ (tool.function if tool.function is defined else tool) | tojson }}{%- endfor -%}"
    "{{ '\\n</tools>' }}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and has_system -%}"
    "{%- elif message.role == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{%- generation -%}{{ text(message.content) }}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- set call = call.function if call.function is defined else call -%}"
    "{{ '<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}"
    "{{ call.arguments if call.arguments is string else call.arguments | tojson }}{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>' }}{%- endgeneration -%}{{ '\\n' }}"
    "{%- elif message.role == 'tool' -%}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + text(message.content) + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message.role + '\\n' + text(message.content) + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)


def special_ids(vocab_size: int) -> dict[str, int]:
    """The special tokens' ids in a vocabulary of ``vocab_size`` (Qwen's own at ``QWEN_VOCAB``)."""
    return {token: i - QWEN_VOCAB + vocab_size for token, i in QWEN_IDS.items()}


def build_tokenizer(vocab_size: int = SMALL_VOCAB) -> PreTrainedTokenizerFast:
    """The stand-in tokenizer with ``vocab_size`` entries, set up as Qwen's: no BOS, EOS ``<|im_end|>``, pad
    ``<|endoftext|>``, right padding."""
    specials = special_ids(vocab_size)
    first_special = min(specials.values())
    vocab = {UNK: 0}
    for character in CHARACTERS:
        vocab[character] = len(vocab)
    filler = 0
    while len(vocab) < first_special:
        vocab[f"<|filler_{filler}|>"] = len(vocab)
        filler += 1
    by_id = {i: token for token, i in specials.items()}
    for i in range(first_special, vocab_size):
        vocab[by_id.get(i, f"<|reserved_{i}|>")] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token=UNK, padding_side="right", model_max_length=32768,
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
