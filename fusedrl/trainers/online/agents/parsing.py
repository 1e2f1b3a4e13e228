"""Reading tool calls out of sampled completions, and the tokens that put tool results back into the conversation.

Parsing goes through transformers' ``tokenizer.parse_response`` and a response template (transformers >= 5.13's
format). A tokenizer that ships one (``tokenizer.response_template``) is used as it is. Otherwise fusedrl derives
one from the chat template, for the two tool-call markups of the common open models:

- tagged JSON (Qwen 2.5 / 3, Hermes, most ChatML templates): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
- bare JSON (Llama 3.1 / 3.2): ``{"name": ..., "parameters": {...}}`` as the whole turn.

The template's own generation prompt (what ``add_generation_prompt`` appends) anchors the parse, so the parser sees
where the assistant turn starts. Any other markup is refused with the fix (set ``tokenizer.response_template``).
A completion that does not parse (a malformed call, a truncated turn) becomes plain text, as in TRL.

Tool results are not re-tokenized with the conversation: the tokens the chat template puts around tool messages are
rendered once per call from a minimal conversation (:func:`tool_suffix_ids`) and appended to the ids so far, so the
sampled tokens stay exactly what was sampled.
"""

from __future__ import annotations

import re

from fusedrl.trainers.data.vision import attach_images, encode_vision_prompt

_PROBE_TOOL = "probe_tool"
_PROBE_CALL = [{"type": "function", "function": {"name": _PROBE_TOOL, "arguments": {"value": 7}}}]
_PROBE_USER = [{"role": "user", "content": "probe"}]
# Tokens that close an assistant turn in the templates this module knows (besides the tokenizer's EOS).
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>")


def _render(tokenizer, messages, *, tools=None, add_generation_prompt=False, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def _end_of_turn(tokenizer) -> str:
    ends = [t for t in (tokenizer.eos_token, *_END_OF_TURN) if t]
    return "(?:" + "|".join(re.escape(t) for t in dict.fromkeys(ends)) + ")"


def derived_response_template(tokenizer, chat_template_kwargs: dict | None = None) -> dict:
    """A response template for ``tokenizer``'s chat template (module docstring); ValueError naming the fix when its
    tool-call markup is not one fusedrl knows."""
    kwargs = chat_template_kwargs or {}
    with_prompt = _render(tokenizer, _PROBE_USER, add_generation_prompt=True, **kwargs)
    without = _render(tokenizer, _PROBE_USER, **kwargs)
    anchor = with_prompt[len(without):] if with_prompt.startswith(without) else ""
    call = _render(tokenizer, [*_PROBE_USER, {"role": "assistant", "content": "", "tool_calls": _PROBE_CALL}],
                   **kwargs)
    end = _end_of_turn(tokenizer)
    content = {"close_pattern": end + r"\s*", "content": "text"}
    if "<tool_call>" in call and _PROBE_TOOL in call:
        fields = {"tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True,
                                 "content": "json", "transform": {"type": "function", "function": "{content}"}},
                  "content": content}
    elif re.search(r'\{"name":\s*"' + _PROBE_TOOL + r'",\s*"parameters"', call):
        fields = {"tool_calls": {"open_pattern": r'(?=\{"name")', "close_pattern": f"(?={end}|$)",
                                 "content": "json", "repeats": True,
                                 "transform": {"type": "function",
                                               "function": {"name": "{content.name}",
                                                            "arguments": "{content.parameters}"}}},
                  "content": content}
    else:
        raise ValueError(
            "fusedrl cannot tell how this chat template writes tool calls (neither <tool_call>JSON</tool_call> nor "
            "Llama 3's bare {\"name\", \"parameters\"} JSON). Set tokenizer.response_template to a transformers "
            "response template for your model (transformers' chat response parsing docs) and pass that tokenizer "
            "as processing_class")
    template = {"defaults": {"role": "assistant"}, "fields": fields}
    if anchor:
        template["start_anchor"] = anchor
    return template


def check_tool_calling(tokenizer, chat_template_kwargs: dict | None = None) -> None:
    """TRL's refusal of a chat template that cannot render a tool-calling conversation (user -> assistant with
    tool_calls -> tool); fusedrl adds which part went missing."""
    messages = [*_PROBE_USER, {"role": "assistant", "content": "", "tool_calls": _PROBE_CALL},
                {"role": "tool", "name": _PROBE_TOOL, "content": "probe-result-42"}]
    try:
        text = _render(tokenizer, messages, **(chat_template_kwargs or {}))
    except Exception as error:  # a template that raises on the tool role  # noqa: BLE001
        missing = f"rendering it raised {type(error).__name__}: {error}"
    else:
        missing = ("the assistant's tool call" if _PROBE_TOOL not in text else
                   "the tool message" if "probe-result-42" not in text else None)
    if missing is not None:
        raise ValueError(
            "The provided chat template does not support tool calling. The template must be able to render a full "
            f"tool-calling conversation (user -> assistant with tool_calls -> tool). fusedrl: {missing} is not "
            "rendered; pass a processing_class whose chat_template renders `tool_calls` and `tool` messages")


