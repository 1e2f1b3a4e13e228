"""Async reward functions (``async def``, or an object whose ``__call__`` is async), as TRL 1.16 runs them: the
batch's async functions are awaited together (``asyncio.gather``) on an event loop that runs in a daemon thread and
lives as long as its owner (the trainer).

Why a thread of its own rather than ``asyncio.run`` per batch: ``asyncio.run`` raises inside a thread whose loop is
already running (a Jupyter cell, an async application), and a loop that outlives the batch keeps the clients a
reward function caches (an ``httpx.AsyncClient`` of an LLM judge) bound to one loop across batches.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def is_async_callable(func: Callable) -> bool:
    """Whether calling ``func`` returns a coroutine: an ``async def`` function, a ``functools.partial`` of one, or an
    object whose ``__call__`` is ``async`` (TRL's ``is_async_callable``; ``inspect.iscoroutinefunction`` alone
    misses the last)."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)
        if not thread.is_alive():
            loop.close()


class BackgroundEventLoop:
    """An asyncio event loop running forever in a daemon thread; stopped by :meth:`close`, when this object is
    garbage-collected, or at interpreter exit, whichever comes first."""

    def __init__(self, name: str = "fusedrl-async-rewards"):
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:  # must not reference self: the thread would keep this object alive forever
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self.loop = loop
        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()
        ready.wait()
        self._finalizer = weakref.finalize(self, _stop, loop, self.thread)

    def close(self) -> None:
        self._finalizer()


def run_coroutine(coroutine: Coroutine, loop: asyncio.AbstractEventLoop | None = None) -> Any:
    """The result of ``coroutine``, run on ``loop`` (a loop running in another thread, e.g.
    :class:`BackgroundEventLoop`'s) and waited for; without a loop, on a fresh loop in a worker thread (works where
    the calling thread already runs a loop)."""
    if loop is not None:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusedrl-async-rewards") as pool:
        return pool.submit(asyncio.run, coroutine).result()
