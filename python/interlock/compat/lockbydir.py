"""lockbydir's API (``from lockbydir import DLock``) over interlock's LeaseLock.

The original (drandreaskrueger/lockbydir, 2015, Python 2 only and not on
PyPI) locks by making a directory ``NAME.lockdir``: the lock is held while
the directory exists and its modification time is less than ``TIMEOUT``
seconds old; a waiter polls every ``CHECKEVERYXSECONDS`` and gives up after
``PATIENCE`` seconds. This module offers the same class, attributes and
calls -- ``DLock(name)``, ``LoopWhileLocked_ThenLocking()`` and
``unlocking()`` returning ``True``/``False``, ``locking()``, ``isLocked()``,
``exists()``, ``age()``, ``timedOut()``, ``breakLock()``, the instance
attributes ``TIMEOUT``, ``PATIENCE``, ``CHECKEVERYXSECONDS``,
``REMOVETIMEDOUT``, ``LOCKDIREXTENSION``, ``lockingTime`` and
``startedWaitingTime`` (set them on the instance or in a subclass, as
before), the module defaults and the ``lockbydir_OS`` helpers -- over
:class:`interlock.LeaseLock` at the same path ``NAME.lockdir``, whose lease
is ``TIMEOUT`` and whose wait is bounded by ``PATIENCE``.

What differs, on purpose:

- **A live holder's lock is never broken.** The original's lock simply
  expired ``TIMEOUT`` seconds after it was taken, whatever the holder was
  still doing, and the next process removed it: two processes then used the
  resource at once. Here the holder's lease is renewed in the background
  (every ``TIMEOUT``/3) for as long as it holds the lock. A lock is taken
  over only when its holder is a dead process of this host (at once, no
  need to wait out ``TIMEOUT``) or when its lease ran out without renewal
  (a holder that is stopped, hung, or on another host that died).
- **A holder is told when it loses its lock.** With the original, a slow
  holder lost its lock silently. Here, if the lease is lost anyway (the
  process was stopped past its lease, the clock jumped, someone removed the
  directory), ``unlocking()`` returns ``False`` (what the original returned
  for a lock that had timed out), :attr:`DLock.lost` becomes ``True``, the
  instance's ``onLost`` callable (if set) is called once with the error,
  and a :class:`LeaseLostWarning` is issued.
- **No races when breaking a stale lock.** The original's "timed out? then
  rmdir" could remove a lock that another process had just taken; here a
  stale lease is broken by an atomic compare-and-swap of the exact lease
  that was judged stale. ``breakLock()`` therefore removes only a lock that
  is free, stale or this instance's own, and returns ``False`` for a live
  holder's lock.
- **Waiting does not poll.** ``LoopWhileLocked_ThenLocking()`` sleeps until
  the holder releases, dies or its lease expires (inotify and a pidfd),
  instead of waking every ``CHECKEVERYXSECONDS`` (kept as an attribute; only
  the ``loopWhileLocked()`` helper still polls with it).
- **Re-locking is refused at once.** A thread that holds the lock (through
  this instance or another of the same name) and asks again gets ``False``
  at once; the original waited out its ``PATIENCE`` before saying
  ``False``. Several instances with the same name still share one lock, as
  before, also between the threads of one process.
- ``TIMEOUT`` is the lease of the lock each holder takes; the original
  required every process to use the same ``TIMEOUT`` (its TODO 2), here the
  holder's lease decides and waiters obey it. ``isLocked()`` and
  ``timedOut()`` judge the lease, not the directory's age; ``age()`` is
  still the seconds since the directory last changed (its last renewal).
- **Mixing with the original on one name is not safe.** The original
  respects a lock directory this module holds (its lease keeps the
  directory's time fresh, and the original's ``rmdir`` fails on it because
  it is not empty). This module, when it first opens a name and finds a
  directory there that interlock did not make, treats it as the original's
  lock: held until it disappears or is ``TIMEOUT`` seconds old (then
  removed, by the original's rule), polled every ``CHECKEVERYXSECONDS``.
  But once this module has used a name, an original's (empty) directory
  appearing there later looks like a dead holder's leftover and is taken
  over at once. Switch every process of a name together.
- The lock directory holds a lease file, and a side directory
  ``NAME.lockdir.lease`` (fencing-token claims and staging) appears next to
  it on first use; leave both alone while the lock is in use.
"""

import datetime
import errno
import logging
import math
import os
import threading
import time
import warnings

import interlock

