"""The ``locks`` library's API on interlock: ``interlock.compat.locks``.

A replacement for ``locks`` 0.1.1 (PyPI; "POSIX file system locking using
flock"): ``Mutex(path, timeout=None, callback=None)`` with ``lock()``,
``release()`` and ``with``; ``__all__``, ``__version__`` and the other
metadata names. Run existing code unchanged with
``interlock.compat.install("locks")`` (see ``interlock.compat``).

``Mutex`` is an ``interlock.FileLock`` of the flock flavor, whose data lock
is ``flock(2)`` ``LOCK_EX`` on the file, as the original takes it: a process
using this module and one using the original ``locks`` on the same file
exclude each other.

Behaviour kept from the original:

- ``lock()`` with neither ``timeout`` nor ``callback`` waits for ever.
  With ``timeout`` it waits at most that long (0 or less: one try) and then
  raises ``BlockingIOError`` with ``errno`` ``EAGAIN``. With ``callback``,
  once the wait (``timeout``, or none: one try) fails, ``callback()`` is
  called once and ``lock()`` then waits for ever.
- Calling ``lock()`` again in the thread that holds the lock returns at once
  (one ``release()`` releases it).
- Two ``Mutex`` objects on one path exclude each other, also in one thread.
- The lock file is created (mode 0o644 less the umask) by ``lock()``.

What differs, on purpose:

- **No polling.** The original retried every millisecond while a
  ``timeout`` or ``callback`` was set; here the wait is in the kernel and
  ends when the lock is released (or at the deadline).
- **The lock file is deleted safely.** The original's ``release()`` (and
  the end of its ``with`` block) unlocked the file and then deleted it. That
  order let two processes hold the lock at once: a waiter that had opened
  the old file got it, while a newcomer created and locked a new file at the
  same path. Here ``release()`` deletes the file while the lock is still
  held, as its last act (``Guard.remove_and_release()``), and a waiter that
  then gets the lock on the deleted file notices and opens the path again,
  so no two interlock users hold it at once. Processes running the original
  ``locks`` do not check, so while such processes share the file the
  original's race remains among them. ``Mutex(path, remove=False)`` (or
  ``Mutex.remove_on_release = False`` for every ``Mutex``) keeps the file,
  which makes a ``lock()``/``release()`` pair several times cheaper (no
  file to create and delete each time).
- **Threads are excluded.** Two threads using one ``Mutex`` object shared
  one descriptor, so the second ``lock()`` "succeeded" at once; here a
  thread waits while another thread holds the lock through the same object
  (``lock()`` again in the holding thread still returns at once).
- **Releasing is exact.** ``release()`` on a ``Mutex`` that does not hold
  the lock does nothing (the original deleted the lock file anyway, and a
  forked child's ``release()`` unlocked its parent's lock). A child process
  does not hold its parent's lock and cannot release it.
- **Pickling** copies ``path``, ``timeout`` and the callback, never a hold.
- A ``Mutex`` dropped while it holds the lock keeps holding it until the
  process ends, as the original's (whose descriptor was never closed): the
  module keeps the object alive until ``release()``.
- **No self-deadlock.** A thread that holds the lock through one ``Mutex``
  and calls ``lock()`` on another for the same file got a wait that could
  never end (without a timeout) or ended only at the timeout. Here, with a
  ``timeout`` and no ``callback``, it gets the ``BlockingIOError`` at once;
  otherwise ``interlock.AlreadyHeld`` (a ``RuntimeError``) at once.
- The private ``_fd`` is ``None`` while the ``Mutex`` holds nothing, as
  in the original; while it holds the lock it is a true value that is not
  a file descriptor (interlock does not hand out its descriptor).
"""

import errno
import os
import threading

import interlock
from interlock.compat.fasteners._shared import open_file_lock

__all__ = ["Mutex"]
__title__ = "locks"
__version__ = "0.1.1"
__url__ = "https://github.com/rossmacarthur/locks"
__author__ = "Ross MacArthur"
__author_email__ = "ross@macarthur.io"
__license__ = "MIT"
__description__ = "POSIX file system locking using flock"

_get_ident = threading.get_ident


class _Held:
    """What ``Mutex._fd`` is while the lock is held: true, and no descriptor
    (passing it to ``os.close`` or ``fcntl.flock`` raises ``TypeError``)."""

    __slots__ = ()

    def __bool__(self):
        return True

    def __repr__(self):
        return "<interlock.compat.locks: held (no file descriptor)>"


_HELD = _Held()

# The Mutex objects holding the lock, by id: a Mutex dropped while it holds
# keeps holding until the process ends, as the original's leaked descriptor
# did (it was closed only by release()).
_holding = {}


# Who holds each lock file (by the FileLock's absolute path) in this
# process: (pid, thread id). The FileLock's own record knows the file by its
# inode, which changes each time release() deletes it and lock() makes it
# anew; this one lets a thread that asks for a file it holds through another
# Mutex be answered at once.
_by_path = {}


