"""portalocker's exception classes, as ``portalocker.exceptions`` has them."""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["AlreadyLocked", "BaseLockException", "LockException"]


class BaseLockException(Exception):  # noqa: N818 - the original's name
    """The base of every exception here; ``fh``, ``fh_name`` and
    ``strerror`` as in the original (None when not known)."""

    LOCK_FAILED = 1

    def __init__(self, *args: Any, fh: Any = None, **kwargs: Any) -> None:
        self.fh = fh
        self.fh_name: Optional[str] = getattr(fh, "name", None) if fh is not None else None
        self.strerror: Optional[str] = kwargs.pop("strerror", None)
        if self.strerror is None and len(args) > 1 and isinstance(args[1], str):
            self.strerror = args[1]
        super().__init__(*args)


class LockException(BaseLockException):
    """Acquiring or releasing failed (also: this instance holds a slot)."""


class AlreadyLocked(LockException):
    """Every slot stayed taken for the whole timeout."""

    holder_pid: Optional[int] = None

    def __init__(self, *args: Any, holder_pid: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holder_pid = holder_pid
