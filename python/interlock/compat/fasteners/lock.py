"""``fasteners.lock``: locks between the threads of one process.

``ReaderWriterLock`` and the method decorators ``locked``, ``read_locked``,
``write_locked`` and the context manager ``try_lock``, with fasteners 0.20's
behaviour. These work inside one process only, so they are plain Python on
a ``threading.Condition`` (or the ``condition_cls`` given), as in fasteners:
this is what lets green-thread libraries (eventlet) pass their own condition
and ``current_thread_functor``. For locks between processes see
``process_lock``.
"""

import collections
import contextlib
import functools
import threading
from typing import Optional

from interlock.compat.fasteners import _utils


class ReaderWriterLock:
    """A reader-writer lock between threads.

    Many readers or one writer. A waiting writer stops new readers (a thread
    that already reads may read again), and writers are served in the order
    they asked. The writer may take read locks and the write lock again
    (each counted); a reader asking for the write lock gets ``RuntimeError``.
    """

    WRITER = "w"  #: ``owner`` while a writer holds the lock.
    READER = "r"  #: ``owner`` while readers hold the lock.

    def __init__(
        self, condition_cls=threading.Condition, current_thread_functor=threading.current_thread
    ):
        """``condition_cls`` makes the condition variable the lock waits on;
        ``current_thread_functor`` names the calling thread (pass e.g.
        ``eventlet.getcurrent`` where threads are green)."""
        self._cond = condition_cls()
        self._current_thread = current_thread_functor
        self._writer = None
        self._writer_entries = 0
        self._pending_writers = collections.deque()
        self._readers = {}

    @property
    def has_pending_writers(self) -> bool:
        """Whether some thread waits for the write lock."""
        return bool(self._pending_writers)

    def is_writer(self, check_pending: bool = True) -> bool:
        """Whether the calling thread holds the write lock (or, with
        ``check_pending``, waits for it)."""
        me = self._current_thread()
        return self._writer == me or (check_pending and me in self._pending_writers)

    def is_reader(self) -> bool:
        """Whether the calling thread holds a read lock."""
        return self._current_thread() in self._readers

    @property
    def owner(self) -> Optional[str]:
        """``WRITER`` if a writer holds the lock, ``READER`` if readers do,
        else None."""
        if self._writer is not None:
            return self.WRITER
        return self.READER if self._readers else None

    def _read(self, me):
        if me in self._pending_writers:
            raise RuntimeError(
                f"Writer {me} can not acquire a read lock while waiting for the write lock"
            )
        with self._cond:
            readers = self._readers
            while True:
                if me in readers:
                    readers[me] += 1
                    return
                if self._writer == me or (self._writer is None and not self._pending_writers):
                    readers[me] = 1
                    return
                self._cond.wait()

    def _unread(self, me, must_hold=True):
        with self._cond:
            n = self._readers.get(me)
            if n is None:
                if must_hold:
                    raise RuntimeError(f"Thread {me} does not own a read lock")
            elif n > 1:
                self._readers[me] = n - 1
            else:
                del self._readers[me]
            self._cond.notify_all()

    def _write(self, me):
        if me in self._readers:
            raise RuntimeError(f"Reader {me} to writer privilege escalation not allowed")
        with self._cond:
            pending = self._pending_writers
            pending.append(me)
            while self._writer is not None or self._readers or pending[0] != me:
                self._cond.wait()
            pending.popleft()
            self._writer = me
            self._writer_entries = 1

    def _unwrite(self):
        with self._cond:
            self._writer = None
            self._writer_entries = 0
            self._cond.notify_all()

    def acquire_read_lock(self):
        """Takes a read lock, waiting while a writer holds or waits for the
        lock. Raises ``RuntimeError`` if this thread waits for the write lock."""
        self._read(self._current_thread())

    def release_read_lock(self):
        """Gives back one read lock; ``RuntimeError`` if this thread holds none."""
        self._unread(self._current_thread())

    def acquire_write_lock(self):
        """Takes the write lock (counted if this thread holds it already),
        waiting until no reader holds it. ``RuntimeError`` if this thread is a
        reader."""
        me = self._current_thread()
        if self._writer == me:
            self._writer_entries += 1
        else:
            self._write(me)

    def release_write_lock(self):
        """Gives back one count of the write lock; ``RuntimeError`` if this
        thread does not hold it."""
        me = self._current_thread()
        if self._writer != me:
            raise RuntimeError(f"Thread {me} does not own a write lock")
        self._writer_entries -= 1
        if self._writer_entries == 0:
            self._unwrite()

    @contextlib.contextmanager
    def read_lock(self):
        """Context manager: a read lock for the ``with`` block (yields the lock)."""
        me = self._current_thread()
        self._read(me)
        try:
            yield self
        finally:
            self._unread(me, must_hold=False)

    @contextlib.contextmanager
    def write_lock(self):
        """Context manager: the write lock for the ``with`` block (yields the lock)."""
        me = self._current_thread()
        if self._writer == me:
            self._writer_entries += 1
            try:
                yield self
            finally:
                self._writer_entries -= 1
        else:
            self._write(me)
            try:
                yield self
            finally:
                self._unwrite()


def _method_decorator(make, args, kwargs):
    # Used bare (@locked) or with keywords (@locked(lock="_other")).
    if kwargs or not args:
        return make
    return make(args[0]) if len(args) == 1 else make


def locked(*args, **kwargs):
    """Method decorator: runs the method holding ``self._lock`` (or the
    attribute named by ``lock=``), which may be one lock or a list/tuple of
    locks (acquired in order, released in reverse; ``logger=`` logs failed
    releases)."""

    def make(f):
        attr = kwargs.get("lock", "_lock")
        logger = kwargs.get("logger")

        @functools.wraps(f)
        def wrapper(self, *a, **kw):
            locks = getattr(self, attr)
            if isinstance(locks, (tuple, list)):
                with _utils.LockStack(logger=logger) as stack:
                    for i, lock in enumerate(locks):
                        if not stack.acquire_lock(lock):
                            raise threading.ThreadError("Unable to acquire lock %s" % (i + 1))
                    return f(self, *a, **kw)
            with locks:
                return f(self, *a, **kw)

        return wrapper

    return _method_decorator(make, args, kwargs)


def read_locked(*args, **kwargs):
    """Method decorator: runs the method holding a read lock of the
    ``ReaderWriterLock`` at ``self._lock`` (or ``lock=``)."""

    def make(f):
        attr = kwargs.get("lock", "_lock")

        @functools.wraps(f)
        def wrapper(self, *a, **kw):
            with getattr(self, attr).read_lock():
                return f(self, *a, **kw)

        return wrapper

    return _method_decorator(make, args, kwargs)


def write_locked(*args, **kwargs):
    """Method decorator: runs the method holding the write lock of the
    ``ReaderWriterLock`` at ``self._lock`` (or ``lock=``)."""

    def make(f):
        attr = kwargs.get("lock", "_lock")

        @functools.wraps(f)
        def wrapper(self, *a, **kw):
            with getattr(self, attr).write_lock():
                return f(self, *a, **kw)

        return wrapper

    return _method_decorator(make, args, kwargs)


@contextlib.contextmanager
def try_lock(lock):
    """Context manager: tries ``lock.acquire(False)`` once, yields whether
    it was taken, and releases it at the end if it was."""
    got = lock.acquire(False)
    try:
        yield got
    finally:
        if got:
            lock.release()
