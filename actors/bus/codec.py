"""Typed bus messages: one class per event or command, msgpack on the wire.

A frame is ``[tag, version, [field, ...]]``. Decoding checks the tag is
known, the version matches and every field has its declared type, so a
handler never sees a message it did not ask for.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, TypeVar

import msgpack

# Control messages are small; data batches are bounded by the batch size.
# Anything larger is counted as oversized and dropped unread.
MAX_FRAME = 4 * 1024 * 1024


class DecodeError(ValueError):
    """A frame that is not a valid message; `reason` names the drop counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass
class Message:
    TAG: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    _checks: ClassVar[tuple[tuple[str, Any], ...]] = ()


_REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound=type[Message])


def message(tag: str, version: int = 1):
    """Register a dataclass as a bus message with a stable tag."""

    def wrap(cls: M) -> M:
        if tag in _REGISTRY:
            raise RuntimeError(f"duplicate bus tag {tag!r}")
        cls = dataclasses.dataclass(cls)
        cls.TAG = tag
        cls.VERSION = version
        hints = typing.get_type_hints(cls)
        cls._checks = tuple((f.name, _checker(hints[f.name])) for f in dataclasses.fields(cls))
        _REGISTRY[tag] = cls
        return cls

    return wrap


def _checker(hint: Any) -> Any:
    """Turn a type hint into the isinstance() argument used when decoding."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(_flatten(_checker(a)) for a in typing.get_args(hint))
    if origin is not None:
        hint = origin
    if hint is type(None):
        return type(None)
    if hint is float:
        return (float, int)
    if hint is int:
        return int
    if hint is Any:
        return object
    return hint


def _flatten(c: Any) -> Any:
    return c[0] if isinstance(c, tuple) and len(c) == 1 else c


def encode(msg: Message) -> bytes:
    values = [getattr(msg, name) for name, _ in msg._checks]
    return msgpack.packb([msg.TAG, msg.VERSION, values], use_bin_type=True)


def decode(frame: bytes, max_size: int = MAX_FRAME) -> Message:
    if len(frame) > max_size:
        raise DecodeError("oversized", f"{len(frame)} bytes")
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError("malformed", type(exc).__name__) from None
    if not (isinstance(obj, list) and len(obj) == 3 and isinstance(obj[0], str)):
        raise DecodeError("malformed", "not [tag, version, fields]")
    tag, version, values = obj
    cls = _REGISTRY.get(tag)
    if cls is None:
        raise DecodeError("unknown_type", tag[:64])
    if version != cls.VERSION:
        raise DecodeError("bad_version", f"{tag} v{version}")
    if not isinstance(values, list) or len(values) != len(cls._checks):
        raise DecodeError("bad_field", f"{tag}: field count")
    for (name, check), value in zip(cls._checks, values):
        if isinstance(value, bool) and check in (int, (float, int)):
            raise DecodeError("bad_field", f"{tag}.{name}")
        if not isinstance(value, check):
            raise DecodeError("bad_field", f"{tag}.{name}")
    return cls(*values)
