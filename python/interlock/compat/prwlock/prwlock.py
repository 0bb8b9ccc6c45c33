"""prwlock's ``RWLockPosix``, over interlock's :class:`interlock.ShmRwLock`.

prwlock puts a process-shared ``pthread_rwlock_t`` in a page of a deleted
temporary file and shares it with child processes by pickling the file
descriptor. A process killed while holding that lock wedges every other
process forever (glibc has no robust rwlock; a dead reader's count is
leaked too, so writers never get in again). This module keeps prwlock's
calls, return values and exceptions and puts interlock's shared-memory
reader-writer lock underneath, which recovers from holders killed at any
point. What differs from the original is listed in the package docstring
(:mod:`interlock.compat.prwlock`).
"""

import errno
import itertools
import os
import warnings
import weakref
from threading import get_ident

import interlock

__all__ = [
    "PTHREAD_PROCESS_SHARED",
    "OwnerDiedWarning",
    "RWLockOSX",
    "RWLockPosix",
]

#: The value prwlock passes to ``pthread_rwlockattr_setpshared``. Kept so
#: that ``prwlock.set_pthread_process_shared`` works as before: a value other
#: than 0 (``PTHREAD_PROCESS_PRIVATE``) or 1 (``PTHREAD_PROCESS_SHARED``)
#: makes the next ``RWLock()`` raise ``OSError(EINVAL)``, as
#: ``pthread_rwlockattr_setpshared`` does. Either valid value gives a lock
#: shared between processes (that is what the lock is for).
PTHREAD_PROCESS_SHARED = 1


class OwnerDiedWarning(RuntimeWarning):
    """A process died holding the lock for writing; this acquisition got it.

    prwlock would have hung forever here. The data the dead writer was
    changing may be half-written: turn this warning into an error
    (``warnings.simplefilter("error", OwnerDiedWarning)``) to stop instead.
    A write acquisition that sees it marks the lock repaired.
    """


_EDEADLK_MESSAGE = "pthread_rwlock_wrlock failed " + os.strerror(errno.EDEADLK)


class _Shared:
    """One anonymous ShmRwLock, the token that names it in pickles, and the
    descriptor that stands for it as prwlock's ``_fd``."""

    __slots__ = ("rw", "token", "fd", "__weakref__")

    def __init__(self, rw):
        self.rw = rw
        self.token = (os.getpid(), next(_tokens))
        # prwlock's lock lives in a page of a deleted temporary file whose
        # descriptor is the private ``_fd``; code (prwlock's own tests among
        # it) compares it across pickling or closes it. This lock needs no
        # file, so ``_fd`` is an empty memfd of its own: the same number
        # wherever the lock is unpickled in this process or a forked child,
        # and closing it changes nothing about the lock.
        self.fd = os.memfd_create("interlock-compat-prwlock", os.MFD_CLOEXEC)
        st = os.fstat(self.fd)
        weakref.finalize(self, _close_if_ours, self.fd, (st.st_dev, st.st_ino))
        _registry[self.token] = self