__all__ = [
    "DLock",
    "LeaseLostWarning",
    "getInfoLogger",
    "howToUse",
]

# The original's defaults (set them on an instance, not here).
CHECKEVERYXSECONDS = 0.03  # only loopWhileLocked() polls with it
TIMEOUT = 10  # the lease each holder takes, in seconds
PATIENCE = 30  # how long LoopWhileLocked_ThenLocking() waits, in seconds
REMOVETIMEDOUT = True  # isLocked() removes a stale lock it finds

# lockbydir_OS's names
LOCKDIREXTENSION = ".lockdir"
ERROR = -1  # age() of a directory whose time cannot be read


_SKEW = 1.0  # interlock's default allowance for clock skew, seconds


def _alive(pid):
    """Whether process pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


class LeaseLostWarning(RuntimeWarning):
    """A DLock's holder lost its lease while it believed it held the lock."""


# -- the lockbydir_OS helpers ------------------------------------------------


def pathExists(pathname):
    """Whether the path exists."""
    return os.path.exists(pathname)


def pathModificationDate(pathname):
    """The path's last modification time as a naive local ``datetime``."""
    return datetime.datetime.fromtimestamp(os.path.getmtime(pathname))


def millisecondsPrecisionOnly(DT):
    """``DT`` with its microseconds cut to whole milliseconds."""
    return DT.replace(microsecond=int(math.floor(DT.microsecond / 1000) * 1000))


def pathAgeInSeconds(pathname):
    """Seconds since the path last changed, or ``ERROR`` (-1) if it cannot be read."""
    try:
        mtime = os.path.getmtime(pathname)
    except OSError:
        return ERROR
    return time.time() - mtime


def mkdir_ReturnWhetherSuccessful(pathname):
    """``mkdir``; ``False`` if it exists (or on EACCES, EPROTO, ENOSPC), else raises."""
    try:
        os.mkdir(pathname)
        return True
    except OSError as e:
        if e.errno in (17, 13, 71, 28):
            return False
        raise


def rmdir_ReturnWhetherSuccessfullyRemoved(pathname):
    """``rmdir``; ``False`` if it is missing (or on EACCES, EPROTO), else raises."""
    try:
        os.rmdir(pathname)
        return True
    except OSError as e:
        if e.errno in (2, 13, 71):
            return False
        raise


# -- DLock ---------------------------------------------------------------------


