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
from pathlib import Path

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
# "qwen-tools": Qwen's ids for the characters and for the words TRL's tool tests fake, and TRL's own Qwen 3 chat
# template (read from the installed trl at run time): what those tests need on both sides (see QWEN_WORDS).
VOCABS = {"small": SMALL_VOCAB, "qwen": QWEN_VOCAB, "qwen-tools": QWEN_VOCAB}

# The multi-character Qwen tokens of the completions TRL's GRPO tool tests fake with raw ids: each id's text is
# read off the decoded string TRL's test writes next to the id list (e.g. '<tool_call>\n{"name": "increment", ...'
# beside [151657, 198, 4913, 606, ...]). Single characters sit at Qwen's byte-level ids (_byte_level_id). Only
# decoding meets these entries: encoding stays one token per character.
QWEN_WORDS = {
    4913: '{"', 606: "name", 788: '":', 330: ' "', 497: '",', 16370: "arguments", 5212: ' {"', 11248: "}}\n",
    64648: "multiply", 22785: "_tool", 7692: "async", 93054: "_multiply", 35744: "increment", 16252: " increment",
    450: "de", 13477: "crement", 9520: "step", 927: "sh", 411: "out", 1318: "text", 6023: "hi", 95642: '"}}\n',
    17453: "Done", 1513: " don", 944: "'t", 1414: " know", 894: " any", 5392: " tool", 2765: " won",
    14172: "tool", 6659: "call", 397: ">\n", 522: "</", 314: " {", 293: " b",
}
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


def _byte_level_id(character: str) -> int:
    """The id of a one-byte character in Qwen's (GPT-2's byte-level) vocabulary: the printable bytes 33-126 come
    first (ids 0-93); the others follow the Latin-1 range, control bytes and space from id 188 on (\\n = 198)."""
    byte = ord(character)
    if 33 <= byte <= 126:
        return byte - 33
    unprintable = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
    return 188 + unprintable.index(byte)


def _vocabulary(vocab_size: int, specials: dict[str, int], qwen_words: bool) -> dict[str, int]:
    by_id = {i: token for token, i in specials.items()}
    if qwen_words:  # characters and fake-able words at Qwen's ids
        by_id.update({_byte_level_id(c): c for c in CHARACTERS})
        by_id.update({i: word for i, word in QWEN_WORDS.items() if word not in by_id.values()})
        by_id[min(specials.values()) - 1] = UNK
    else:
        by_id.update({0: UNK, **{i + 1: c for i, c in enumerate(CHARACTERS)}})
    first_special = min(specials.values())
    fillers = iter(range(vocab_size))  # numbered in order, as the vocabularies of earlier result tables
    return {by_id[i] if i in by_id else f"<|filler_{next(fillers)}|>" if i < first_special else
            f"<|reserved_{i}|>": i for i in range(vocab_size)}


def qwen3_chat_template() -> str:
    """TRL's own Qwen 3 chat template, from the installed trl (its tool-response parsing keys on this exact text)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text(encoding="utf-8")


def build_tokenizer(vocab_size: int = SMALL_VOCAB, vocab: str | None = None) -> PreTrainedTokenizerFast:
    """The stand-in tokenizer with ``vocab_size`` entries, set up as Qwen's: no BOS, EOS ``<|im_end|>``, pad
    ``<|endoftext|>``, right padding; ``vocab="qwen-tools"``: Qwen's ids for characters and QWEN_WORDS, and
    TRL's Qwen 3 chat template."""
    specials = special_ids(vocab_size)
    qwen_tools = vocab == "qwen-tools"
    vocab = _vocabulary(vocab_size, specials, qwen_tools)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token=UNK, padding_side="right", model_max_length=32768,
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = qwen3_chat_template() if qwen_tools else CHAT_TEMPLATE
    return tokenizer