# This process's id, kept up to date across fork (a getpid() call per
# lock() and release() is a system call each).
_pid = [os.getpid()]


def _forget_holds_in_child():
    # A forked child holds none of its parent's locks.
    _pid[0] = os.getpid()
    _holding.clear()
    _by_path.clear()


os.register_at_fork(after_in_child=_forget_holds_in_child)


class Mutex:
    """An exclusive lock on the file at ``path``, between processes and
    threads.

    ``timeout`` (seconds) bounds how long ``lock()`` waits; ``callback``,
    when given, is called once if the lock cannot be had at once (or within
    ``timeout``), after which ``lock()`` waits for ever. ``release()``
    deletes the lock file, as the original did (safely: see the module
    docstring); ``remove=False`` keeps it.
    """

    #: Whether ``release()`` deletes the lock file (the original did; see
    #: the module docstring). Per object: ``Mutex(path, remove=False)``.
    remove_on_release = True

    def __init__(self, path, timeout=None, callback=None, *, remove=None):
        self.path = path
        self.timeout = timeout
        self._callback = callback
        if remove is not None:
            self.remove_on_release = bool(remove)
        self._init_state()

    def _init_state(self):
        self._lock = None  # interlock.FileLock, made on first lock()
        self._guard = None
        self._owner = None  # (pid, thread id) of the holder
        self._mu = threading.Lock()

    def lock(self):
        """Acquires the lock (see the class docstring for how long it waits).

        Raises ``BlockingIOError`` (``errno.EAGAIN``) when a ``timeout`` runs
        out without a ``callback``; ``OSError`` subclasses when the file
        cannot be opened (e.g. ``FileNotFoundError``, ``PermissionError``).
        """
        me = (_pid[0], _get_ident())
        if self._owner == me and self._guard is not None:
            return
        with self._mu:
            fl = self._lock
            if fl is None:
                fl = self._lock = open_file_lock(self.path, flavor="flock")
        key = fl.path
        try:
            if _by_path.get(key) == me:
                raise interlock.AlreadyHeld(
                    "the exclusive lock is held by this thread through another Mutex", key
                )
            if self._callback is None and self.timeout is None:
                guard = fl.write()
            else:
                wait = self.timeout or 0
                try:
                    guard = fl.write(timeout=wait) if wait > 0 else fl.write(blocking=False)
                except (interlock.WouldBlock, interlock.Timeout) as e:
                    if self._callback is None:
                        raise BlockingIOError(
                            errno.EAGAIN, "the lock is held elsewhere", os.fsdecode(self.path)
                        ) from e
                    self._callback()
                    guard = fl.write()
        except interlock.AlreadyHeld as e:
            # This thread holds the file through another Mutex: waiting would
            # never end. With a timeout (and no callback) that is the usual
            # "held elsewhere"; otherwise the AlreadyHeld goes on.
            if self._callback is None and self.timeout is not None:
                raise BlockingIOError(
                    errno.EAGAIN,
                    "this thread holds the lock through another Mutex",
                    os.fsdecode(self.path),
                ) from e
            raise
        self._guard = guard
        self._owner = me
        _holding[id(self)] = self
        _by_path[key] = me

    def release(self):
        """Releases the lock, if this ``Mutex`` holds it; otherwise does
        nothing. With ``remove_on_release`` (the default), deletes the lock
        file as its last act before unlocking."""
        with self._mu:
            guard, owner = self._guard, self._owner
            self._guard = self._owner = None
            if guard is None:
                return
            _holding.pop(id(self), None)
            if self._lock is not None and _by_path.get(self._lock.path) == owner:
                del _by_path[self._lock.path]
            if owner[0] != _pid[0]:
                # A forked child's copy: the lock is the parent's.
                self._lock = None
                return
            if self.remove_on_release:
                # Delete as the last act before unlocking, so that no one can
                # lock this file after us while someone else locks a new one
                # at the path. The next lock() opens (creates) it anew,
                # through the same FileLock.
                try:
                    guard.remove_and_release()
                except (OSError, interlock.LockError):
                    # Gone already, or another file is at the path now (the
                    # original ignored a failed unlink too): released all
                    # the same.
                    pass
                return
            guard.release()

    @property
    def _fd(self):
        """``None`` unless this ``Mutex`` holds the lock (the original's
        descriptor attribute; here, while held, a true value that is not a
        descriptor)."""
        return None if self._guard is None else _HELD

    def __enter__(self):
        self.lock()
        return self

    def __exit__(self, type, value, traceback):
        return self.release()

    def __getstate__(self):
        state = {"path": self.path, "timeout": self.timeout, "_callback": self._callback}
        if "remove_on_release" in self.__dict__:
            state["remove_on_release"] = self.remove_on_release
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_state()
