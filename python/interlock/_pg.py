"""Locks in a PostgreSQL server: ``PgLock`` (reader-writer) and ``PgMutex``.

The locks are the Rust library's (``interlock::PgLock``: session-level
advisory locks, a fencing token per grant, a heartbeat that notices a lost
session); this module adds the decorator and the asyncio forms. See
docs/python.md ("PostgreSQL") and docs/design-pg.md.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from . import _aio, _native

F = TypeVar("F", bound=Callable[..., Any])


class PgLock(_native.PgLock):
    """A reader-writer lock in a PostgreSQL server, named by a string or an
    explicit advisory key (an int, or a pair of ints); every guard carries a
    fencing token."""

    def __call__(self, func: F) -> F:
        """Decorator: run ``func`` holding the lock exclusively."""
        from . import _decorate

        return _decorate(self.write, self.write_async, func)

    def write_async(self, timeout: Optional[float] = None) -> _aio.Pending:
        """``await`` it for the exclusive lock, or ``async with`` it."""
        return _aio.Pending(lambda: _aio.acquire(self, "write", self.write, timeout))

    def read_async(self, timeout: Optional[float] = None) -> _aio.Pending:
        """``await`` it for a shared lock, or ``async with`` it."""
        return _aio.Pending(lambda: _aio.acquire(self, "read", self.read, timeout))


class PgMutex(_native.PgMutex):
    """An exclusive lock in a PostgreSQL server (a ``PgLock`` that is only
    ever taken exclusively)."""

    def __call__(self, func: F) -> F:
        """Decorator: run ``func`` holding the mutex."""
        from . import _decorate

        return _decorate(self.lock, self.lock_async, func)

    def lock_async(self, timeout: Optional[float] = None) -> _aio.Pending:
        """``await`` it for the mutex, or ``async with`` it."""
        return _aio.Pending(lambda: _aio.acquire(self, "lock", self.lock, timeout))
