"""Reading one table of a config file: every problem is a ConfigError naming the file, the key and
what is wrong, in one line."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshsup.actors.settings import keys


class ConfigError(Exception):
    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}")
        self.file, self.key, self.problem = file, key, problem


class Table:
    """One table of a config file, remembering where errors point."""

    def __init__(self, file: str, table: Any, prefix: str, allowed: set[str]) -> None:
        self.file, self.table, self.prefix = file, table, prefix
        if not isinstance(table, dict):
            raise ConfigError(file, prefix or "(top level)", "must be a table")
        for k in table:
            if k not in allowed:
                raise ConfigError(file, self.key(k), "unknown key")

    def key(self, k: str) -> str:
        return f"{self.prefix}.{k}" if self.prefix else k

    def fail(self, k: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(k), problem)

    def get(self, k: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if k not in self.table:
            if required:
                raise self.fail(k, "is required")
            return default
        v = self.table[k]
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(t.__name__ for t in kind)
            raise self.fail(k, f"must be {names}, not {type(v).__name__}")
        return v

    def strings(self, k: str, check: Callable[[str], Any] | None = None) -> list[str]:
        v = self.get(k, list, [])
        for item in v:
            if not isinstance(item, str):
                raise self.fail(k, "must be a list of strings")
            if check:
                try:
                    check(item)
                except ValueError as err:
                    raise self.fail(k, f"{item!r}: {err}") from None
        return list(v)

    def port(self, k: str, default: int) -> int:
        v = self.get(k, int, default)
        if not 0 <= v <= 65535:
            raise self.fail(k, f"{v} is not a port number")
        return v

    def key_material(self, k: str, file_k: str, base: Path, required: bool) -> bytes | None:
        """A key given inline or in a file that only its owner can read."""
        if k in self.table and file_k in self.table:
            raise self.fail(k, f"give either {k} or {file_k}, not both")
        if k in self.table:
            try:
                return keys.parse_key(self.get(k, str))
            except ValueError as err:
                raise self.fail(k, str(err)) from None
        if file_k in self.table:
            path = base / self.get(file_k, str)
            try:
                st = path.stat()
                text = path.read_text()
            except OSError as err:
                raise self.fail(file_k, f"cannot read {path}: {err.strerror}") from None
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                mode = stat.S_IMODE(st.st_mode)
                raise self.fail(file_k, f"{path} is readable by others (mode {mode:04o}); chmod 600 it")
            try:
                return keys.parse_key(text)
            except ValueError as err:
                raise self.fail(file_k, f"{path}: {err}") from None
        if required:
            raise self.fail(k, f"is required (or {file_k})")
        return None
