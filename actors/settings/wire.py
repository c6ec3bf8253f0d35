"""Settings on the bus: plain msgpack-able values out, the same typed objects back.

The decoder builds only the dataclasses the settings are declared as, field by
field from their type hints, and checks every value's type on the way: what
comes off the bus is data, never code to run (no pickle).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import itertools
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from meshsup.actors.settings.node import lean_network

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


def decode(hint: Any, data: Any, where: str = "settings", *, consume: bool = False) -> Any:
    """The value of type `hint` that `encode` made `data` from; WireError names where it does not fit.

    With `consume`, each list in `data` lets go of an item once it is decoded: a config of thousands
    of peers is then not held twice (as received and as decoded) while it is decoded, and what its
    received form freed is reused by the decoded objects (rather than left as holes in the heap of
    every actor). For data its caller has no further use for (a message just received)."""
    try:
        return _decoder(hint, consume)(data)
    except _Misfit as err:
        raise WireError(f"{where}{''.join(reversed(err.path))}: {err.problem}") from None


class _Misfit(Exception):
    """Where (innermost first, as the decoders unwind) and why a value does not fit: the path is
    put together only on this way out, never for the values that fit (thousands of peers)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        self.path: list[str] = []


Decoder = Callable[[Any], Any]


@functools.cache
def _decoder(hint: Any, consume: bool = False) -> Decoder:
    """The function that decodes values of `hint`, made once per type (and way: `consume`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _dataclass_decoder(hint, consume)
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        choices = frozenset(a for a in args if a is not type(None))
        if choices == _NETWORKS:
            inner = _text_decoder(_network)
        elif choices == _INTERFACES:
            inner = _text_decoder(ipaddress.ip_interface)
        elif len(choices) == 1:
            inner = _decoder(next(iter(choices)), consume)
        else:
            raise TypeError(f"no wire form for {hint}")
        return (lambda data: None if data is None else inner(data)) if optional else inner
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _items_decoder(_decoder(args[0], consume), consume)
        return _fixed_tuple_decoder(tuple(_decoder(a, consume) for a in args), consume)
    if origin is dict:
        return _dict_decoder(_decoder(args[0]), _decoder(args[1], consume))
    if hint is Path:
        return _text_decoder(Path)
    if hint is float:
        return _float
    if hint in _PLAIN:
        return _plain_decoder(hint)
    raise TypeError(f"no wire form for {hint}")


def _dataclass_decoder(cls: type, consume: bool) -> Decoder:
    hints = _hints(cls)
    fields = tuple((name, _decoder(hints[name], consume)) for name in _init_fields(cls))
    names = frozenset(name for name, _ in fields)

    def decode_dataclass(data: Any) -> Any:
        if not isinstance(data, dict):
            raise _Misfit("expected a table")
        if data.keys() != names:  # a field missing, or one this version does not know
            raise _Misfit(f"fields differ: {', '.join(sorted(map(str, set(data) ^ names)))}")
        values = {}
        for name, field_decoder in fields:
            try:
                values[name] = field_decoder(data[name])
            except _Misfit as err:
                err.path.append(f".{name}")
                raise
        return cls(**values)

    return decode_dataclass


def _items_decoder(item: Decoder, consume: bool) -> Decoder:
    def decode_items(data: Any) -> tuple[Any, ...]:
        if not isinstance(data, list):
            raise _Misfit("expected a list")
        return _decode_each(itertools.repeat(item), data, consume)

    return decode_items


def _fixed_tuple_decoder(items: tuple[Decoder, ...], consume: bool) -> Decoder:
    def decode_tuple(data: Any) -> tuple[Any, ...]:
        if not isinstance(data, list):
            raise _Misfit("expected a list")
        if len(data) != len(items):
            raise _Misfit(f"expected {len(items)} items")
        return _decode_each(items, data, consume)

    return decode_tuple


def _decode_each(decoders: Iterable[Decoder], data: list[Any], consume: bool) -> tuple[Any, ...]:
    """The items of list `data`, each by its decoder; with `consume`, each let go once decoded."""
    out = []
    for i, (item, v) in enumerate(zip(decoders, data)):
        try:
            out.append(item(v))
        except _Misfit as err:
            err.path.append(f"[{i}]")
            raise
        if consume:
            data[i] = None
    return tuple(out)


def _dict_decoder(key: Decoder, value: Decoder) -> Decoder:
    def decode_dict(data: Any) -> dict[Any, Any]:
        if not isinstance(data, dict):
            raise _Misfit("expected a table")
        out = {}
        for k, v in data.items():
            decoded = key(k)
            try:
                out[decoded] = value(v)
            except _Misfit as err:
                err.path.append(f".{k}")
                raise
        return out

    return decode_dict


def _network(text: str) -> Any:
    """A network as ipaddress parses it, kept lean (node.lean_network: thousands of peers' addresses)."""
    return lean_network(ipaddress.ip_network(text))


def _text_decoder(parse: Any) -> Decoder:
    def decode_text(data: Any) -> Any:
        if not isinstance(data, str):
            raise _Misfit("expected a string")
        try:
            return parse(data)
        except ValueError as err:
            raise _Misfit(str(err)) from None

    return decode_text


def _float(data: Any) -> float:
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    raise _Misfit(f"expected float, got {type(data).__name__}")


def _plain_decoder(hint: type) -> Decoder:
    def decode_plain(data: Any) -> Any:
        if isinstance(data, hint) and (hint is bool or not isinstance(data, bool)):
            return data
        raise _Misfit(f"expected {hint.__name__}, got {type(data).__name__}")

    return decode_plain


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _init_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)
