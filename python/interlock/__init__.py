"""interlock: locks across threads, processes and machines.

The lock logic is interlock's Rust library (``interlock._native``); this
package adds what is easiest to read in Python: decorators, asyncio forms,
index arguments of lock sets. See docs/python.md for the whole contract.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple, Optional, TypeVar, Union

from . import _aio, _native
from ._errors import (
    AlreadyHeld,
    Deadlock,
    LeaseLost,
    LockError,
    OwnerDied,
    Timeout,
    WouldBlock,
)
from ._native import Guard
from ._pg import PgLock, PgMutex
from ._sem import FileSemaphore, Semaphore

__all__ = [
    "AlreadyHeld",
    "Deadlock",
    "FileLock",
    "FileSemaphore",
    "Guard",
    "Holder",
    "LeaseLock",
    "LeaseLost",
    "LockError",
    "LockSet",
    "OwnerDied",
    "PgLock",
    "PgMutex",
    "Semaphore",
    "ShmMutex",
    "ShmRwLock",
    "Timeout",
    "WouldBlock",
    "holders",
]

__version__ = "0.1.0"

F = TypeVar("F", bound=Callable[..., Any])


def _decorate(take: Callable[[], Any], take_async: Callable[[], Any], func: F) -> F:
    """``func`` run holding the lock (``take()`` gives a held guard)."""
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            async with take_async():
                return await func(*args, **kwargs)

        return run_async  # type: ignore[return-value]

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        with take():
            return func(*args, **kwargs)

    return run  # type: ignore[return-value]


class FileLock(_native.FileLock):
    """A reader-writer lock on a file, shared by threads and processes."""

    def __call__(self, func: F) -> F:
        """Decorator: run ``func`` holding the lock exclusively."""
        return _decorate(self.write, self.write_async, func)

    def write_async(self, timeout: Optional[float] = None) -> _aio.Pending:
        """``await`` it for the exclusive lock, or ``async with`` it."""
        return _aio.Pending(lambda: _aio.acquire(self, "write", self.write, timeout))

    def read_async(self, timeout: Optional[float] = None) -> _aio.Pending:
        """``await`` it for a shared lock, or ``async with`` it."""
        return _aio.Pending(lambda: _aio.acquire(self, "read", self.read, timeout))

    def upgradable_read_async(self, timeout: Optional[float] = None) -> _aio.Pending:
        """``await`` it for the upgradable lock, or ``async with`` it."""
        return _aio.Pending(
            lambda: _aio.acquire(self, "upgradable_read", self.upgradable_read, timeout)
        )


class ShmRwLock(_native.ShmRwLock):
    """A reader-writer lock in shared memory (named, or anonymous and inherited by fork)."""

    def __call__(self, func: F) -> F:
        """Decorator: run ``func`` holding the lock exclusively."""
        return _decorate(self.write, self.write_async, func)

    def write_async(self, timeout: Optional[float] = None) -> _aio.Pending:
        return _aio.Pending(lambda: _aio.acquire(self, "write", self.write, timeout))

    def read_async(self, timeout: Optional[float] = None) -> _aio.Pending:
        return _aio.Pending(lambda: _aio.acquire(self, "read", self.read, timeout))

    def upgradable_read_async(self, timeout: Optional[float] = None) -> _aio.Pending:
        return _aio.Pending(
            lambda: _aio.acquire(self, "upgradable_read", self.upgradable_read, timeout)
        )


class ShmMutex(_native.ShmMutex):
    """A mutex in shared memory (named, or anonymous and inherited by fork)."""

    def __call__(self, func: F) -> F:
        """Decorator: run ``func`` holding the mutex."""
        return _decorate(self.lock, self.lock_async, func)

    def lock_async(self, timeout: Optional[float] = None) -> _aio.Pending:
        return _aio.Pending(lambda: _aio.acquire(self, "lock", self.lock, timeout))


class LeaseLock(_native.LeaseLock):
    """An exclusive lease on a lock directory, with a fencing token."""

    def __call__(self, func: F) -> F:
        """Decorator: run ``func`` holding the lease."""
        return _decorate(self.lock, self.lock_async, func)

    def lock_async(self, timeout: Optional[float] = None) -> _aio.Pending:
        return _aio.Pending(lambda: _aio.acquire(self, "lock", self.lock, timeout))


Indices = Union[int, range, slice, "tuple[int, int]"]
INDEX_END: int = _native.INDEX_END


def _span(indices: Indices) -> tuple[int, int]:
    """``int | range | slice(a, b) | (a, b)`` as a half-open (start, end)."""
    if isinstance(indices, bool):
        raise TypeError("indices must be an int, a range, a slice or a (start, end) pair")
    if isinstance(indices, int):
        start, end = indices, indices + 1
    elif isinstance(indices, range):
        if indices.step != 1:
            raise ValueError(f"a range of indices must have step 1, not {indices!r}")
        start, end = indices.start, indices.stop
    elif isinstance(indices, slice):
        if indices.step not in (None, 1):
            raise ValueError(f"a slice of indices must have step 1, not {indices!r}")
        start = 0 if indices.start is None else indices.start
        end = INDEX_END if indices.stop is None else indices.stop
    elif isinstance(indices, tuple) and len(indices) == 2:
        start, end = indices
    else:
        raise TypeError(
            f"indices must be an int, a range, a slice or a (start, end) pair, not {indices!r}"
        )
    if not isinstance(start, int) or not isinstance(end, int):
        raise TypeError(f"indices must be ints, not {indices!r}")
    if start < 0 or end < 0:
        raise ValueError(f"indices must not be negative: {indices!r}")
    if start >= end:
        raise ValueError(f"empty range of indices: {indices!r}")
    if end > INDEX_END:
        raise ValueError(f"indices beyond the largest ({INDEX_END - 1}): {indices!r}")
    return start, end


class LockSet(_native.LockSet):
    """Many reader-writer locks in one file: lock *i* is byte *i*.

    The set is one owner (not a thread): locking what it holds converts it.
    """

    def lock(
        self,
        indices: Indices,
        *,
        shared: bool = False,
        blocking: bool = True,
        timeout: Optional[float] = None,
    ) -> None:
        """Applies the mode to every index in one atomic step."""
        start, end = _span(indices)
        self._lock(start, end, shared, blocking, timeout)

    def unlock(self, indices: Optional[Indices] = None) -> None:
        """Releases the indices (whatever of them is held); with no
        argument, everything this set holds (as ``unlock_all()``)."""
        if indices is None:
            self.unlock_all()
            return
        start, end = _span(indices)
        self._unlock(start, end)

    def held(self) -> list[tuple[range, str]]:
        """What this set holds: merged runs of one mode, in order."""
        return [(range(s, e), m) for s, e, m in self._held()]

    def locked(
        self,
        indices: Indices,
        *,
        shared: bool = False,
        blocking: bool = True,
        timeout: Optional[float] = None,
    ) -> Guard:
        """A scope (a Guard): on release, each index returns to what it was."""
        start, end = _span(indices)
        return self._scope(start, end, shared, blocking, timeout)

    def locked_async(
        self, indices: Indices, *, shared: bool = False, timeout: Optional[float] = None
    ) -> _aio.Pending:
        """``async with s.locked_async(range(3, 7)):`` -- a scope, awaited."""
        start, end = _span(indices)
        return _aio.Pending(
            lambda: _aio.acquire(self, "scope", self._scope, timeout, start, end, shared)
        )


class Holder(NamedTuple):
    """One lock on a file, held or awaited, as the kernel shows it."""

    pid: Optional[int]
    command: Optional[str]
    mode: str
    start: int
    end: Optional[int]
    mechanism: str
    waiting: bool


def holders(path: Any) -> list[Holder]:
    """Who holds or waits for locks on ``path`` (this host)."""
    return [Holder(**h) for h in _native.holders(path)]
