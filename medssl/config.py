"""Plain-data configs: nested dicts from YAML, merged onto defaults, with `section.key=value` overrides.

A key that the defaults do not have is an error that lists the valid keys, so a typo never silently
does nothing.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*(?:[eE][-+]?[0-9]+)|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*\.[0-9_]*|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def read_yaml(text: str):
    """Parse YAML safely, with scientific-notation floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _merge(base: dict[str, Any], update: Mapping[str, Any], where: str) -> None:
    for key, value in update.items():
        path = f"{where}.{key}" if where else key
        if key not in base:
            valid = ", ".join(f"{where}.{k}" if where else k for k in base)
            raise KeyError(f"unknown config key {path!r}; valid keys here: {valid}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise TypeError(f"config key {path!r} is a section; got {value!r}")
            _merge(base[key], value, path)
        else:
            base[key] = value


def parse_override(text: str) -> dict[str, Any]:
    """`train.lr=1e-4` -> {"train": {"lr": 1e-4}} (the value is read as YAML)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    value = read_yaml(raw) if raw.strip() else None
    out: dict[str, Any] = {}
    node = out
    parts = dotted.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(defaults: Mapping[str, Any], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Defaults, then the YAML file (its `_base_` file first, if it names one), then the overrides."""
    cfg = copy.deepcopy(dict(defaults))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = read_yaml(path.read_text()) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: a config must be a mapping, got {type(data).__name__}")
        base = data.pop("_base_", None)
        if base is not None:
            cfg = load_config(defaults, path.parent / base)
        try:
            _merge(cfg, data, "")
        except (KeyError, TypeError) as exc:
            raise type(exc)(f"{path}: {exc.args[0]}") from None
    for text in overrides:
        _merge(cfg, parse_override(text), "")
    return cfg


def dump_config(cfg: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (next to a run's outputs)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
