"""fasteners' API on interlock: ``interlock.compat.fasteners``.

A replacement for the ``fasteners`` package (0.20), with its import paths:
the top-level names (``InterProcessLock``, ``InterProcessReaderWriterLock``,
``ReaderWriterLock``, ``interprocess_locked``, ``interprocess_read_locked``,
``interprocess_write_locked``, ``locked``, ``read_locked``,
``write_locked``, ``try_lock``, ``__version__``) and the modules
``process_lock``, ``process_mechanism``, ``lock``, ``_utils`` (with
``StopWatch``) and ``version``. Run existing code unchanged with
``interlock.compat.install("fasteners")`` (see ``interlock.compat``).

The inter-process locks are ``interlock.FileLock`` (fcntl flavor) on the
same lock file. Its data lock is byte 0 of the file, and the real fasteners
locks the whole file with ``fcntl.lockf``: a process using this module and a
process using the real fasteners on the same file exclude each other, for
both the exclusive and the reader-writer lock.

What differs from fasteners, on purpose:

- **Threads are excluded.** fasteners' ``InterProcessLock`` uses classic
  POSIX locks, which belong to the process: two threads (even with two lock
  objects) both "held" the lock at once. Here threads of one process exclude
  each other like processes do.
- **No polling.** fasteners tries, sleeps ``delay`` (growing to
  ``max_delay``) and tries again, so a waiter notices a release 10-100 ms
  late. Here a waiter sleeps in the kernel and wakes when the lock is
  released. ``delay`` and ``max_delay`` are still validated (negative:
  ``ValueError``) and otherwise ignored; ``sleep_func`` is used only by a
  subclass that overrides ``trylock()`` (fasteners' loop runs around it).
- **Writers are not starved.** fasteners' reader-writer lock lets a stream
  of readers keep a writer out for ever; here a writer that has waited
  1 ms stops new readers (and readers that waited behind a writer go in
  before it takes the lock again).
- **Reentrancy is defined.** The same thread acquiring a lock it holds
  (through the same or another object on the same path) counts and must
  release as often; a read inside a write or a read, or a write inside a
  write, is allowed. A thread that holds a read lock and asks for the write
  lock gets ``RuntimeError`` at once instead of a possible deadlock.
  fasteners, on Unix, let the second acquire succeed and the first release
  drop the lock for both. As a consequence ``InterProcessLock.acquired``
  stays true until the last of a thread's nested holds is released.
- **Closing is harmless.** With classic locks, closing any descriptor of the
  lock file (another object, another library) dropped every lock the
  process held on it. Here nothing but a release (or the object being
  garbage-collected while holding, which releases its holds, as fasteners'
  closed file did) gives a lock back.
- **Releasing what is not held** through an ``InterProcessReaderWriterLock``
  raises ``threading.ThreadError`` (fasteners raised a ``TypeError`` from
  ``fcntl``). ``InterProcessLock.release()`` raises ``ThreadError`` as
  before.
- **The lock file is opened read-write** and kept open between holds (not
  reopened on every acquire); it is never truncated, and it may be deleted
  by the holder safely. The ``lockfile`` attribute stays None unless you
  assign a file to it (then ``trylock()``/``unlock()`` lock that file).
- **fork**: a child does not hold its parent's lock (as with classic
  locks); releasing, in the child, a hold the parent took releases nothing.
- **Pickling** a lock object copies its settings (path, sleep_func, logger),
  never a hold, also while the original holds it (fasteners could not
  pickle a held lock).
- ``process_mechanism``'s ``trylock``/``unlock`` take interlock locks on the
  handle's file rather than ``fcntl.lockf`` (a handle may be a file object,
  a path or a descriptor).
- Windows is not supported (interlock is for Linux).

The thread-only ``ReaderWriterLock`` and the decorators of ``lock`` keep
fasteners' semantics (they are pure Python, so that ``condition_cls`` and
``current_thread_functor`` work with green threads).
"""

from interlock.compat.fasteners import _utils, lock, process_lock, process_mechanism, version  # noqa: F401
from interlock.compat.fasteners.lock import (
    ReaderWriterLock,
    locked,
    read_locked,
    try_lock,
    write_locked,
)
from interlock.compat.fasteners.process_lock import (
    InterProcessLock,
    InterProcessReaderWriterLock,
    interprocess_locked,
    interprocess_read_locked,
    interprocess_write_locked,
)
from interlock.compat.fasteners.version import _VERSION as __version__

__all__ = [
    "__version__",
    "locked",
    "read_locked",
    "ReaderWriterLock",
    "try_lock",
    "write_locked",
    "interprocess_locked",
    "interprocess_read_locked",
    "interprocess_write_locked",
    "InterProcessLock",
    "InterProcessReaderWriterLock",
]
