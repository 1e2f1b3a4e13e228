"""Running the tool calls of one turn, as TRL 1.16's GRPO tool loop runs them.

Each rollout has its own tools (the standalone ``tools`` plus its environment's methods), looked up by function
name. A call's result becomes a ``{"role": "tool", "name", "content"}`` message: ``str(result)``, or a list of
content parts as returned. A failure (an unknown tool, wrong arguments, an exception inside the tool, a call type
other than ``function``) does not stop the rollout: the model sees ``{'error': '<message>'}`` and the failure is
counted (``tools/failure_frequency``). Async tools of one rollout run concurrently on the trainer's event loop.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import NamedTuple


class ToolResults(NamedTuple):
    """The tool messages answering one assistant turn, in call order, and how many calls there were / failed."""

    messages: list[dict]
    num_calls: int
    num_failures: int


def tools_by_name(tools: list[Callable]) -> dict[str, Callable]:
    """``{function name: tool}``; two tools of one rollout under one name would make calls ambiguous."""
    named: dict[str, Callable] = {}
    for tool in tools:
        name = tool.__name__
        if name in named and named[name] is not tool:
            raise ValueError(f"two tools are named {name!r} (a standalone tool and an environment method, or two "
                             "environment methods); rename one, since the model calls tools by name")
        named[name] = tool
    return named


def _call_error(call: dict) -> str | None:
    if call.get("type", "function") != "function":
        return f"Unsupported tool call type: {call.get('type')}"
    return None


def run_tool_calls(calls: list[dict], tools: dict[str, Callable], async_loop=None) -> ToolResults:
    """Run one assistant turn's ``calls`` (``[{"type": "function", "function": {"name", "arguments"}}]``)."""
    results: list[tuple[str, object] | None] = [None] * len(calls)
    failures = 0
    pending = []  # (index, name, coroutine) of async tools
    for index, call in enumerate(calls):
        function = call.get("function", call)
        name = function.get("name", "unknown")
        error = _call_error(call)
        if error is None and name not in tools:
            error = f"Tool {name} not found."
        if error is None:
            try:
                output = tools[name](**(function.get("arguments") or {}))
            except Exception as exception:  # the model's call is wrong; it learns from the error  # noqa: BLE001
                error = str(exception)
            else:
                if inspect.iscoroutine(output):
                    pending.append((index, name, output))
                    continue
                results[index] = (name, output)
        if error is not None:
            failures += 1
            results[index] = (name, {"error": error})
    if pending:
        if async_loop is None:
            raise RuntimeError("an async tool was called but the trainer has no event loop for it")

        async def gather():
            return await asyncio.gather(*(coroutine for _, _, coroutine in pending), return_exceptions=True)

        for (index, name, _), output in zip(pending, asyncio.run_coroutine_threadsafe(gather(), async_loop).result(),
                                            strict=True):
            if isinstance(output, Exception):
                failures += 1
                output = {"error": str(output)}
            results[index] = (name, output)
    messages = [{"role": "tool", "name": name, "content": output if isinstance(output, list) else str(output)}
                for name, output in results]
    return ToolResults(messages, len(calls), failures)


def has_image_results(messages: list[dict]) -> bool:
    """Whether a tool returned an image (a ``{"type": "image"}`` content block), which a vision-language model's
    processor renders into image tokens with their own image fields."""
    return any(isinstance(message.get("content"), list) and any(
        isinstance(block, dict) and block.get("type") == "image" for block in message["content"])
        for message in messages)
