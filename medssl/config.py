"""Plain-data configs: nested dicts from YAML, merged onto defaults, with `section.key=value` overrides.

A key that the defaults do not have is an error that lists the valid keys, so a typo never silently
does nothing. A key of an older name (:data:`RENAMED_KEYS`) is read as its new name with a DeprecationWarning
and a log line, so that older YAML files and run folders still load.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RENAMED_KEYS", "dump_config", "load_config", "parse_override", "read_config", "read_yaml",
           "renamed_key"]

log = logging.getLogger("medssl")
_LOGGED: set[str] = set()

# One name per concept, the name MAE / timm users know (MAE's main_pretrain.py: --accum_iter, --clip_grad via
# timm's train.py; timm and Lightning: precision). Old name -> (new name, old value -> new value).
RENAMED_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "grad_accum": ("accum_iter", lambda v: v),  # detection train section, TrainConfig
    "clip_max_norm": ("clip_grad", lambda v: v),  # detection train section (DETR's name)
    "grad_clip": ("clip_grad", lambda v: v),  # heads.FitConfig
    "bf16": ("precision", lambda v: "bf16" if v else "fp32"),  # heads.FitConfig (a bool)
}


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


def renamed_key(key: str, value: Any, where: str = "", source: str = "") -> tuple[str, Any]:
    """(new name, value in the new form) of the old config key `key` (see :data:`RENAMED_KEYS`), with a
    DeprecationWarning and a log line naming where the key was read (`where`: its section, `source`: a file)."""
    new, convert = RENAMED_KEYS[key]
    out = convert(value)
    at = f"{where}.{key}" if where else key
    msg = (f"config key {at!r}{f' in {source}' if source else ''} is deprecated: read as {new!r}={out!r}; "
           f"please write {new!r}")
    warnings.warn(msg, DeprecationWarning, stacklevel=3)
    if msg not in _LOGGED:  # one log line per old key and place, however often it is read
        _LOGGED.add(msg)
        log.warning(msg)
    return new, out


def _merge(base: dict[str, Any], update: Mapping[str, Any], where: str, source: str = "") -> None:
    for key, value in update.items():
        if key not in base and key in RENAMED_KEYS and RENAMED_KEYS[key][0] in base:
            if RENAMED_KEYS[key][0] in update:
                raise KeyError(f"config sets both {key!r} and its new name {RENAMED_KEYS[key][0]!r} in "
                               f"{where or 'the top level'}: keep {RENAMED_KEYS[key][0]!r}")
            key, value = renamed_key(key, value, where, source)
        path = f"{where}.{key}" if where else key
        if key not in base:
            valid = ", ".join(f"{where}.{k}" if where else k for k in base)
            raise KeyError(f"unknown config key {path!r}; valid keys here: {valid}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise TypeError(f"config key {path!r} is a section; got {value!r}")
            _merge(base[key], value, path, source)
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


def _read_file(path: Path) -> tuple[dict[str, Any], Path | None]:
    """A YAML config file's mapping (without `_base_`) and the `_base_` file it names (relative to it), if any."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = read_yaml(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    data = dict(data)
    base = data.pop("_base_", None)
    return data, (path.parent / base if base is not None else None)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A config without defaults (e.g. a benchmark's): its `_base_` file first, if it names one, then its own
    top-level entries, each replacing the base's whole (a section too); no key is checked."""
    data, base = _read_file(Path(path))
    return {**(read_config(base) if base is not None else {}), **data}


def load_config(defaults: Mapping[str, Any], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Defaults, then the YAML file (its `_base_` file first, if it names one), then the overrides."""
    cfg = copy.deepcopy(dict(defaults))
    if path is not None:
        path = Path(path)
        data, base = _read_file(path)
        if base is not None:
            cfg = load_config(defaults, base)
        try:
            _merge(cfg, data, "", str(path))
        except (KeyError, TypeError) as exc:
            raise type(exc)(f"{path}: {exc.args[0]}") from None
    for text in overrides:
        _merge(cfg, parse_override(text), "", "a command-line override")
    return cfg


def dump_config(cfg: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (next to a run's outputs)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