def _close_if_ours(fd, ident):
    """Closes fd unless someone closed it already (and the number may now
    name another file: that one is left alone)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return
    if (st.st_dev, st.st_ino) == ident:
        os.close(fd)


# The locks of this process by token. Anonymous shared memory cannot be
# reopened by name; a pickle names the lock by this token, which a process
# forked after the lock was made finds here (the registry and the mapping
# are both inherited), exactly where prwlock's pickled descriptor works.
_registry = weakref.WeakValueDictionary()
_tokens = itertools.count()

# Every lock object of this process, so that a forked child forgets the
# parent's holds (interlock already makes an inherited guard a no-op in the
# child; this keeps the bookkeeping of holds in step with it).
_instances = weakref.WeakSet()


def _forget_holds_in_child():
    for lock in list(_instances):
        lock._holds = []
        lock._nested = {}
        lock.pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_holds_in_child)


class RWLockPosix:
    """A reader-writer lock shared by the processes that inherit or unpickle it.

    ``acquire_read``/``acquire_write`` block (or wait ``timeout`` seconds) and
    return ``True`` when held, ``False`` when the time ran out;
    ``try_acquire_*`` never wait; ``release`` releases the latest hold (the
    calling thread's, if it has one) and raises ``ValueError`` when nothing
    is held.
    """

    def __init__(self):
        if PTHREAD_PROCESS_SHARED not in (0, 1):
            raise OSError(
                errno.EINVAL,
                "pthread_rwlockattr_setpshared failed " + os.strerror(errno.EINVAL),
            )
        self._setup(_Shared(interlock.ShmRwLock(None)))

    def _setup(self, shared):
        self._shared = shared
        self._rw = shared.rw
        # One (guard, writing, thread ident) per hold, latest last; and per
        # thread, the read locks it took again while holding one (pthread
        # counts those; they need no guard of their own).
        self._holds = []
        self._nested = {}
        self.pid = os.getpid()
        _instances.add(self)

    # -- bookkeeping -------------------------------------------------------

    def _own(self, me):
        for hold in reversed(self._holds):
            if hold[2] == me:
                return hold
        return None

    def _again(self, writing, forever):
        """The calling thread may hold this lock already: decide at once.

        A nested read lock is counted; any other combination would wait for
        itself, which pthread reports as EDEADLK for a blocking call; a
        bounded call just fails. None if this thread holds nothing here.
        """
        me = get_ident()
        hold = self._own(me)
        if hold is None:
            return None
        if not writing and not hold[1]:
            self._nested[me] = self._nested.get(me, 0) + 1
            return True
        if forever:
            raise OSError(errno.EDEADLK, _EDEADLK_MESSAGE)
        return False

    def _acquire(self, writing, blocking, timeout):
        """The careful path: this object holds something, or a timeout."""
        forever = blocking and timeout is None
        if self._holds:
            again = self._again(writing, forever)
            if again is not None:
                return again
        take = self._rw.write if writing else self._rw.read
        try:
            if timeout is None:
                guard = take(blocking)
            else:
                guard = take(timeout=timeout if timeout > 0 else 0)
        except interlock.LockError as e:
            return self._refused(e, writing, forever)
        self._holds.append((guard, writing, get_ident()))
        return True

    def _refused(self, e, writing, forever):
        """What an acquisition that raised e returns (or raises)."""
        if isinstance(e, (interlock.WouldBlock, interlock.Timeout)):
            return False
        if isinstance(e, interlock.AlreadyHeld):
            # Held by this thread through another RWLock object of this lock.
            if forever:
                raise OSError(errno.EDEADLK, _EDEADLK_MESSAGE) from None
            return False
        if isinstance(e, interlock.OwnerDied):
            guard = e.guard
            warnings.warn(
                OwnerDiedWarning(
                    "a process died holding this lock for writing; "
                    "the data it protects may be inconsistent"
                ),
                stacklevel=3,
            )
            if writing:
                guard.clear_poison()
            self._holds.append((guard, writing, get_ident()))
            return True
        raise e

    # -- prwlock's API -----------------------------------------------------
    # (The common case, nothing held through this object and no timeout, is
    # written out in each method: it is most of what a program does.)

    def acquire_read(self, timeout=None):
        """acquire_read([timeout=None])

        Takes a shared (read) lock. Returns ``True`` when held; with
        *timeout* (seconds), ``False`` if it could not be taken in time.
        """
        if self._holds or timeout is not None:
            return self._acquire(False, True, timeout)
        try:
            guard = self._rw.read()
        except interlock.LockError as e:
            return self._refused(e, False, True)
        self._holds.append((guard, False, get_ident()))
        return True

    def acquire_write(self, timeout=None):
        """acquire_write([timeout=None])

        Takes the exclusive (write) lock. Returns ``True`` when held; with
        *timeout* (seconds), ``False`` if it could not be taken in time.
        A thread that asks again, blocking, for a write lock it holds gets
        ``OSError(EDEADLK)`` instead of hanging.
        """
        if self._holds or timeout is not None:
            return self._acquire(True, True, timeout)
        try:
            guard = self._rw.write()
        except interlock.LockError as e:
            return self._refused(e, True, True)
        self._holds.append((guard, True, get_ident()))
        return True

    def try_acquire_read(self):
        """Takes a read lock if that is possible at once; returns whether it did."""
        return self._acquire(False, False, None)

    def try_acquire_write(self):
        """Takes the write lock if that is possible at once; returns whether it did."""
        return self._acquire(True, False, None)

    def release(self):
        """Releases a lock taken through this object: the calling thread's
        latest hold, or if it has none, the object's latest.

        Raises ``ValueError`` if this object holds nothing.
        """
        me = get_ident()
        if self._nested:
            n = self._nested.get(me)
            if n:
                if n == 1:
                    del self._nested[me]
                else:
                    self._nested[me] = n - 1
                return
        holds = self._holds
        while True:
            if not holds:
                raise ValueError("Tried to release a released lock")
            hold = holds[-1]
            if hold[2] != me:
                hold = self._own(me) or hold
            try:
                holds.remove(hold)  # atomic: of two threads, one wins
            except ValueError:
                continue  # another thread released it just now: look again
            hold[0].release()
            return

    @property
    def _fd(self):
        """prwlock's private descriptor: here an empty memfd that stands for
        the lock (see ``_Shared``); closing it does not affect the lock."""
        return self._shared.fd

    @property
    def nlocks(self):
        """How many holds this object has (prwlock's counter)."""
        return len(self._holds) + sum(self._nested.values())

    # -- pickling: the lock travels, the holds stay ------------------------

    def __reduce__(self):
        if self._rw.name is not None:  # made by _adopt: travels by name
            return (_rebuild_named, (type(self), self._rw.name))
        return (_rebuild, (type(self), self._shared.token))

    def __del__(self):
        holds = getattr(self, "_holds", None)
        if holds:
            for hold in holds:
                try:
                    hold[0].release()
                except Exception:
                    pass
            holds.clear()


def _rebuild(cls, token):
    shared = _registry.get(token)
    if shared is None:
        raise RuntimeError(
            f"this prwlock RWLock was made by process {token[0]} and reaches only that "
            "process and the processes it forks after making it (prwlock's own "
            "locks travel the same way, as an inherited file descriptor); for "
            "multiprocessing's spawn or forkserver start methods, or unrelated "
            "processes, share a named interlock.ShmRwLock instead"
        )
    lock = cls.__new__(cls)
    lock._setup(shared)
    return lock


def _adopt(rw, cls=None):
    """An RWLock over an existing ``interlock.ShmRwLock`` (not prwlock's API).

    A named lock pickles by its name, so it reaches any process, also
    those of multiprocessing's spawn start method; the harness uses this
    for workers that it starts itself.
    """
    lock = (cls or RWLockPosix).__new__(cls or RWLockPosix)
    lock._setup(_Shared(rw))
    return lock


def _rebuild_named(cls, name):
    return _adopt(interlock.ShmRwLock(name), cls)


#: prwlock picks ``RWLockOSX`` on macOS; here both names are the same class.
RWLockOSX = RWLockPosix
