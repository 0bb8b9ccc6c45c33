"""prwlock's API (``from prwlock import RWLock``) over interlock's ShmRwLock.

The original, prwlock 0.4.1, is a process-shared ``pthread_rwlock_t`` in a
page of a deleted temporary file; it reaches child processes by pickling
(``multiprocessing`` passes it to ``Pool`` workers). This module offers the
same names and calls: ``RWLock()``, ``acquire_read(timeout=None)``,
``acquire_write(timeout=None)``, ``try_acquire_read()``,
``try_acquire_write()``, ``release()``, the ``reader_lock(timeout=None)`` /
``writer_lock(timeout=None)`` context managers (``ValueError`` when the lock
cannot be taken), ``set_pthread_process_shared`` /
``get_pthread_process_shared``, ``prwlock.prwlock.RWLockPosix``; and an
``RWLock`` pickles, so ``multiprocessing`` children share it.

Underneath is :class:`interlock.ShmRwLock` (an anonymous shared mapping,
inherited by the children the program forks, as the original's descriptor
was; nothing is left in the file system). What differs, on purpose:

- **A holder that dies does not wedge the lock.** With prwlock, a process
  SIGKILLed while holding the write lock blocks every other process
  forever, and a dead reader's leaked count keeps writers out forever. Here
  a dead reader's hold is reclaimed silently, and a dead writer's lock goes
  to the next acquirer, which also gets an :class:`OwnerDiedWarning` (the
  data may be half-written; a write acquisition marks the lock repaired).
- **Self-deadlock is an error, never a hang.** A thread asking again,
  blocking, for a lock it holds through the same ``RWLock`` object in a way
  that would wait for itself (write after write, write after read, read
  after write) gets ``OSError(EDEADLK)``; with a timeout, or ``try_``, it
  gets ``False`` at once. (glibc reports only write after write, and its
  read-after-write returned EDEADLK unnoticed: prwlock said ``True`` without
  holding anything.) A nested read lock is counted, as glibc does.
- **Timeouts are exact.** prwlock built the deadline from ``time()`` in
  whole seconds, so a wait could end up to a second early; here a timeout is
  measured on the monotonic clock. ``timeout <= 0`` tries once.
- **Writers are preferred**: a waiting writer holds new readers off
  (glibc's default rwlock lets a stream of readers starve writers).
- **Threads**: one ``RWLock`` object may be used by several threads; each
  ``release()`` releases the calling thread's latest hold (or, if it holds
  none, the object's latest), so another thread may release a lock. Two
  ``RWLock`` objects of one lock in one thread (an unpickled copy) count as
  one holder: asking through one for what would wait for the other's hold
  fails at once as above (``interlock.AlreadyHeld`` underneath), and a
  read through the second while the first holds a read fails too (pthread
  would count it).
- **Pickling** carries the lock, not the holds: an unpickled copy starts
  holding nothing (prwlock copied its hold counter into a copy made in the
  same process). Like prwlock's pickled file descriptor, a pickled
  ``RWLock`` reaches the process that made it and the processes it forks
  *after* making it (``multiprocessing``'s default ``fork`` start method,
  ``Pool`` workers started after the lock); elsewhere unpickling raises a
  ``RuntimeError`` that says so (prwlock's descriptor number would have
  named some other file, or none). For ``spawn``, ``forkserver`` or
  unrelated processes use a named ``interlock.ShmRwLock("name")``.
- **After fork** a child holds nothing: the parent's holds are not the
  child's to release (prwlock's child could unlock the parent's lock).
- Private attributes: ``_fd`` is kept as a descriptor that stands for the
  lock (an empty memfd, one per lock as prwlock's file was; the same number
  after pickling within a process and its forked children; closing it does
  not affect the lock). There is no ``_buf`` or ``_lock``.

Windows (``RWLockWindows``) is not offered: interlock is for Linux.
"""

from . import prwlock as _prwlock
from .prwlock import OwnerDiedWarning, RWLockOSX, RWLockPosix  # noqa: F401 (import paths)

__version__ = "0.4.1"  # the prwlock release whose API this mirrors

__all__ = [
    "GenericLockContextManager",
    "RWLock",
    "get_pthread_process_shared",
    "set_pthread_process_shared",
]

RWLock = RWLockPosix


def set_pthread_process_shared(n_process):
    """Sets the value used as ``PTHREAD_PROCESS_SHARED`` for new locks.

    Only 0 and 1 are valid; with anything else the next ``RWLock()`` raises
    ``OSError(EINVAL)``, as prwlock's does.
    """
    _prwlock.PTHREAD_PROCESS_SHARED = n_process


def get_pthread_process_shared():
    """Returns the value used as ``PTHREAD_PROCESS_SHARED`` for new locks."""
    return _prwlock.PTHREAD_PROCESS_SHARED


class GenericLockContextManager:
    """What ``reader_lock()`` and ``writer_lock()`` return.

    Entering takes the lock (waiting at most *timeout* seconds, or forever
    when it is ``None``) and raises ``ValueError`` if it was not taken;
    leaving releases it.
    """

    def __init__(self, lock, method, timeout=None):
        self.lock = lock
        self.locked = False
        self.method = method
        self.timeout = timeout
        if method not in ("read", "write"):
            raise ValueError(f"GenericLock called with invalid method {method}")

    def __enter__(self):
        if self.method == "read":
            self.locked = self.lock.acquire_read(timeout=self.timeout)
        else:
            self.locked = self.lock.acquire_write(timeout=self.timeout)
        if not self.locked:
            raise ValueError("Unable to acquire lock in context manager")

    def __exit__(self, exc_type, exc_val, exc_tb):
        if self.locked:
            self.locked = False
            self.lock.release()


def reader_lock(self, timeout=None):
    """A context manager holding a read lock (see GenericLockContextManager)."""
    return GenericLockContextManager(self, "read", timeout=timeout)


def writer_lock(self, timeout=None):
    """A context manager holding the write lock (see GenericLockContextManager)."""
    return GenericLockContextManager(self, "write", timeout=timeout)


# prwlock defines these at module level and sets them on the class.
RWLock.reader_lock = reader_lock
RWLock.writer_lock = writer_lock
