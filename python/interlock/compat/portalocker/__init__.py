"""portalocker's ``BoundedSemaphore`` (and ``NamedBoundedSemaphore``) on
interlock.

The original's shape: ``BoundedSemaphore(maximum, name, filename_pattern,
directory, timeout, check_interval, fail_when_locked)``; the slots are the
same files (``directory / filename_pattern.format(name=..., number=...)``),
each taken with an exclusive ``flock`` through an interlock ``FileLock``
(flavor ``"flock"``), so a compat semaphore and the real portalocker on the
same name and directory exclude each other. ``acquire`` returns the slot's
lock (``.filename``, ``.release()``) or raises ``AlreadyLocked`` when every
slot stayed taken for the whole timeout (``fail_when_locked=False``: returns
None instead); a second ``acquire`` on an instance holding a slot raises
``LockException``; ``release`` is a no-op when nothing is held; ``with``
acquires and releases.

What differs from the original (docs/python.md lists these too):

- No polling. The original sweeps the slots every ``check_interval`` (0.25 s
  by default), so a freed slot waits up to that long for a taker. Here a
  waiting ``acquire`` runs one helper thread per slot (at most
  ``MAX_HELPERS``; each then watches several slots in turn), each blocked in
  the kernel on its slot's ``flock``: a slot freed by anyone, compat or
  original, is taken at once. ``check_interval`` is accepted and ignored.
  The helpers re-arm their wait every 0.2 s to see that the acquisition
  ended; after one of them won, another may still get a slot within that
  0.2 s and gives it back at once (a try elsewhere at that instant sees it
  busy). After a timed-out ``acquire`` no helper remains (their waits end
  at the deadline).
- ``maximum`` must be an int of at least 1 (``TypeError`` / ``ValueError``
  at construction; the original accepts 0 and then never acquires).
- Only the semaphore part of portalocker is here (with its exceptions and
  ``DEFAULT_*`` constants): ``Lock``, ``RLock``, ``lock()`` and the others
  are not, so a program that also uses those should import this module for
  the semaphore instead of ``interlock.compat.install("portalocker")``.
- The returned slot lock is a small object (``filename``, ``release()``,
  ``held``), not a full ``portalocker.Lock``.
"""

from __future__ import annotations

import pathlib
import random
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import interlock

from . import exceptions
from .exceptions import AlreadyLocked, BaseLockException, LockException

__all__ = [
    "DEFAULT_CHECK_INTERVAL",
    "DEFAULT_FAIL_WHEN_LOCKED",
    "DEFAULT_TIMEOUT",
    "AlreadyLocked",
    "BaseLockException",
    "BoundedSemaphore",
    "LockException",
    "NamedBoundedSemaphore",
    "exceptions",
]

DEFAULT_TIMEOUT = 5
DEFAULT_CHECK_INTERVAL = 0.25
DEFAULT_FAIL_WHEN_LOCKED = False

#: The most helper threads one waiting ``acquire`` runs.
MAX_HELPERS = 32
#: How long a helper blocks on one slot before it looks whether the
#: acquisition ended (or, watching several slots, moves to the next).
_SLICE = 0.2

Filename = Union[str, pathlib.Path]


