"""Files and directories no other local user can plant or change.

The node runs as root and keeps its key, sockets, spooled records and a
resolv.conf backup on disk. A directory or file it trusts must be owned by
the user running it and writable by no one else (a secret: readable by no
one else either), checked on the open descriptor so the path cannot be
swapped between check and use. Files are written to a fresh temp file beside
the target (mkstemp opens with O_EXCL, so never a planted file or symlink),
given their mode through the descriptor, and renamed over the target.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Final

GROUP_OTHER_WRITE: Final = stat.S_IWGRP | stat.S_IWOTH
GROUP_OTHER_ANY: Final = stat.S_IRWXG | stat.S_IRWXO
TMP_SUFFIX: Final = ".tmp"  # write_atomic's temp files: what a crash mid-write leaves behind


class UnsafePath(Exception):
    """A refused path, in one line: what it is, its owner and mode, what is wrong, what to do."""

    def __init__(self, what: str, path: Path, st: os.stat_result, problem: str, fix: str) -> None:
        super().__init__(f"{what} {path} (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}) {problem}: {fix}")


def _check_owner(what: str, path: Path, st: os.stat_result, forbidden: int) -> None:
    me = os.geteuid()
    if st.st_uid != me:
        raise UnsafePath(
            what,
            path,
            st,
            f"is not owned by uid {me}, who runs meshsup",
            f"chown {me} it or run meshsup as uid {st.st_uid}",
        )
    if st.st_mode & forbidden:
        who = "writable" if st.st_mode & forbidden & GROUP_OTHER_WRITE else "readable"
        raise UnsafePath(
            what, path, st, f"is {who} by group or others", f"chmod {stat.S_IMODE(st.st_mode) & ~forbidden:04o} it"
        )


def _open_checked(path: Path, what: str, flags: int, follow: bool) -> int:
    """An fd on `path`; a symlink (unless `follow`) or a wrong file type is UnsafePath."""
    try:
        return os.open(path, flags | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = os.lstat(path)
        found = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafePath(what, path, st, f"is {found}", "remove it") from None


def private_dir(path: Path, what: str, *, create: bool = False, follow: bool = True) -> None:
    """Refuse (UnsafePath) a directory this user does not own or others can write:
    whoever can write it can plant the files and sockets meshsup trusts there.
    A missing one is made 0700 if `create` (its parents as `mkdir -p` makes
    them), else left missing. Unless `follow`, a symlink is refused."""
    made = False
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            made = True
        except FileExistsError:
            pass
    try:
        fd = _open_checked(path, what, os.O_RDONLY | os.O_DIRECTORY, follow)
    except FileNotFoundError:
        if create:
            raise
        return
    try:
        if made:
            os.fchmod(fd, 0o700)  # mkdir's mode is masked by the umask
        _check_owner(what, path, os.fstat(fd), GROUP_OTHER_WRITE)
    finally:
        os.close(fd)


def read_owned(path: Path, what: str, forbidden: int, *, follow: bool = True) -> bytes:
    """The content of a regular file this user owns whose mode has none of the
    `forbidden` bits, else UnsafePath; unless `follow`, a symlink is refused.
    FileNotFoundError if there is none."""
    # O_NONBLOCK: a planted FIFO must not hang the open; it is then refused as not a regular file.
    fd = _open_checked(path, what, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY, follow)
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(what, path, st, "is not a regular file", "remove it")
        _check_owner(what, path, st, forbidden)
        return f.read()


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` by a file of `data` with `mode`: written to a fresh temp
    file beside it, fsynced, then renamed over it, so a reader (or a crash)
    finds the old file or the new one whole, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.meshsup-", suffix=TMP_SUFFIX)
    try:
        with open(fd, "wb") as f:
            os.fchmod(fd, mode)
            f.write(data)
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
