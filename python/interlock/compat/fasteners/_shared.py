"""The in-process state behind the compat inter-process locks.

Every compat lock object (``InterProcessLock``, ``InterProcessReaderWriterLock``,
the ``process_mechanism`` functions) that names the same lock file, by the
same absolute path, in this process shares one :class:`_File`: one
``interlock.FileLock`` (fcntl flavor: an OFD lock on byte 0, which a classic
``fcntl.lockf`` of the whole file, as the real fasteners takes, conflicts
with) and a table of which threads hold it and how often.

Why: interlock's ``FileLock`` excludes threads from each other, so without a
table a thread asking again for a file it holds would wait for itself. The
table makes that defined instead: the same thread asking again counts (a
read inside a read or a write, a write inside a write); a thread holding a
read that asks for a write gets ``RuntimeError`` at once (two such threads,
or processes, would otherwise wait for each other forever). A hold belongs to
the thread that took it, but any thread may release it (the objects record
whose hold they took).

After ``os.fork`` the child forgets every hold and every open ``FileLock``
(the kernel lock belongs to the parent): a release in the child of a hold
taken by the parent releases nothing.
"""

import errno
import os
import threading
import weakref

import interlock

_local = threading.local()


def thread_token():
    """An object naming the calling thread for as long as it lives (thread
    ids are reused after a thread ends; these objects are not)."""
    try:
        return _local.token
    except AttributeError:
        token = _local.token = object()
        return token


def _key(path):
    return os.path.abspath(os.fsdecode(path))


def open_file_lock(path, **options):
    """``interlock.FileLock(path, **options)``, tried again when the file
    vanishes while it is being opened (another process deleted it between
    interlock's open and its look at the file); the parent directory must
    exist."""
    for _ in range(100):
        try:
            return interlock.FileLock(path, **options)
        except FileNotFoundError:
            if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise
    return interlock.FileLock(path, **options)


def would_block(path):
    """The error the originals' low-level try-lock raised when the lock is
    held elsewhere: an ``OSError`` (``BlockingIOError``) with ``EAGAIN``."""
    return BlockingIOError(errno.EAGAIN, "the lock is held elsewhere", os.fsdecode(path))


class _File:
    __slots__ = ("path", "lock", "mu", "holds", "__weakref__")

    def __init__(self, path):
        self.path = path
        self.lock = None
        self.mu = threading.Lock()
        # thread token -> [exclusive, count, guard]
        self.holds = {}

    def _open(self):
        # fasteners creates missing parent directories when it first locks.
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        return open_file_lock(self.path)

    def acquire(self, exclusive, blocking, timeout):
        """Takes (or counts) a hold for this thread. Returns the thread token
        that owns the hold, or None when the lock was busy (try) or the wait
        timed out."""
        me = thread_token()
        with self.mu:
            h = self.holds.get(me)
            if h is not None:
                if h[0] or not exclusive:
                    h[1] += 1
                    return me
                raise RuntimeError(
                    f"this thread holds a read lock on {self.path} and asked for a write lock: "
                    "upgrading a read lock is not supported (release it first)"
                )
            if self.lock is None:
                self.lock = self._open()
            lock = self.lock
        take = lock.write if exclusive else lock.read
        try:
            try:
                guard = take(blocking=blocking, timeout=None if not blocking else timeout)
            except FileNotFoundError:
                # The directory was removed since we opened the file.
                parent = os.path.dirname(self.path)
                if parent:
                    os.makedirs(parent, exist_ok=True)
                guard = take(blocking=blocking, timeout=None if not blocking else timeout)
        except (interlock.WouldBlock, interlock.Timeout):
            return None
        with self.mu:
            self.holds[me] = [exclusive, 1, guard]
        return me

    def release(self, owner):
        """Gives back one count of ``owner``'s hold. Returns False if that
        thread holds nothing here (e.g. in a forked child)."""
        with self.mu:
            h = self.holds.get(owner)
            if h is None:
                return False
            h[1] -= 1
            if h[1]:
                return True
            del self.holds[owner]
        h[2].release()
        return True

    def held_by(self, owner):
        with self.mu:
            h = self.holds.get(owner)
            return None if h is None else h[0]


_files = weakref.WeakValueDictionary()
_files_mu = threading.Lock()


def file_for(path):
    """The shared state for the lock file at ``path`` (str or bytes)."""
    key = _key(path)
    f = _files.get(key)
    if f is not None:
        return f
    with _files_mu:
        f = _files.get(key)
        if f is None:
            f = _File(key)
            _files[key] = f
        return f


def _forget_after_fork():
    global _files_mu
    _files_mu = threading.Lock()
    for f in list(_files.values()):
        f.mu = threading.Lock()
        f.holds = {}
        f.lock = None
    _handles.clear()


# Holds taken through the low-level functions (``trylock``/``unlock`` of a
# lock object, ``process_mechanism``), keyed by the handle object's id:
# id -> (handle, _File, owner).
_handles = {}
_handles_mu = threading.Lock()


def path_of(handle):
    """The lock file a handle names: a path (str, bytes, os.PathLike), an
    open file object (its ``name``), or a file descriptor."""
    if isinstance(handle, (str, bytes, os.PathLike)):
        return os.fsdecode(handle)
    if isinstance(handle, int):
        return os.readlink(f"/proc/self/fd/{handle}")
    name = getattr(handle, "name", None)
    if isinstance(name, (str, bytes)):
        return os.fsdecode(name)
    if hasattr(handle, "fileno"):
        return os.readlink(f"/proc/self/fd/{handle.fileno()}")
    raise TypeError(
        f"cannot find the lock file of {handle!r}: give a path, a file object or a descriptor"
    )


def try_handle(key_obj, path, exclusive=True):
    """Takes a hold without waiting, remembered under ``key_obj`` until
    :func:`release_handle`. Returns whether it was taken."""
    with _handles_mu:
        if id(key_obj) in _handles:
            # Already held through this handle: the kernel lock the original
            # took here would simply be converted; keep the hold we have.
            return True
    f = file_for(path)
    owner = f.acquire(exclusive, blocking=False, timeout=None)
    if owner is None:
        return False
    with _handles_mu:
        _handles[id(key_obj)] = (key_obj, f, owner)
    return True


def release_handle(key_obj):
    """Releases the hold :func:`try_handle` took under ``key_obj``; returns
    whether there was one."""
    with _handles_mu:
        entry = _handles.pop(id(key_obj), None)
    if entry is None:
        return False
    entry[1].release(entry[2])
    return True


os.register_at_fork(after_in_child=_forget_after_fork)