def parse_completion(tokenizer, completion_ids: list[int], prompt_ids: list[int], tools=None) -> dict:
    """The assistant message in ``completion_ids`` (``{"role", "content"[, "tool_calls"]}``), parsed with the
    tokenizer's response template; plain decoded text when it does not parse. ``content`` is always a string."""
    try:
        parsed = tokenizer.parse_response(completion_ids, prefix=prompt_ids, tools=tools)
        if parsed is None:
            raise ValueError("nothing parsed")
        calls = parsed.get("tool_calls")
        if calls is not None and not all(isinstance(c, dict) and isinstance(c.get("function", c), dict)
                                         and isinstance(c.get("function", c).get("name"), str) for c in calls):
            raise ValueError("tool call without a name")
    except (ValueError, TypeError, KeyError):  # a malformed call: train on it as the text it is
        return {"role": "assistant", "content": tokenizer.decode(completion_ids, skip_special_tokens=True)}
    content = parsed.get("content")
    if isinstance(content, str) and tokenizer.eos_token:
        content = content.removesuffix(tokenizer.eos_token)
    parsed["content"] = content or ""
    return parsed


def _probe_turns(tool_messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """A user turn, and it followed by an assistant turn calling the first tool message's tool."""
    call = [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]
    user = [{"role": "user", "content": "dummy"}]
    return user, [*user, {"role": "assistant", "content": "", "tool_calls": call}]


def _suffix_start(prefix: list[int], full: list[int], eos: int | None, user_ids) -> int:
    """Where the tool results start in ``full`` (the probe turn, the tool messages, the generation prompt) given
    ``prefix`` (the probe turn alone) and ``user_ids()`` (the user turn alone, rendered only when needed): the rules
    of :func:`tool_suffix_ids`."""
    eos_positions = [i for i, token in enumerate(prefix) if token == eos]
    if eos_positions:
        prefix = prefix[:eos_positions[-1] + 1]
    if full[:len(prefix)] == prefix:
        return len(prefix)
    user_turns = list(user_ids()).count(eos)
    full_eos = [i for i, token in enumerate(full) if token == eos]
    if eos is None or len(full_eos) <= user_turns:
        raise ValueError("the chat template renders an assistant tool-call turn differently once tool messages follow "
                         "it, and its turns do not end with the tokenizer's EOS, so fusedrl cannot tell where the "
                         "tool results start; pass a processing_class whose chat_template keeps earlier turns "
                         "unchanged (prefix-preserving)")
    return full_eos[user_turns] + 1


def tool_suffix_ids(tokenizer, tool_messages: list[dict], *, chat_template_kwargs: dict | None = None) -> list[int]:
    """The tokens the chat template puts after an assistant tool-call turn: the tool messages and the next
    generation prompt, read off a minimal conversation rendered with and without them.

    The assistant turn is cut after its EOS (ChatML templates render ``<|im_end|>\\n``; the sampled completion ends
    at ``<|im_end|>``). Templates that render the assistant turn differently once it is no longer the last one (Qwen
    3 writes an empty think block only into the last turn) are not prefix-preserving; for those the turn ends at
    the EOS that closes it, counted from the user turn's."""
    user, turn = _probe_turns(tool_messages)
    kwargs = {"tokenize": True, "return_dict": False, **(chat_template_kwargs or {})}
    prefix = list(tokenizer.apply_chat_template(turn, add_generation_prompt=False, **kwargs))
    full = list(tokenizer.apply_chat_template(turn + tool_messages, add_generation_prompt=True, **kwargs))
    start = _suffix_start(prefix, full, tokenizer.eos_token_id,
                          lambda: tokenizer.apply_chat_template(user, add_generation_prompt=False, **kwargs))
    return full[start:]


def tool_suffix_with_images(processor, tool_messages: list[dict], *, chat_template_kwargs: dict | None = None
                            ) -> tuple[list[int], dict]:
    """:func:`tool_suffix_ids` for tool results holding images, rendered by a vision-language model's processor (its
    image tokens expanded to the images' sizes): ``(ids, VisionRow)`` of the suffix, its per-image fields those of
    the results' images and its per-token fields one per suffix token (``data.vision``)."""
    user, turn = (attach_images(messages) for messages in _probe_turns(tool_messages))
    tool_messages = [attach_images([message])[0] for message in tool_messages]
    kwargs = {"chat_template_kwargs": chat_template_kwargs, "add_generation_prompt": False}
    prefix, _ = encode_vision_prompt(processor, turn, **kwargs)
    full, row = encode_vision_prompt(processor, turn + tool_messages, **{**kwargs, "add_generation_prompt": True})
    start = _suffix_start(prefix, full, processor.tokenizer.eos_token_id,
                          lambda: encode_vision_prompt(processor, user, **kwargs)[0])
    return full[start:], {"images": row["images"], "tokens": {key: value[start:] for key, value in
                                                             row["tokens"].items()}}
