"""An on-disk spool of records waiting for one collector.

One JSON file per record, named by a growing sequence number so the
directory listing is the delivery order. Appends are atomic (write a temp
file, fsync, rename, then fsync the directory once for a batch), so a crash
leaves either the whole record or nothing, and a restarted process finds
every record it had not yet delivered.

The spool is bounded by a record count and a byte total. When full, the
oldest records are dropped; the number dropped is stamped on the record
being appended as "dropped" (added to any count it already carries, and to
the counts of the dropped records themselves), so the collector sees how
many records it missed and where.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from meshsup.actors.kernel.files import GROUP_OTHER_WRITE, TMP_SUFFIX, UnsafePath, read_owned, write_atomic
from meshsup.actors.netlog.flows import Record, encode_record

_SUFFIX = ".json"


class Spool:
    def __init__(self, directory: Path, max_records: int = 10_000, max_bytes: int = 64 << 20) -> None:
        if max_records < 1 or max_bytes < 1:
            raise ValueError("spool bounds must be positive")
        self.directory = Path(directory)
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.dropped = 0  # records dropped since this process started
        self.corrupt = 0  # unreadable files found and removed
        self._pending_dropped = 0  # not yet carried by a record
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._index: OrderedDict[str, int] = OrderedDict()  # name -> size, oldest first
        for path in sorted(self.directory.iterdir()):
            if path.name.endswith(TMP_SUFFIX):
                path.unlink(missing_ok=True)  # a write that never completed
            elif path.name.endswith(_SUFFIX) and path.name[: -len(_SUFFIX)].isdigit():
                self._index[path.name] = path.stat().st_size
        last = next(reversed(self._index), None)
        self._next_seq = int(last[: -len(_SUFFIX)]) + 1 if last else 0
        self._bytes = sum(self._index.values())

    def __len__(self) -> int:
        return len(self._index)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def entries(self) -> list[str]:
        """Entry names, oldest first."""
        return list(self._index)

    def append(self, record: Record) -> str:
        """Store a record durably, dropping the oldest ones if the spool is full."""
        return self.extend([record])[0]

    def extend(self, records: list[Record]) -> list[str]:
        """Store records durably, in order, with one directory sync for them all."""
        names = []
        for record in records:
            while True:
                carried = self._pending_dropped + _dropped_count(record)
                data = encode_record(dict(record, dropped=carried) if carried else record)
                full = len(self._index) + 1 > self.max_records or self._bytes + len(data) > self.max_bytes
                if not full or not self._index:
                    break  # the newest record is always kept, even alone over the byte bound
                self._evict_oldest()
            name = f"{self._next_seq:020d}{_SUFFIX}"
            self._next_seq += 1
            self._write(name, data)
            self._index[name] = len(data)
            self._bytes += len(data)
            self._pending_dropped = 0
            names.append(name)
        if names:
            self._sync_directory()
        return names

    def read(self, name: str) -> Record | None:
        """The record, or None if it is gone or unreadable (then it is removed and counted)."""
        try:
            # Never through a symlink or from a file others could write: it would go to the collector.
            record = json.loads(read_owned(self.directory / name, "spooled record", GROUP_OTHER_WRITE, follow=False))
        except FileNotFoundError:
            self._forget(name)
            return None
        except (OSError, ValueError, UnsafePath):
            record = None
        if not isinstance(record, dict):
            self.corrupt += 1
            self.remove(name)
            return None
        return record

    def remove(self, name: str) -> None:
        """Forget a delivered record."""
        if self._forget(name):
            (self.directory / name).unlink(missing_ok=True)

    def discard(self, names: Iterable[str]) -> None:
        """Drop records that can never be delivered; the next append carries the count."""
        for name in names:
            if name in self._index:
                self._drop(name)

    def _evict_oldest(self) -> None:
        self._drop(next(iter(self._index)))

    def _drop(self, name: str) -> None:
        record = self.read(name)
        self.remove(name)
        self.dropped += 1
        # Losses the dropped record was reporting are carried forward, not lost with it.
        self._pending_dropped += 1 + (_dropped_count(record) if record else 0)

    def _forget(self, name: str) -> bool:
        size = self._index.pop(name, None)
        if size is None:
            return False
        self._bytes -= size
        return True

    def _write(self, name: str, data: bytes) -> None:
        write_atomic(self.directory / name, data, 0o600)

    def _sync_directory(self) -> None:
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _dropped_count(record: Record) -> int:
    count = record.get("dropped", 0)
    return count if type(count) is int and count > 0 else 0