def _coalesce(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


class SlotLock:
    """The slot a semaphore holds: an exclusive flock on one slot file."""

    def __init__(self, filename: Filename, guard: interlock.Guard) -> None:
        self.filename = str(filename)
        self._guard: Optional[interlock.Guard] = guard

    @property
    def held(self) -> bool:
        return self._guard is not None and self._guard.held

    def release(self) -> None:
        g, self._guard = self._guard, None
        if g is not None and g.held:
            g.release()

    def __repr__(self) -> str:
        return f"<SlotLock {self.filename} {'held' if self.held else 'released'}>"


def _try_slot(lock: interlock.FileLock) -> Optional[interlock.Guard]:
    """The slot's flock if free now, else None."""
    try:
        return lock.write(blocking=False)
    except (interlock.WouldBlock, interlock.AlreadyHeld):
        return None


class _Race:
    """Helper threads, each blocked in the kernel on its slots: the first to
    get one wins; the others give theirs back."""

    def __init__(self, filenames: Sequence[Filename], deadline: float) -> None:
        self.deadline = deadline
        self.mu = threading.Lock()
        self.won = threading.Event()
        self.done = False
        self.result: Any = None
        n = min(len(filenames), MAX_HELPERS)
        self.threads = [
            threading.Thread(
                target=self._watch,
                args=(list(filenames[i::n]),),
                name="interlock-portalocker-wait",
                daemon=True,
            )
            for i in range(n)
        ]

    def _offer(self, value: Any) -> bool:
        with self.mu:
            if self.done:
                return False
            self.done = True
            self.result = value
        self.won.set()
        return True

    def _watch(self, paths: list[Filename]) -> None:
        locks = [interlock.FileLock(str(p), flavor="flock") for p in paths]
        i = 0
        while True:
            with self.mu:
                if self.done:
                    return
            left = self.deadline - time.monotonic()
            if left <= 0:
                return
            try:
                g = locks[i].write(timeout=min(left, _SLICE))
            except interlock.Timeout:
                g = None
            except BaseException as e:  # noqa: BLE001 - handed to the acquirer
                self._offer(e)
                return
            if g is None and len(paths) > 1:
                for j, lk in enumerate(locks):
                    if j != i:
                        try:
                            g = lk.write(blocking=False)
                            i = j
                            break
                        except interlock.WouldBlock:
                            pass
            if g is not None:
                if not self._offer(SlotLock(paths[i], g)):
                    g.release()
                return
            i = (i + 1) % len(paths)

    def run(self) -> Optional[SlotLock]:
        for t in self.threads:
            t.start()
        try:
            self.won.wait(max(0.0, self.deadline - time.monotonic()))
        finally:
            with self.mu:
                self.done = True
                result, self.result = self.result, None
            if isinstance(result, SlotLock) and sys.exc_info()[0] is not None:
                result.release()  # interrupted (Ctrl-C): keep nothing
        if result is None:
            # Timed out: every helper's wait ends at the deadline; wait for
            # them, so that none takes (and gives back) a slot after the
            # acquisition has failed, which a try elsewhere would see busy.
            for t in self.threads:
                t.join()
        if isinstance(result, BaseException):
            raise result
        return result


class BoundedSemaphore:
    """At most ``maximum`` holders across processes, one slot file each."""

    lock: Optional[SlotLock]

    def __init__(
        self,
        maximum: int,
        name: str = "bounded_semaphore",
        filename_pattern: str = "{name}.{number:02d}.lock",
        directory: str = tempfile.gettempdir(),
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        check_interval: Optional[float] = DEFAULT_CHECK_INTERVAL,
        fail_when_locked: Optional[bool] = True,
    ) -> None:
        if isinstance(maximum, bool) or not isinstance(maximum, int):
            raise TypeError(f"maximum must be an int, not {maximum!r}")
        if maximum < 1:
            raise ValueError(f"maximum must be at least 1, not {maximum}")
        self.maximum = maximum
        self.name = name
        self.filename_pattern = filename_pattern
        self.directory = directory
        self.lock = None
        self.timeout = _coalesce(timeout, DEFAULT_TIMEOUT)
        self.check_interval = _coalesce(check_interval, DEFAULT_CHECK_INTERVAL)
        self.fail_when_locked = _coalesce(fail_when_locked, DEFAULT_FAIL_WHEN_LOCKED)
        self._state_lock = threading.RLock()
        self._slots: dict[str, interlock.FileLock] = {}
        if not name or name == "bounded_semaphore":
            warnings.warn(
                "`BoundedSemaphore` without an explicit `name` argument is deprecated, "
                "use NamedBoundedSemaphore",
                DeprecationWarning,
                stacklevel=2,
            )

    def get_filenames(self) -> Sequence[pathlib.Path]:
        """Every slot's path, in order."""
        return [self.get_filename(n) for n in range(self.maximum)]

    def get_random_filenames(self) -> Sequence[pathlib.Path]:
        """Every slot's path, shuffled."""
        names = list(self.get_filenames())
        random.shuffle(names)
        return names

    def get_filename(self, number: int) -> pathlib.Path:
        """The path of slot ``number``."""
        return pathlib.Path(self.directory) / self.filename_pattern.format(
            name=self.name, number=number
        )

    def _slot(self, filename: Filename) -> interlock.FileLock:
        """The slot file's lock, opened once per instance (OSError for a
        bad path, each time until it opens)."""
        key = str(filename)
        lock = self._slots.get(key)
        if lock is None:
            lock = self._slots[key] = interlock.FileLock(key, flavor="flock")
        return lock

    def _publish(self, slot: SlotLock) -> bool:
        with self._state_lock:
            if self.lock is None:
                self.lock = slot
                return True
        slot.release()
        raise LockException("Already locked")

    def try_lock(self, filenames: Sequence[Filename]) -> bool:
        """One sweep without waiting: takes the first free slot."""
        if self.lock is not None:
            raise LockException("Already locked")
        for filename in filenames:
            g = _try_slot(self._slot(filename))
            if g is not None:
                return self._publish(SlotLock(filename, g))
        return False

    def acquire(
        self,
        timeout: Optional[float] = None,
        check_interval: Optional[float] = None,
        fail_when_locked: Optional[bool] = None,
    ) -> Optional[SlotLock]:
        """Takes a slot, waiting up to the timeout: the slot's lock, or
        ``AlreadyLocked`` (None with ``fail_when_locked=False``)."""
        if self.lock is not None:
            raise LockException("Already locked")
        filenames = self.get_filenames()
        deadline = time.monotonic() + _coalesce(timeout, self.timeout, 0.0)
        if self.try_lock(filenames):
            return self.lock
        if deadline > time.monotonic():
            slot = _Race(filenames, deadline).run()
            if slot is not None and self._publish(slot):
                return self.lock
        if _coalesce(fail_when_locked, self.fail_when_locked):
            raise AlreadyLocked()
        return None

    def release(self) -> None:
        """Gives the slot back, if this instance holds one."""
        with self._state_lock:
            slot, self.lock = self.lock, None
        if slot is not None:
            slot.release()

    def __enter__(self) -> Optional[SlotLock]:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class NamedBoundedSemaphore(BoundedSemaphore):
    """``BoundedSemaphore`` with a name of yours or a random one."""

    def __init__(
        self,
        maximum: int,
        name: Optional[str] = None,
        filename_pattern: str = "{name}.{number:02d}.lock",
        directory: str = tempfile.gettempdir(),
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        check_interval: Optional[float] = DEFAULT_CHECK_INTERVAL,
        fail_when_locked: Optional[bool] = True,
    ) -> None:
        if name is None:
            name = f"bounded_semaphore.{random.randint(0, 1000000):d}"
        super().__init__(
            maximum, name, filename_pattern, directory, timeout, check_interval, fail_when_locked
        )


def __getattr__(name: str) -> Any:
    raise AttributeError(
        f"interlock.compat.portalocker offers portalocker's BoundedSemaphore, "
        f"NamedBoundedSemaphore and exceptions only, not {name!r}"
    )
