"""``fasteners.process_mechanism``: the low-level lock calls on a handle.

fasteners keeps its platform code here: ``_interprocess_mechanism``
(``trylock(handle)`` raising ``OSError`` with ``EAGAIN`` when the file is
locked elsewhere, ``unlock(handle)``) and
``_interprocess_reader_writer_mechanism`` (``trylock(handle, exclusive)``
returning a bool, ``unlock``, ``get_handle(path)``, ``close_handle``).
Tests and some programs call them directly, so they are kept, with the
same signatures. Here they take interlock locks on the handle's file
instead of ``fcntl.lockf``: the threads of one process exclude each other,
closing another handle of the same file releases nothing, and a handle may
be an open file object, a path or a descriptor.
"""

from abc import ABC, abstractmethod

from interlock.compat.fasteners import _shared


class _InterProcessMechanism(ABC):
    @staticmethod
    @abstractmethod
    def trylock(lockfile): ...

    @staticmethod
    @abstractmethod
    def unlock(lockfile): ...


class _InterProcessReaderWriterLockMechanism(ABC):
    @staticmethod
    @abstractmethod
    def trylock(lockfile, exclusive): ...

    @staticmethod
    @abstractmethod
    def unlock(lockfile): ...

    @staticmethod
    @abstractmethod
    def get_handle(path): ...

    @staticmethod
    @abstractmethod
    def close_handle(lockfile): ...


class _InterlockInterProcessMechanism(_InterProcessMechanism):
    """Exclusive try-lock on a handle's file, through interlock."""

    @staticmethod
    def trylock(lockfile):
        path = _shared.path_of(lockfile)
        if not _shared.try_handle(lockfile, path, True):
            raise _shared.would_block(path)

    @staticmethod
    def unlock(lockfile):
        _shared.release_handle(lockfile)


class _InterlockInterProcessReaderWriterLockMechanism(_InterProcessReaderWriterLockMechanism):
    """Shared or exclusive try-lock on a handle's file, through interlock."""

    @staticmethod
    def trylock(lockfile, exclusive):
        return _shared.try_handle(lockfile, _shared.path_of(lockfile), bool(exclusive))

    @staticmethod
    def unlock(lockfile):
        _shared.release_handle(lockfile)

    @staticmethod
    def get_handle(path):
        return open(path, "a+")

    @staticmethod
    def close_handle(lockfile):
        _shared.release_handle(lockfile)
        lockfile.close()


_interprocess_mechanism = _InterlockInterProcessMechanism()
_interprocess_reader_writer_mechanism = _InterlockInterProcessReaderWriterLockMechanism()

# The names of fasteners' POSIX classes, for code that refers to them (on
# Linux fasteners' mechanisms are instances of these).
_FcntlInterProcessMechanism = _InterlockInterProcessMechanism
_FcntlInterProcessReaderWriterLockMechanism = _InterlockInterProcessReaderWriterLockMechanism
