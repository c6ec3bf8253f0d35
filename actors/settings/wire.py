"""Settings on the bus: plain msgpack-able values out, the same typed objects back.

The decoder builds only the dataclasses the settings are declared as, field by
field from their type hints, and checks every value's type on the way: what
comes off the bus is data, never code to run (no pickle).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import types
import typing
from pathlib import Path
from typing import Any

_NETWORKS = frozenset({ipaddress.IPv4Network, ipaddress.IPv6Network})
_INTERFACES = frozenset({ipaddress.IPv4Interface, ipaddress.IPv6Interface})
_TEXT = (ipaddress.IPv4Network, ipaddress.IPv6Network, ipaddress.IPv4Interface, ipaddress.IPv6Interface, Path)
_PLAIN = (str, int, float, bool, bytes, type(None))


class WireError(ValueError):
    """The wire form does not fit the declared settings."""


def encode(value: Any) -> Any:
    """A settings object as dicts, lists, strings, numbers and bytes."""
    if dataclasses.is_dataclass(value):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (tuple, list)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, _TEXT):
        return str(value)
    if isinstance(value, _PLAIN):
        return value
    raise TypeError(f"{type(value).__name__} has no wire form")


def decode(hint: Any, data: Any, where: str = "settings") -> Any:
    """The value of type `hint` that `encode` made `data` from; WireError names where it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        names, hints = _init_fields(hint), _hints(hint)
        if not isinstance(data, dict):
            raise WireError(f"{where}: expected a table")
        if set(data) != set(names):  # a field missing, or one this version does not know
            raise WireError(f"{where}: fields differ: {', '.join(sorted(map(str, set(data) ^ set(names))))}")
        return hint(**{name: decode(hints[name], data[name], f"{where}.{name}") for name in names})
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        choices = frozenset(a for a in args if a is not type(None))
        if choices == _NETWORKS:
            return _text(ipaddress.ip_network, data, where)
        if choices == _INTERFACES:
            return _text(ipaddress.ip_interface, data, where)
        if len(choices) == 1:
            return decode(next(iter(choices)), data, where)
        raise TypeError(f"{where}: no wire form for {hint}")
    if origin is tuple:
        if not isinstance(data, list):
            raise WireError(f"{where}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        if len(data) != len(args):
            raise WireError(f"{where}: expected {len(args)} items")
        return tuple(decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data)))
    if origin is dict:
        if not isinstance(data, dict):
            raise WireError(f"{where}: expected a table")
        return {decode(args[0], k, where): decode(args[1], v, f"{where}.{k}") for k, v in data.items()}
    if hint is Path:
        return _text(Path, data, where)
    if hint is float and isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    if hint in _PLAIN and isinstance(data, hint) and (hint is bool or not isinstance(data, bool)):
        return data
    raise WireError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(data).__name__}")


def _text(parse: Any, data: Any, where: str) -> Any:
    if not isinstance(data, str):
        raise WireError(f"{where}: expected a string")
    try:
        return parse(data)
    except ValueError as err:
        raise WireError(f"{where}: {err}") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _init_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)
