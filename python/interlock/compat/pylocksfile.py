"""pylocksfile's API (``from pylocksfile import pylocksfile``) over interlock's LockSet.

The original, pylocksfile 0.0.6, keeps many read/write locks in one file:
lock *i* is byte *i*, taken with classic POSIX ``fcntl`` record locks
(``fcntl.lockf``). This module offers the same class and calls --
``pylocksfile(locksfile_path=None, verbose=False, l_id=None)``,
``acquire(writeLock=False, lock_n=0, blocking=True)`` returning ``True`` or
``False``, ``release(lock_n=None)``, ``with locks(writeLock=..., lock_n=...):``,
the ``locksfile_path``/``l_id``/``verbose`` properties, intervals given as
an index or ``(first, count)``, ``IllegalArgumentError`` for bad arguments --
over :class:`interlock.LockSet`, which puts lock *i* on byte *i* of the same
file with open-file-description (OFD) locks.

**It interoperates with the original**: classic and OFD record locks on one
file conflict, so a process running the real pylocksfile and one running
this module exclude each other on the same file and indices.

What differs, on purpose:

- **The lock file is not truncated.** The original opened it with
  ``O_TRUNC``, destroying whatever the file held every time a process
  started using it. Here it is created if missing (mode 0o644 before the
  umask; the original's was 0o777) and never written.
- **Threads exclude each other.** Classic fcntl locks belong to the
  process, so two ``pylocksfile`` objects on one file in two threads of one
  process both "held" the same lock. Here each object is its own owner: two
  objects exclude each other wherever they are. (One object shared by
  several threads is still one owner, as before: its locks are its threads'
  in common.)
- **Closing some other descriptor of the file keeps the locks.** With
  classic locks, closing *any* descriptor of the file in the process (an
  ``open(path).close()``, or another ``pylocksfile`` object of the same file
  being collected) silently dropped every lock the process held there.
- **Dropping an object releases only its own locks.** The original's
  ``__del__`` unlocked its recorded ranges process-wide, which also
  released another object's locks on those bytes.
- **Deadlocks are found by interlock**, across processes, whatever the
  length of the cycle (the kernel's detection for classic locks stops at
  about ten processes and reports false deadlocks between threads).
  ``acquire`` returns ``False`` for one, as before.
- **Nested ``with`` blocks release what they took.** The original's
  ``__exit__`` always released the innermost block's locks and never
  forgot them, so an outer block released the inner one's range again. A
  ``with`` whose lock cannot be taken (a deadlock) raises
  :class:`interlock.Deadlock` instead of running the body unlocked.
- ``l_id`` defaults to the process id as the original's docstring says (a
  typo left it ``None``); ``verbose`` output shows the held runs from
  :meth:`interlock.LockSet.held`.
"""

import os
import uuid
from collections import namedtuple

import interlock

__all__ = ["pylocksfile"]

__version__ = "0.0.6"  # the pylocksfile release whose API this mirrors


class IllegalArgumentError(ValueError):
    """A bad argument (the original's name)."""


class IllegalWithStatement(ValueError):
    """Kept for code that catches it; nothing raises it (as in the original)."""


_interval_tuple = namedtuple("interval_tuple", ["lock_n", "n_locks"])


def _interval(lock_n):
    """(first, count) from an index, a (first, count) tuple or list."""
    if type(lock_n) is int:  # the common case first
        if lock_n < 0:
            raise IllegalArgumentError("lockInterval - integer interval must be  >=0")
        return lock_n, 1
    if isinstance(lock_n, (tuple, list)):
        if len(lock_n) != 2:
            raise IllegalArgumentError(
                "lockInterval - interval tuple or list must have shape [2]"
                " - (start_lock, n_locks_ahead)"
            )
        first, count = lock_n
        if not isinstance(first, int) or not isinstance(count, int):
            raise IllegalArgumentError("lockInterval - interval arguments must be integers")
        if first < 0:
            raise IllegalArgumentError(
                "lockInterval - interval first argument (lock_n) must be non-negative"
            )
        if count <= 0:
            raise IllegalArgumentError(
                "lockInterval - interval second argument (n_locks) must be positive"
            )
        return first, count
    if isinstance(lock_n, int):  # bool and int subclasses, as the original accepts
        return _interval(int(lock_n))
    raise IllegalArgumentError("lockInterval - interval argument is not a tuple, list or integer.")


