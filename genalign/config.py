"""Typed configs: dataclasses filled from YAML recipes and `key=value` overrides, saved with every run.

An unknown key is an error that names the key and the closest known ones; values are converted to the
field's type (bool, int, float, str, tuples/lists from comma-separated text, `[a, b]` or YAML lists).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _convert(value: Any, typ, key: str):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except (ConfigError, ValueError, TypeError):
                continue
        raise ConfigError(f"config key {key!r}: cannot read {value!r} as {typ}")
    if value is None and typ is not Any:  # YAML null for a key that needs a value (str(None) would be 'None')
        raise ConfigError(f"config key {key!r}: needs a value ({getattr(typ, '__name__', typ)}), got null")
    if origin in (list, tuple):
        if isinstance(value, str) and value.strip().startswith("["):  # YAML / JSON list syntax: [a, b] or ["a"]
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"config key {key!r}: cannot read {value!r} as a list") from e
            if not isinstance(value, list):
                raise ConfigError(f"config key {key!r}: cannot read {value!r} as a list")
        items = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
        inner = args[0] if args else str
        conv = [_convert(v, inner, key) for v in items]
        return tuple(conv) if origin is tuple else conv
    if origin is dict or typ is dict:
        if isinstance(value, dict):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config key {key!r}: expected a JSON object, got {value!r}") from e
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if typ in (int, float, str):
        try:
            return typ(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key {key!r}: expected {typ.__name__}, got {value!r}") from e
    return value


def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
        kwargs[key] = _convert(value, fields[key].type, key)
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of key: value")
        data.update(loaded)
    data.update(parse_overrides(overrides or []))
    return from_dict(cls, data, source=str(path) if path else "overrides")


def save_config(cfg, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg))), sort_keys=False))
    return path
