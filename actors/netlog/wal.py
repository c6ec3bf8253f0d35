"""The open window on disk: its start and every delta counted in it so far.

A netlog killed mid-window (kill -9, a crash) finds the window again when it
restarts, replays the deltas and closes it on time: no record is lost, and
the window boundaries stay contiguous. Frames are length-prefixed; the
first holds the window's start, each next one a bus frame as it arrived.
Appends are plain writes: the page cache outlives the process (the spool
fsyncs closed records, which is what must survive the machine). A torn
last frame, as a kill during a write leaves, is ignored.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from meshsup.actors.kernel.files import GROUP_OTHER_WRITE, read_owned

_LENGTH = struct.Struct("!I")
_START = struct.Struct("!d")


class WindowLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.torn = 0  # unreadable tails found at recovery
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = -1

    def recover(self, now: float) -> tuple[float, list[bytes]]:
        """The logged window's start and frames; a new window at `now` if there is none.
        UnsafePath if the log is a symlink or could be another user's: replaying or
        truncating it would act on a file someone else chose."""
        try:
            data = read_owned(self.path, "netlog window log", GROUP_OTHER_WRITE, follow=False)
        except FileNotFoundError:
            data = b""
        frames, complete = _frames(data)
        if frames and len(frames[0]) == _START.size:
            self._open(os.O_WRONLY | os.O_APPEND)
            if complete < len(data):
                self.torn += 1
                os.ftruncate(self._fd, complete)
            return _START.unpack(frames[0])[0], frames[1:]
        self.reset(now)
        return now, []

    def append(self, frame: bytes) -> None:
        os.write(self._fd, _LENGTH.pack(len(frame)) + frame)

    def reset(self, start: float) -> None:
        """Begin a new window: its records have been spooled."""
        self._open(os.O_WRONLY | os.O_TRUNC | os.O_CREAT)
        self.append(_START.pack(start))

    def remove(self) -> None:
        """No window is open (a clean stop): the next start begins afresh."""
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def _open(self, flags: int) -> None:
        self.close()
        self._fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _frames(data: bytes) -> tuple[list[bytes], int]:
    """The complete frames at the start of `data`, and how many bytes they take."""
    frames, i = [], 0
    while i + _LENGTH.size <= len(data):
        (n,) = _LENGTH.unpack_from(data, i)
        if i + _LENGTH.size + n > len(data):
            break
        frames.append(data[i + _LENGTH.size : i + _LENGTH.size + n])
        i += _LENGTH.size + n
    return frames, i
