"""interlock's exceptions: each a LockError and the built-in a Python user catches."""

from __future__ import annotations

from typing import Any, Optional


class LockError(Exception):
    """Base of interlock's errors. ``path`` names the lock (or is None)."""

    path: Optional[str]

    def __init__(self, message: str, path: Optional[str] = None) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.path))


class WouldBlock(LockError, BlockingIOError):
    """The lock is held elsewhere and the call was told not to wait."""


class Timeout(LockError, TimeoutError):
    """The wait for the lock reached its timeout."""


class Deadlock(LockError):
    """Waiting would close a cycle of owners waiting for each other (LockSet)."""


class OwnerDied(LockError):
    """A writer died holding a shared-memory lock.

    The lock is held now: ``guard`` is the held, usable guard. Repair the
    data, then ``guard.clear_poison()``.
    """

    guard: Any = None


class LeaseLost(LockError):
    """A lease ran out or was taken over while its holder believed it held it."""


class AlreadyHeld(LockError, RuntimeError):
    """This thread already holds the lock, and waiting for it would deadlock."""
