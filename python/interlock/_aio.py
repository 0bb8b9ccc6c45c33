"""asyncio forms: wait without blocking the event loop and without polling.

An acquisition first tries on the loop's thread without waiting (the
uncontended case costs no thread). If the lock is held, it drives the Rust
core's async acquisition (``interlock::Acquire``, wrapped by
``_native.AsyncWait``): its first poll hands the blocking wait to one of the
core's waiter threads, which sleeps in the kernel without the GIL; when the
wait ends, the core's waker writes a byte to a socket that the loop watches
(``add_reader``), and the task polls again to take the guard. The hold
belongs to the awaiting task, not to any thread: a task that asks again for
a lock it holds gets ``AlreadyHeld`` at once, another task waits.

Cancellation never leaves the lock held and ends the wait at once: the
cancelled task drops the core's future, which interrupts the waiter's
kernel wait (it leaves through its time-out path, giving back any partial
hold) and releases a grant that raced the cancel. The waiter thread goes back
to the core's pool; no thread or kernel wait is left behind while the lock
stays held elsewhere. See docs/design-async.md and docs/python.md.
"""

from __future__ import annotations

import asyncio
import itertools
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


async def acquire(
    lock: Any, kind: str, fn: Callable[..., Any], timeout: Optional[float], *args: Any
) -> Any:
    """Calls ``fn(*args, blocking=False)`` for the running task; if the lock
    is taken, waits for it without blocking the loop through
    ``_native._async_wait(lock, kind, timeout, *args)`` (the core's future)."""
    token = _task_token()
    try:
        return _call_as(token, fn, *args, blocking=False)
    except WouldBlock:
        if timeout == 0:
            raise
    w = _call_as(token, _native._async_wait, lock, kind, timeout, *args)
    try:
        while True:
            # The first poll starts the core's waiter; a later one, after
            # the waker's byte, takes the grant (recorded for this task).
            g = _call_as(token, w.poll)
            if g is not None:
                return g
            await _readable(w.fileno())
    except BaseException:
        # Cancelled (or failed) before the guard reached the task: dropping
        # the core's future ends its wait and releases a grant it holds.
        w.cancel()
        raise


async def _readable(fd: int) -> None:
    """Until ``fd`` is readable (the loop's selector waits for it)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        loop.remove_reader(fd)
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


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