class lockInterval:
    """A set of lock indices kept as sorted, disjoint ``(lock_n, n_locks)`` runs.

    The original used it for its own bookkeeping; it is kept for code that
    imports it. ``pylocksfile`` itself asks the LockSet what it holds.
    """

    lock_interval_tuple = _interval_tuple

    def __init__(self):
        self._intervals = []

    @property
    def intervals(self):
        return self._intervals

    def __iter__(self):
        return iter(self._intervals)

    def reset(self):
        self._intervals = []

    def preprocessInput(self, interval):
        first, count = _interval(interval)
        return _interval_tuple(first, count)

    def inBound(self, lock_n):
        if not isinstance(lock_n, int) or lock_n < 0:
            raise IllegalArgumentError("lockInterval - lock_n argument must be positive integer.")
        return any(r.lock_n <= lock_n < r.lock_n + r.n_locks for r in self._intervals)

    def insertInterval(self, interval):
        new = self.preprocessInput(interval)
        lo, hi = new.lock_n, new.lock_n + new.n_locks
        keep = []
        for r in self._intervals:
            a, b = r.lock_n, r.lock_n + r.n_locks
            if b < lo or a > hi:
                keep.append(r)
            else:  # overlapping or touching: merge
                lo, hi = min(lo, a), max(hi, b)
        keep.append(_interval_tuple(lo, hi - lo))
        keep.sort()
        self._intervals = keep

    def removeInterval(self, interval):
        gone = self.preprocessInput(interval)
        lo, hi = gone.lock_n, gone.lock_n + gone.n_locks
        keep = []
        for r in self._intervals:
            a, b = r.lock_n, r.lock_n + r.n_locks
            if a < lo:
                keep.append(_interval_tuple(a, min(b, lo) - a))
            if b > hi:
                start = max(a, hi)
                keep.append(_interval_tuple(start, b - start))
        self._intervals = keep


class pylocksfile:
    """Many read/write locks in one file: lock *i* is byte *i*.

    ``locksfile_path`` defaults to a new file in ``/tmp``. Every object is
    its own lock owner (see the module docstring).
    """

    def __init__(self, locksfile_path=None, verbose=False, l_id=None):
        if locksfile_path is None:
            locksfile_path = os.path.join("/tmp", f"pylocksfile-{uuid.uuid4().hex}.lock")
        locksfile_path = os.path.abspath(locksfile_path)
        if not isinstance(locksfile_path, str):
            raise IllegalArgumentError("pylocksfile - locksfile_path is not str.")
        if not os.path.isdir(os.path.split(locksfile_path)[0]):
            raise IllegalArgumentError(
                "pylocksfile - locksfile_path directory path does not exist."
            )
        if not isinstance(verbose, bool):
            raise IllegalArgumentError(
                "pylocksfile - verbose argument is not boolean (True/False)."
            )
        self._locksfile_path = locksfile_path
        self._verbose = verbose
        self._l_id = str(os.getpid()) if l_id is None else l_id
        # (writeLock, lock_n) of each ``with`` block entered and not left
        self._current_lock_n = []
        self._set = interlock.LockSet(locksfile_path)

    @property
    def locksfile_path(self):
        return self._locksfile_path

    @property
    def l_id(self):
        return self._l_id

    @property
    def verbose(self):
        return self._verbose

    @verbose.setter
    def verbose(self, new_verbose):
        self._verbose = new_verbose

    def acquire(self, writeLock=False, lock_n=0, blocking=True):
        """Takes locks ``lock_n`` (an index or ``(first, count)``), exclusive
        if ``writeLock``, else shared; locks already held through this object
        are converted to the asked mode. Returns ``True`` when held,
        ``False`` when ``blocking=False`` and another owner holds one of
        them, or when waiting would deadlock."""
        if writeLock is not True and writeLock is not False:
            raise IllegalArgumentError("writeLock must be boolean")
        if blocking is not True and blocking is not False:
            raise IllegalArgumentError("blocking must be boolean")
        first, count = _interval(lock_n)
        try:
            self._set.lock((first, first + count), shared=not writeLock, blocking=blocking)
        except interlock.WouldBlock:
            return False
        except (interlock.Deadlock, interlock.AlreadyHeld) as e:
            # AlreadyHeld: this thread holds some of them through another
            # object of the same file, so it would wait for itself.
            if self._verbose:
                self.printVerbose(f"Deadlock detected, lock request removed for {lock_n!r}: {e}")
            return False
        if self._verbose:
            self.printVerbose(
                "{} lock acquired ->{!r}".format("Write" if writeLock else "Read", lock_n)
            )
            self.printVerbose(f"held ->{self._set.held()!r}")
        return True

    def release(self, lock_n=None):
        """Releases locks ``lock_n`` (an index or ``(first, count)``; indices
        not held are ignored), or every lock of this object when ``None``."""
        if lock_n is None:
            self._set.unlock_all()
        else:
            first, count = _interval(lock_n)
            self._set.unlock((first, first + count))
        if self._verbose:
            self.printVerbose(f"Releasing ->{lock_n!r}")

    def __call__(self, writeLock=False, lock_n=0):
        """``with locks(writeLock=..., lock_n=...):`` takes the locks
        (blocking) for the block and releases them after it."""
        _interval(lock_n)
        self._current_lock_n.append((writeLock, lock_n))
        return self

    def __enter__(self):
        if not self._current_lock_n:
            raise IllegalWithStatement("use 'with locks(writeLock=..., lock_n=...)'")
        writeLock, lock_n = self._current_lock_n[-1]
        if not self.acquire(writeLock=writeLock, lock_n=lock_n):
            self._current_lock_n.pop()
            raise interlock.Deadlock(
                f"taking locks {lock_n!r} of {self._locksfile_path} would deadlock"
            )
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        _, lock_n = self._current_lock_n.pop()
        self.release(lock_n=lock_n)
        return None

    def __del__(self):
        s = getattr(self, "_set", None)
        if s is not None:
            try:
                s.unlock_all()
            except Exception:
                pass

    def printVerbose(self, msg):
        if self._verbose:
            print(str(type(self)), "-", str(self._l_id), "-", msg)
