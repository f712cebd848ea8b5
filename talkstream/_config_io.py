"""Config dataclasses to and from plain data: the one loader every config section uses.

The bottom layer: it imports nothing from talkstream, so the engine's network configs, a
checkpoint's config, the training config and the root :class:`talkstream.config.Config` all
load through the same code:

* :func:`from_dict`: a (frozen) dataclass from nested dicts as JSON or TOML gives them. A key
  that is left out keeps its default; an unknown key is an error that names it and lists the
  expected ones (a typo must not silently run with the default); a value of the wrong type is
  an error naming its dotted key (``serve.stream.jitter_budget_ms: expected a number, got
  'x'``). Lists become tuples, strings become ``Path`` where the field is one.
* :func:`to_dict`: the inverse, JSON-ready (tuples become lists, paths strings).
* :func:`apply_overrides`: ``section.key=value`` strings (``--set``), the value parsed as JSON,
  else taken as a plain string.
* :func:`read_config_file`: a ``.json`` or ``.toml`` file as a dict.

Errors are ``ValueError`` with one line; callers add the file's name.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["apply_overrides", "from_dict", "read_config_file", "to_dict"]


def _hints(cls: type) -> dict[str, Any]:
    """The field types of ``cls``. A class whose annotations name types it imports lazily (the
    root config names sections of higher layers) gives them by a ``_config_types()`` classmethod.
    """
    types_of = getattr(cls, "_config_types", None)
    return typing.get_type_hints(cls, localns=types_of() if types_of is not None else None)


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON/TOML) as type ``tp``; raises ValueError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{where}: null is not allowed")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"{where}: expected one of {list(allowed)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [args[0]] * len(value)
        else:
            if len(args) != len(value):
                raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = list(args)
        pairs = enumerate(zip(items, value, strict=True))
        return tuple(_convert(t, v, f"{where}[{i}]") for i, (t, v) in pairs)
    if origin is list or tp is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ValueError(f"{where}: expected a path (a string), got {value!r}")
        return Path(value)
    raise TypeError(f"{where}: unsupported config type {tp!r}")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """An instance of the dataclass ``cls`` from nested dicts; missing keys keep defaults.

    ``where`` is the dotted name of this section in messages (the class name when empty).

    Raises:
        ValueError: not an object, unknown keys (named, with the expected ones), values of
            the wrong type (their dotted key named), or what the class' own checks refuse.
    """
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{label}: expected an object, got {type(data).__name__} {data!r}")
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {label} keys {unknown}; expected some of {sorted(known)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready nested dict of a config dataclass (tuples become lists, paths strings);
    ``from_dict(type(cfg), to_dict(cfg)) == cfg``."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(cfg).__name__}")
    out: dict[str, Any] = _plain(cfg)
    return out


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = {}
            cur[k] = nxt
        if not isinstance(nxt, dict):
            raise ValueError(f"--set {dotted}: {k!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def apply_overrides(cfg: T, overrides: Iterable[str], where: str = "") -> T:
    """``cfg`` with ``section.key=value`` strings applied (``--set``); the value is parsed as
    JSON, else taken as a plain string (a path). The result is checked as a whole, like a file.

    Raises:
        ValueError: a malformed item, an unknown key or a bad value.
    """
    data = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string such as a path
        _set_path(data, key, value)
    return from_dict(type(cfg), data, where)


def read_config_file(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The top-level object of a ``.toml`` (by suffix) or JSON file; a ``"_comment"`` key is
    dropped (JSON has no comments).

    Raises:
        ValueError: unreadable file, bad syntax, or not an object; names ``what`` and the file.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {what} {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {p} is not a UTF-8 text file") from None
    try:
        data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{what} {p} is not valid {p.suffix[1:] or 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {p}: the top level must be an object")
    data.pop("_comment", None)
    return data
