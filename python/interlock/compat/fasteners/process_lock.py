"""``fasteners.process_lock``: locks between processes, on a lock file.

``InterProcessLock`` (exclusive) and ``InterProcessReaderWriterLock``, and
the decorators ``interprocess_locked``, ``interprocess_read_locked`` and
``interprocess_write_locked``, with fasteners 0.20's signatures, return
values and exceptions, built on ``interlock.FileLock`` (fcntl flavor).
See the package docstring for what differs from fasteners.
"""

import contextlib
import errno
import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Union

from interlock.compat.fasteners import _shared, _utils
from interlock.compat.fasteners.process_mechanism import (  # noqa: F401 (fasteners imports them here)
    _interprocess_mechanism,
    _interprocess_reader_writer_mechanism,
)

LOG = logging.getLogger(__name__)


def _ensure_tree(path):
    """Creates directory ``path`` and its missing ancestors; returns whether
    it had to create it (False if it was already a directory)."""
    if os.path.isdir(path):
        return False
    try:
        os.makedirs(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return False
    return True


def _check_waits(delay, timeout):
    if delay < 0:
        raise ValueError("Delay must be greater than or equal to zero")
    if timeout is not None and timeout < 0:
        raise ValueError("Timeout must be greater than or equal to zero")


class _Holds:
    """The holds one lock object took, as (thread token, exclusive) pairs."""

    __slots__ = ("items", "mu")

    def __init__(self):
        self.items = []
        self.mu = threading.Lock()

    def push(self, owner, exclusive):
        # list.append is atomic; pop() searches under the mutex and only
        # ever removes, so a concurrent append cannot confuse it.
        self.items.append((owner, exclusive))

    def pop(self, exclusive=None):
        """Removes a hold: the calling thread's latest one of that kind if it
        has one, else the latest one of that kind (a release on another
        thread's behalf). Returns it, or None."""
        me = _shared.thread_token()
        with self.mu:
            items = self.items
            if items:
                owner, ex = items[-1]
                if owner is me and (exclusive is None or ex == exclusive):
                    return items.pop()
            for mine in (True, False):
                for i in range(len(items) - 1, -1, -1):
                    owner, ex = items[i]
                    if (not mine or owner == me) and (exclusive is None or ex == exclusive):
                        return items.pop(i)
        return None

    def drain(self):
        with self.mu:
            items, self.items = self.items, []
        return items


class _FileBacked:
    """What both inter-process lock classes share: the path, the lazily
    found :class:`_shared._File`, the holds, pickling and cleanup."""

    def _init(self, path, sleep_func, logger):
        self.lockfile = None
        self.path = _utils.canonicalize_path(path)
        self.sleep_func = sleep_func
        self.logger = _utils.pick_first_not_none(logger, LOG)
        self._file = None
        self._holds = _Holds()

    def _shared_file(self):
        f = self._file
        if f is None:
            f = self._file = _shared.file_for(self.path)
        return f

    def _take(self, exclusive, blocking, timeout):
        f = self._file or self._shared_file()
        try:
            owner = f.acquire(exclusive, blocking, timeout)
        except OSError as e:
            raise threading.ThreadError(
                f"Unable to acquire lock on `{os.fsdecode(self.path)}` due to {e}"
            ) from e
        if owner is None:
            return False
        self._holds.push(owner, exclusive)
        if self.logger.isEnabledFor(_utils.BLATHER):
            self.logger.log(_utils.BLATHER, "Acquired file lock `%s`", self.path)
        return True

    def _give_back(self, exclusive):
        h = self._holds.pop(exclusive)
        if h is None:
            return False
        self._file.release(h[0])
        if self.logger.isEnabledFor(_utils.BLATHER):
            self.logger.log(_utils.BLATHER, "Unlocked file lock `%s`", self.path)
        return True

    def __getstate__(self):
        # Like fasteners, a lock object pickles by its settings; the copy
        # holds nothing (a hold belongs to the process that took it).
        return {"path": self.path, "sleep_func": self.sleep_func, "logger": self.logger}

    def __setstate__(self, state):
        self._init(state["path"], state["sleep_func"], state["logger"])

    def __del__(self):
        # fasteners released a dropped object's lock by closing its file;
        # do the same for the holds this object still has.
        try:
            f = self._file
            for owner, _ in self._holds.drain():
                f.release(owner)
        except Exception:
            pass


class InterProcessLock(_FileBacked):
    """An exclusive lock between processes, and between threads, on the file
    at ``path`` (created, with missing parent directories, on first use).

    ``acquire()`` waits in the kernel, without polling; ``delay`` and
    ``max_delay`` are checked as fasteners checks them and otherwise unused.
    The same thread acquiring again (through this or another object on the
    same path) counts: it holds the lock until it has released as many
    times. Any thread may call ``release()``.
    """

    MAX_DELAY = 0.1
    DELAY_INCREMENT = 0.01

    def __init__(
        self,
        path: Union[Path, str],
        sleep_func: Callable[[float], None] = time.sleep,
        logger: Optional[logging.Logger] = None,
    ):
        self._init(path, sleep_func, logger)
        self.acquired = False

    def __setstate__(self, state):
        super().__setstate__(state)
        self.acquired = False

    # Whether a subclass overrides trylock() / unlock() (set per class).
    _own_trylock = False
    _own_unlock = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._own_trylock = cls.trylock is not InterProcessLock.trylock
        cls._own_unlock = cls.unlock is not InterProcessLock.unlock

    def acquire(
        self,
        blocking: bool = True,
        delay: float = 0.01,
        max_delay: float = 0.1,
        timeout: Optional[float] = None,
    ) -> bool:
        """Acquires the lock; returns whether it did.

        ``blocking=False`` tries once. Otherwise waits until the lock is free,
        or for at most ``timeout`` seconds (None: no limit) and then returns
        False. Raises ``ValueError`` for a negative ``delay`` or ``timeout``,
        ``threading.ThreadError`` when the file cannot be locked at all (e.g.
        no permission) and ``RuntimeError`` when this thread holds the file as
        a reader (through an ``InterProcessReaderWriterLock``).
        """
        _check_waits(delay, timeout)
        if self._own_trylock:
            return self._acquire_by_trying(blocking, delay, max_delay, timeout)
        if self._take(True, blocking, timeout):
            self.acquired = True
            return True
        return False

    def release(self):
        """Releases one hold taken by ``acquire()``. Raises
        ``threading.ThreadError`` if this object holds nothing."""
        if not self.acquired:
            raise threading.ThreadError("Unable to release an unaquired lock")
        if self._own_unlock:
            self._release_by_unlock()
            return
        self._give_back(True)
        self.acquired = bool(self._holds.items)

    def __enter__(self):
        if not self.acquire():
            raise threading.ThreadError(
                f"Unable to acquire a file lock on `{self.path}` (when used as a context manager)"
            )
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.release()

    def exists(self):
        """Whether the lock file exists."""
        return os.path.exists(self.path)

    # The low-level calls fasteners' acquire loop made. They lock the file of
    # ``self.lockfile`` if one was assigned, else the lock's own path, and
    # keep no count: ``trylock`` raises ``OSError`` (EAGAIN) when the file is
    # locked elsewhere; ``unlock`` undoes ``trylock``.
    def trylock(self):
        if self.lockfile is not None:
            handle, path = self.lockfile, _shared.path_of(self.lockfile)
        else:
            handle, path = self, self.path
        if not _shared.try_handle(handle, path, True):
            raise _shared.would_block(path)

    def unlock(self):
        _shared.release_handle(self.lockfile if self.lockfile is not None else self)

    # A subclass that overrides trylock()/unlock() gets fasteners' own
    # try-and-sleep loop around them, so its overrides are honoured.
    def _acquire_by_trying(self, blocking, delay, max_delay, timeout):
        max_delay = max(max_delay, delay)
        basedir = os.path.dirname(self.path)
        if basedir:
            _ensure_tree(basedir)
        if self.lockfile is None or self.lockfile.closed:
            self.lockfile = open(self.path, "a")
        watch = _utils.StopWatch(duration=timeout)

        def attempt():
            try:
                self.trylock()
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise threading.ThreadError(
                        f"Unable to acquire lock on `{self.path}` due to {e}"
                    ) from e
                if not blocking or watch.expired():
                    return False
                raise _utils.RetryAgain() from None
            return True

        with watch:
            ok = _utils.Retry(delay, max_delay, sleep_func=self.sleep_func, watch=watch)(attempt)
        if ok:
            self.acquired = True
        return ok

    def _release_by_unlock(self):
        try:
            self.unlock()
        except Exception as e:
            raise threading.ThreadError(
                f"Could not unlock the acquired lock opened on `{self.path}`"
            ) from e
        self.acquired = False
        if self.lockfile is not None:
            self.lockfile.close()
            self.lockfile = None


class InterProcessReaderWriterLock(_FileBacked):
    """A reader-writer lock between processes, and between threads, on the
    file at ``path``. A writer that has waited 1 ms is served before new
    readers, and readers that waited behind a writer before it takes the
    lock again (neither side is starved); waits are in the kernel, without
    polling.

    The same thread asking again counts: a read inside a read or a write, a
    write inside a write. A thread that holds a read lock and asks for the
    write lock gets ``RuntimeError`` at once (an upgrade would deadlock with
    another reader doing the same). Any thread may release.
    """

    MAX_DELAY = 0.1
    DELAY_INCREMENT = 0.01

    def __init__(
        self,
        path: Union[Path, str],
        sleep_func: Callable[[float], None] = time.sleep,
        logger: Optional[logging.Logger] = None,
    ):
        self._init(path, sleep_func, logger)

    @contextlib.contextmanager
    def read_lock(self, delay=0.01, max_delay=0.1):
        """Context manager: holds a read lock for the ``with`` block."""
        self.acquire_read_lock(blocking=True, delay=delay, max_delay=max_delay, timeout=None)
        try:
            yield
        finally:
            self.release_read_lock()

    @contextlib.contextmanager
    def write_lock(self, delay=0.01, max_delay=0.1):
        """Context manager: holds the write lock for the ``with`` block."""
        if not self.acquire_write_lock(
            blocking=True, delay=delay, max_delay=max_delay, timeout=None
        ):
            raise threading.ThreadError(
                f"Unable to acquire a file lock on `{self.path}` (when used as a context manager)"
            )
        try:
            yield
        finally:
            self.release_write_lock()

    def acquire_read_lock(
        self,
        blocking: bool = True,
        delay: float = 0.01,
        max_delay: float = 0.1,
        timeout: Optional[float] = None,
    ) -> bool:
        """Acquires a read lock; returns whether it did (see
        ``InterProcessLock.acquire`` for the arguments)."""
        _check_waits(delay, timeout)
        return self._take(False, blocking, timeout)

    def acquire_write_lock(
        self,
        blocking: bool = True,
        delay: float = 0.01,
        max_delay: float = 0.1,
        timeout: Optional[float] = None,
    ) -> bool:
        """Acquires the write lock; returns whether it did. Raises
        ``RuntimeError`` if this thread holds a read lock on the file."""
        _check_waits(delay, timeout)
        return self._take(True, blocking, timeout)

    def release_read_lock(self):
        """Releases a read lock taken through this object; raises
        ``threading.ThreadError`` if it holds none."""
        if not self._give_back(False):
            raise threading.ThreadError(
                f"Unable to release a read lock on `{self.path}` that is not held"
            )

    def release_write_lock(self):
        """Releases the write lock taken through this object; raises
        ``threading.ThreadError`` if it holds none."""
        if not self._give_back(True):
            raise threading.ThreadError(
                f"Unable to release a write lock on `{self.path}` that is not held"
            )


def _decorator(make_context):
    def decorator(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            with make_context():
                return f(*args, **kwargs)

        return wrapper

    return decorator


def interprocess_locked(path: Union[Path, str]):
    """Decorator: the function runs holding an ``InterProcessLock`` on
    ``path`` (one lock object per decorated function)."""
    lock = InterProcessLock(path)
    return _decorator(lambda: lock)


def interprocess_read_locked(path: Union[Path, str]):
    """Decorator: the function runs holding a read lock on ``path``."""
    lock = InterProcessReaderWriterLock(path)
    return _decorator(lock.read_lock)


def interprocess_write_locked(path: Union[Path, str]):
    """Decorator: the function runs holding the write lock on ``path``."""
    lock = InterProcessReaderWriterLock(path)
    return _decorator(lock.write_lock)
