"""Counting semaphores: ``Semaphore`` (shared memory) and ``FileSemaphore``.

The permits are the Rust library's (``interlock::Semaphore``,
``interlock::FileSemaphore``); this module adds the asyncio forms and the
decorator. ``async with sem:`` takes one permit for the running task; the
wait is ``_aio``'s (the core's async acquisition: a waiter thread blocks in
the kernel, no polling) and a cancelled acquisition ends its wait at once,
never leaving a permit held.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, Callable, Optional, TypeVar

from . import _aio, _native
from ._native import Guard

F = TypeVar("F", bound=Callable[..., Any])


class _AsyncPermits:
    """``acquire_async``, ``async with sem:`` and the decorator."""

    _take: Callable[..., Guard]

    def acquire_async(self, n: int = 1, timeout: Optional[float] = None) -> _aio.Pending:
        """``await`` it for a Guard of ``n`` permits, or ``async with`` it."""
        return _aio.Pending(lambda: _aio.acquire(self, "permits", self._take, timeout, n))

    def _task_guards(self) -> list[Guard]:
        tasks = self.__dict__.get("_interlock_tasks")
        if tasks is None:
            tasks = self.__dict__["_interlock_tasks"] = weakref.WeakKeyDictionary()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("async with a semaphore must run inside an asyncio task")
        return tasks.setdefault(task, [])

    async def __aenter__(self) -> Any:
        guards = self._task_guards()
        guards.append(await _aio.acquire(self, "permits", self._take, None, 1))
        return self

    async def __aexit__(self, *exc: Any) -> bool:
        guards = self._task_guards()
        if guards:
            g = guards.pop()
            if g.held:
                g.release()
        return False

    def __call__(self, func: F) -> F:
        """Decorator: run ``func`` holding one permit."""
        from . import _decorate

        return _decorate(self._take, self.acquire_async, func)


class Semaphore(_AsyncPermits, _native.Semaphore):
    """N permits in shared memory, shared by the threads and processes of a
    host (named and pickled by name, or anonymous and inherited by fork); a
    dead holder's permits are reclaimed."""


class FileSemaphore(_AsyncPermits, _native.FileSemaphore):
    """N permits as N bytes of a lock file (OFD write locks); a dead holder's
    permits return with its kernel locks."""
