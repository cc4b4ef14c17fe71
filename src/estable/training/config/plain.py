"""The plumbing of the training configs: dict ⇄ dataclass conversion (nested, with tuples, with clear errors), the
``_Plain`` mixin every config section inherits, and the number checks their validation uses."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _dataclass_type(hint: Any) -> type | None:
    """The dataclass type of a field hint (``X`` or ``X | None``), or None."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hint))


def build_dataclass(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Instantiate ``cls`` from a (possibly partial) plain dict; nested dataclasses are built recursively."""
    if not isinstance(data, dict):
        raise ValueError(f"config {where or cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(repr(_join(where, k)) for k in unknown)}; "
            f"valid keys{' under ' + repr(where) if where else ''}: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        sub = _dataclass_type(hint)
        if sub is not None and isinstance(value, dict):
            value = build_dataclass(sub, value, _join(where, name))
        elif sub is not None and value is not None and not isinstance(value, sub):
            raise ValueError(f"config {_join(where, name)}: expected an object, got {type(value).__name__}")
        elif isinstance(value, list) and _is_tuple(hint):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a wrong type deep inside a nested config
        raise ValueError(f"config {where or cls.__name__}: {exc}") from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


class _Plain:
    """to_dict / from_dict / to_json / replace for the training dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return build_dataclass(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= 0 if allow_zero else value > 0))  # JSON's Infinity (or 1e999) is no learning rate
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} finite number, got "
                         f"{value!r}")


def _positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")

