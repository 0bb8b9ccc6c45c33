"""asyncio forms: wait without blocking the event loop and without polling.

An acquisition first tries on the loop's thread without waiting (the
uncontended case costs no thread). If the lock is held, a helper thread makes
the blocking call (which waits in the kernel, without the GIL) and hands the
guard to the loop with ``call_soon_threadsafe``. The hold belongs to the
awaiting task, not to either thread: a task that asks again for a lock it
holds gets ``AlreadyHeld`` at once, another task waits.

Cancellation never leaves the lock held: if the task is cancelled before the
guard reaches it, the guard is released on the loop as soon as it arrives (or
at once, if it had arrived); the helper's wait ends when the lock comes free
or its timeout passes.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import weakref
from collections.abc import Awaitable, Generator
from typing import Any, Callable, Optional

from . import _native
from ._errors import WouldBlock

_tokens: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_next = itertools.count(1)
_TASK_BIT = 1 << 62


def _task_token() -> int:
    """The holder number of the running task (one per task, never reused)."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("interlock's async forms must run inside an asyncio task")
    tok = _tokens.get(task)
    if tok is None:
        tok = _TASK_BIT | next(_next)
        _tokens[task] = tok
    return tok


def _call_as(token: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    prev = _native._hold_as(token)
    try:
        return fn(*args, **kwargs)
    finally:
        _native._hold_as(prev)


async def acquire(fn: Callable[..., Any], timeout: Optional[float], *args: Any) -> Any:
    """Calls ``fn(*args, blocking=..., timeout=...)`` for the running task."""
    token = _task_token()
    try:
        return _call_as(token, fn, *args, blocking=False)
    except WouldBlock:
        if timeout == 0:
            raise
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def deliver(guard: Any, exc: Optional[BaseException]) -> None:
        if fut.cancelled():
            if guard is not None:
                guard.release()
        elif exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(guard)

    def wait() -> None:
        try:
            guard = _call_as(token, fn, *args, blocking=True, timeout=timeout)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            try:
                loop.call_soon_threadsafe(deliver, None, e)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting
            return
        try:
            loop.call_soon_threadsafe(deliver, guard, None)
        except RuntimeError:
            guard.release()  # the loop is closed: nobody will take it

    threading.Thread(target=wait, name="interlock-async-wait", daemon=True).start()
    try:
        return await fut
    except asyncio.CancelledError:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            fut.result().release()
        raise


class Pending(Awaitable[Any]):
    """An acquisition to ``await`` (giving the guard) or to ``async with``."""

    __slots__ = ("_start", "_guard")

    def __init__(self, start: Callable[[], Awaitable[Any]]) -> None:
        self._start = start
        self._guard: Any = None

    def __await__(self) -> Generator[Any, None, Any]:
        return self._start().__await__()

    async def __aenter__(self) -> Any:
        self._guard = await self._start()
        return self._guard

    async def __aexit__(self, *exc: Any) -> bool:
        g, self._guard = self._guard, None
        if g is not None and g.held:
            g.release()
        return False
