"""Lines from a child process's pipe, each wait bounded.

``select()`` on a pipe reports only the bytes still in the pipe. A buffered
``readline()`` may read two lines at once, return the first and keep the
second in its buffer, where the next ``select()`` cannot see it: the test
then waits for a line it already has. So the lines are read here with
``os.read`` into a buffer of our own, and a wait happens only while that
buffer holds no whole line."""

from __future__ import annotations

import os
import select
import time
import weakref
from typing import IO, Optional

# Lines read ahead, per stream object (not per descriptor number, which a
# later pipe may reuse).
_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def read_line(stream: IO, timeout: float) -> Optional[str]:
    """The stream's next line with its newline (``""`` at end of file, the
    rest without a newline if the writer ended mid-line), or ``None`` if no
    whole line arrived within ``timeout`` seconds. Read every line of one
    stream through this function: the lines it read ahead are kept with the
    stream, not in the stream's own buffer."""
    fd = stream.fileno()
    buf = _BUFFERS.setdefault(stream, bytearray())
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            rest = bytes(buf)
            buf.clear()
            return rest.decode()
        buf += chunk
    end = buf.index(b"\n") + 1
    line = bytes(buf[:end])
    del buf[:end]
    return line.decode()
