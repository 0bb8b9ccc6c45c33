"""Helpers of ``fasteners._utils`` that programs and tests import.

Same names and behaviour as fasteners 0.20's module: ``BLATHER``,
``canonicalize_path``, ``pick_first_not_none``, ``LockStack``,
``RetryAgain``, ``Retry`` and ``StopWatch`` (on ``time.monotonic``).
Nothing in interlock's own locks polls; ``Retry`` remains for code that
subclasses a lock and overrides its ``trylock``.
"""

import logging
import os
import time

#: The log level fasteners uses for its most detailed messages.
BLATHER = 5

LOG = logging.getLogger("fasteners")


def canonicalize_path(path):
    """Returns ``path`` as bytes in the filesystem encoding (str, bytes, or
    anything whose ``str()`` is a path)."""
    if isinstance(path, bytes):
        return path
    if not isinstance(path, str):
        path = str(path)
    return os.fsencode(path)


def pick_first_not_none(*values):
    """The first of ``values`` that is not None, or None."""
    return next((v for v in values if v is not None), None)


class LockStack:
    """Acquires several locks in turn and releases the acquired ones, last
    first, when its ``with`` block ends. Not for use by several threads at
    once."""

    def __init__(self, logger=None):
        self._stack = []
        self._logger = pick_first_not_none(logger, LOG)

    def acquire_lock(self, lock):
        """Acquires ``lock`` (its ``acquire()``); remembers it if that
        returned true, and returns what it returned."""
        ok = lock.acquire()
        if ok:
            self._stack.append(lock)
        return ok

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        total = len(self._stack)
        while self._stack:
            left = len(self._stack)
            lock = self._stack.pop()
            try:
                lock.release()
            except Exception:
                self._logger.exception(
                    "Failed releasing lock %s from lock stack with %s locks", left, total
                )


class RetryAgain(Exception):
    """Raised by a function run under :class:`Retry` to ask for another try."""


class Retry:
    """Calls a function until it stops raising :class:`RetryAgain`, sleeping
    ``attempts * delay`` (at most ``max_delay``, and never past the
    :class:`StopWatch` ``watch``'s deadline) between attempts."""

    def __init__(self, delay, max_delay, sleep_func=time.sleep, watch=None):
        self.delay = delay
        self.max_delay = max_delay
        self.sleep_func = sleep_func
        self.watch = watch
        self.attempts = 0

    def __call__(self, fn, *args, **kwargs):
        while True:
            self.attempts += 1
            try:
                return fn(*args, **kwargs)
            except RetryAgain:
                pause = max(0.0, min(self.attempts * self.delay, self.max_delay))
                if self.watch is not None:
                    left = self.watch.leftover()
                    if left is not None:
                        pause = min(pause, left)
                self.sleep_func(pause)


class StopWatch:
    """Measures elapsed time on ``time.monotonic``, optionally against a
    ``duration`` (seconds). Use ``start()``, or ``with StopWatch(d) as w:``
    (which stops it at the end of the block)."""

    def __init__(self, duration=None):
        self.duration = duration
        self.started_at = None
        self.stopped_at = None

    def start(self):
        """Starts (or restarts) the watch."""
        self.started_at = time.monotonic()
        self.stopped_at = None

    def elapsed(self):
        """Seconds since start, up to the stop if stopped (never negative)."""
        end = self.stopped_at if self.stopped_at is not None else time.monotonic()
        return max(0.0, end - self.started_at)

    def leftover(self):
        """Seconds left of ``duration`` (0.0 once past it), or None without one."""
        if self.duration is None:
            return None
        return max(0.0, self.duration - self.elapsed())

    def expired(self):
        """Whether more than ``duration`` has elapsed (never, without one)."""
        return self.duration is not None and self.elapsed() > self.duration

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        self.stopped_at = time.monotonic()
