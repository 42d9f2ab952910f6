"""The one configuration system: YAML files validated into dataclasses.

Every stage describes its options as a dataclass. :func:`load_config` reads a YAML file, applies
``key.sub=value`` overrides from the command line, and validates types and names recursively;
:func:`config_to_dict` turns it back into plain data to print at run start and to store in every
output (stores, checkpoints).
"""
from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from weathermodel.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Validate ``value`` against the type hint ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(error.problem)
        raise ConfigError(f"'{where}' = {value!r} matches none of: {'; '.join(errors)}",
                          "give a value of one of the allowed types")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{where}' = {value!r} is not one of {list(args)}",
                              f"use one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {value!r}", "write it as a YAML list")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}",
                              "write it as a YAML mapping")
        key_type, value_type = args if args else (Any, Any)
        return {_coerce(k, key_type, f"{where}.key"): _coerce(v, value_type, f"{where}.{k}")
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping for {_type_name(tp)}, got {value!r}",
                              "write it as a YAML mapping")
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{where}' must be a number, got {value!r}", "give a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{where}' must be an integer, got {value!r}", "give an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{where}' must be true or false, got {value!r}",
                              "write true or false")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, (datetime.date, datetime.datetime)):
            return value.isoformat()  # YAML reads unquoted 2013-01-01 as a date
        if not isinstance(value, str):
            raise ConfigError(f"'{where}' must be a string, got {value!r}", "give a string")
        return value
    raise ConfigError(f"'{where}' has an unsupported type {tp}", "report this as a bug")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build the dataclass ``cls`` from plain data, refusing unknown and missing keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown option(s) {[prefix + k for k in unknown]} for {cls.__name__}",
                          f"valid options are {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"required option '{path}' is missing", f"set '{path}'")
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()
    return instance


def config_to_dict(config: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config dataclass, suitable for YAML and JSON."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, dict):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    return config


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (``3``, ``true``, ``[1,2]``)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value",
                              "write overrides as dotted.key=value, e.g. data.batch_size=8")
        key, raw = override.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r} has a value that is not valid YAML: {error}",
                              "quote the value") from error
        node = data
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} has an empty part", "write dotted.key=value")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: '{part}' is not a section",
                                  "override a leaf option")
            node = child
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: list[str] | None = None) -> T:
    """Read a YAML file (optional), apply overrides, and validate into ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"cannot read config file: {error}", "check the path",
                              path=str(path)) from error
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"not valid YAML: {error}", "fix the YAML syntax",
                              path=str(path)) from error
        if not isinstance(data, dict):
            raise ConfigError("the top level must be a mapping", "write key: value pairs",
                              path=str(path))
    data = apply_overrides(data, list(overrides or []))
    try:
        return from_dict(cls, data)
    except ConfigError as error:
        if path is None or error.path:
            raise
        raise ConfigError(error.problem, error.fix, path=str(path)) from error


def dump_config(config: Any) -> str:
    """The full effective configuration as YAML text (printed at run start)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