class DLock:
    """A lock named by a path: ``NAME.lockdir``, shared by every DLock of that name.

    ``LoopWhileLocked_ThenLocking()`` waits up to ``PATIENCE`` seconds and
    returns whether it got the lock; ``unlocking()`` releases it and returns
    whether it was still held. While held, the lease (``TIMEOUT`` seconds)
    is renewed in the background.
    """

    def __init__(self, name):
        self.name = name
        self.lockingTime = None
        self.startedWaitingTime = None
        self.TIMEOUT = TIMEOUT
        self.PATIENCE = PATIENCE
        self.CHECKEVERYXSECONDS = CHECKEVERYXSECONDS
        self.REMOVETIMEDOUT = REMOVETIMEDOUT
        self.LOCKDIREXTENSION = LOCKDIREXTENSION
        #: called once, with the error, if a held lease is lost
        self.onLost = None
        self._lease = None
        self._lease_key = None
        self._guard = None
        self._lost = False

    # -- the three public calls of the original -----------------------------

    def LoopWhileLocked_ThenLocking(self):
        """Waits (at most ``PATIENCE`` seconds) for the lock, then takes it.

        Returns ``True`` when held, ``False`` when patience ran out.
        """
        self.startedWaitingTime = time.time()
        if self.PATIENCE <= 0 or self._guard is not None:
            return False
        return self._take(self.PATIENCE)

    def unlocking(self):
        """Releases the lock this instance holds.

        Returns ``True`` if it was held until now, ``False`` if this
        instance did not hold it or had lost it meanwhile.
        """
        guard = self._guard
        if guard is None:
            return False
        self._guard = None
        self.lockingTime = None
        try:
            guard.release()
        except interlock.LeaseLost as e:
            if not self._lost:
                self._on_lost(e)
            return False
        return not self._lost

    # -- the original's helpers -----------------------------------------------

    def dirname(self):
        """The lock directory's path: name plus ``LOCKDIREXTENSION``."""
        return self.name + self.LOCKDIREXTENSION

    def locking(self):
        """Takes the lock if it is free or stale, without waiting; returns whether it did."""
        self.startWaiting()
        if self._guard is not None:
            return False
        return self._take(0)

    def breakLock(self):
        """Removes the lock directory if nobody live holds it.

        This instance's own lock is released; a free lock or a stale one (a
        dead holder, a lease run out) is removed. Returns ``True`` if there
        was a lock directory and it was removed, ``False`` otherwise -- in
        particular for a lock that a live process holds.
        """
        if self._guard is not None:
            return self.unlocking()
        if not os.path.lexists(self.dirname()):
            return False
        if self._foreign():  # the original's lock: its own rule
            return self._judge_foreign() == "removed"
        try:
            guard = self._lock().lock(blocking=False)
        except (interlock.LockError, OSError):
            return False
        try:
            guard.release()
        except interlock.LockError:
            pass
        return True

    def exists(self):
        """Whether the lock directory exists."""
        return pathExists(self.dirname())

    def age(self):
        """Seconds since the lock directory last changed (its last renewal), or -1."""
        return pathAgeInSeconds(self.dirname())

    def timedOut(self):
        """Whether a lock directory exists that nobody live holds (free to take).

        That is: no lease in it, or a lease past its expiry (plus the clock
        skew interlock allows, 1 s), or one whose holder is a process of
        this host that has died.
        """
        if self._guard is not None or not os.path.lexists(self.dirname()):
            return False
        try:
            holder = self._lock().holder()
        except (interlock.LockError, OSError):
            # the original's lock directory: the original's rule
            return self._foreign() and pathAgeInSeconds(self.dirname()) > self.TIMEOUT
        if holder is None:
            return True
        if holder["expires"] + _SKEW < time.time():
            return True
        return bool(holder["local"]) and holder["pid"] is not None and not _alive(holder["pid"])

    def existsAndNotTimedOut(self):
        """``exists() and not timedOut()``."""
        return self.exists() and not self.timedOut()

    def startWaiting(self):
        """Notes when this instance started waiting (for ``PATIENCE``)."""
        if self.startedWaitingTime is None:
            self.startedWaitingTime = time.time()

    def stillPatience(self):
        """Whether less than ``PATIENCE`` seconds passed since waiting started."""
        return (time.time() - self.startedWaitingTime) < self.PATIENCE

    def loopWhileLocked(self):
        """Waits, polling every ``CHECKEVERYXSECONDS``, while the lock is held
        (at most until patience runs out). Returns whether it had to wait."""
        if not self.isLocked():
            return False
        self.startWaiting()
        while self.isLocked() and self.stillPatience():
            time.sleep(self.CHECKEVERYXSECONDS)
        return True

    def removeIfTimedOut(self):
        """Removes the lock directory if nobody live holds it."""
        if self.timedOut():
            self.breakLock()

    def isLocked(self):
        """Whether a live holder (possibly this instance) holds the lock.

        A stale lock found here is removed when ``REMOVETIMEDOUT`` is set.
        """
        if not self.exists():
            return False
        if self.timedOut():
            if self.REMOVETIMEDOUT:
                self.removeIfTimedOut()
            return False
        return True

    # -- beyond the original --------------------------------------------------

    @property
    def lost(self):
        """Whether this instance's lease was lost while it held the lock."""
        return self._lost

    @property
    def token(self):
        """The fencing token of the hold, or ``None`` when not holding."""
        guard = self._guard
        return None if guard is None else guard.token

    # -- machinery ------------------------------------------------------------

    def _lock(self):
        path = os.path.abspath(self.dirname())
        ttl = float(self.TIMEOUT)
        key = (path, ttl)
        if self._lease_key != key:
            if self._foreign():  # as interlock itself refuses it
                raise IsADirectoryError(
                    errno.EEXIST,
                    "a directory that interlock did not make is at the lock path",
                    path,
                )
            self._lease = interlock.LeaseLock(
                path, ttl=ttl, keep_alive=True, on_lost=self._on_lost
            )
            self._lease_key = key
        return self._lease

    def _take(self, patience):
        deadline = time.monotonic() + patience
        retried = False
        while True:
            try:
                lease = self._lock()
                break
            except (interlock.LockError, IsADirectoryError, NotADirectoryError):
                # Perhaps the original lockbydir's lock directory (interlock
                # refuses to take over a directory it did not make): judge
                # it by the original's rule, and poll as the original does.
                verdict = self._judge_foreign()
                if verdict is None:
                    if retried:
                        raise
                    verdict, retried = "removed", True  # it may just have gone
            if verdict == "removed":
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self.CHECKEVERYXSECONDS, left))
        left = deadline - time.monotonic() if patience > 0 else 0
        try:
            if left > 0:
                guard = lease.lock(timeout=left)
            else:
                guard = lease.lock(blocking=False)
        except (interlock.WouldBlock, interlock.Timeout, interlock.AlreadyHeld):
            return False
        self._lost = False
        self._guard = guard
        self.lockingTime = time.time()
        self.startedWaitingTime = None
        return True

    def _foreign(self):
        """Whether the lock path is a directory without interlock's state beside it."""
        path = os.path.abspath(self.dirname())
        return os.path.isdir(path) and not os.path.lexists(path + ".lease")

    def _judge_foreign(self):
        """For a directory the original lockbydir made at the lock path:
        "removed" if the original would remove it (older than TIMEOUT) and
        it is gone, "held" otherwise; None if it is not such a directory."""
        if not self._foreign():
            return None
        if pathAgeInSeconds(self.dirname()) > self.TIMEOUT:
            try:
                os.rmdir(self.dirname())
                return "removed"
            except OSError:
                pass
        return "held"

    def _on_lost(self, error=None):
        self._lost = True
        warnings.warn(
            LeaseLostWarning(
                "lost the lock {} while holding it: {}".format(
                    self.dirname(), error or "lease lost"
                )
            ),
            stacklevel=2,
        )
        callback = self.onLost
        if callback is not None:
            callback(error)


_log_lock = threading.Lock()


def getInfoLogger(ID=""):
    """A ``logger.info`` that prefixes messages with a time stamp (ms) and ``ID``."""
    with _log_lock:
        logger = logging.getLogger("{}.{}".format(__name__, ID or "log"))
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(
                logging.Formatter(
                    "[%(asctime)s.%(msecs)03d] " + ID + " %(message)s", datefmt="%I:%M:%S"
                )
            )
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)
            logger.propagate = False
    return logger.info


def howToUse(secs=9):
    """The original's shortest example: wait for the lock, use it, unlock."""
    lock = DLock("LOCKNAME")
    acquired = lock.LoopWhileLocked_ThenLocking()
    if acquired:
        time.sleep(secs)
        lock.unlocking()
    return acquired


# -- lockbydir_OS's own checks of its helpers -----------------------------------
# (The original module ran these as its self-test; they print what the
# helpers return, in a directory "testing" under the current directory.)


def mkdirRmdir(pathname, Q):
    """Makes, then removes, the directory ``pathname``; appends the pair of
    results to the list ``Q`` (an ``(errno, error)`` pair in place of a
    result that raised)."""
    results = []
    for step in (mkdir_ReturnWhetherSuccessful, rmdir_ReturnWhetherSuccessfullyRemoved):
        try:
            results.append(step(pathname))
        except Exception as e:  # reported in Q, as the original did
            results.append((getattr(e, "errno", None), e))
    Q.append(tuple(results))


def test_mkdirRmdir():
    """Prints the results of mkdir, mkdir, rmdir, rmdir of ``testing``
    (expected: True, False, True, False)."""
    pathname = "testing"
    rmdir_ReturnWhetherSuccessfullyRemoved(pathname)
    print("mkdir attempt 1: result =", mkdir_ReturnWhetherSuccessful(pathname))
    print("exists, ageInSeconds =", pathExists(pathname), pathAgeInSeconds(pathname))
    print("mkdir attempt 2: result =", mkdir_ReturnWhetherSuccessful(pathname))
    print("rmdir attempt 1: result =", rmdir_ReturnWhetherSuccessfullyRemoved(pathname))
    print("exists, ageInSeconds =", pathExists(pathname), pathAgeInSeconds(pathname))
    print("rmdir attempt 2: result =", rmdir_ReturnWhetherSuccessfullyRemoved(pathname))


def test_mkdirRmdirConcurrent(n):
    """``n`` threads each run :func:`mkdirRmdir` on ``testing`` at once;
    prints their results (all True or False when nothing unexpected
    happened) and returns them."""
    Q = []
    threads = [threading.Thread(target=mkdirRmdir, args=("testing", Q)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(Q)
    return Q


def tests():
    """Runs both checks of the helpers."""
    print("lockbydir OS-level routines. Tests.")
    print("Test 1:")
    test_mkdirRmdir()
    print("Test 2:")
    test_mkdirRmdirConcurrent(10)
