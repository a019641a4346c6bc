"""GPT-NeoX YAML files -> one `NeoXConfig`: read and merge them in order (a later file overrides an
earlier one, logged), `-`/`_` spellings, each key checked against its field, the whole-config
checks (config/rules.py), and the keys accepted with no effect here. As upstream, `key: null` for a key whose
upstream default is None means unset (the key's default here; a later file's null undoes an earlier value),
except for the sizes a model needs (config_upstream.REQUIRED), where it is one line."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from neox_fork.config import upstream as config_upstream
from neox_fork.config.rules import validate
from neox_fork.errors import UserError
from neox_fork.config.neox_config import NeoXConfig, _FIELDS

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` (no dot) as a float, as Python and JSON do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


_HINTS = typing.get_type_hints(NeoXConfig)
_DEFAULTS = NeoXConfig()


def normalize_key(key: str) -> str:
    return str(key).replace("-", "_")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """One YAML file as a dict with normalised keys; a missing file or a syntax error is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: YAML syntax error{where}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: YAML syntax error: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    return {normalize_key(k): v for k, v in data.items()}


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is list or origin is list:
        return isinstance(value, list)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


UNSET = object()  # _check_key's answer for `key: null` where upstream's default is None: the key is not given


def _check_key(key: str, value: Any, source: str) -> Any:
    if key in config_upstream.KEYS and key not in _FIELDS:
        return config_upstream.check_type(key, value, source)
    if key in config_upstream.REMOVED_MOE_KEYS:
        raise UserError(f"{source}: key '{key}' was removed upstream: {config_upstream.REMOVED_MOE_KEYS[key]}")
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, [*_FIELDS, *config_upstream.KEYS], n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "; see neox_fork/config/neox_config.py for the known keys"
        raise UserError(f"{source}: unknown key '{key}'{hint}")
    hint = _HINTS[key]
    if value is None and key in config_upstream.REQUIRED:
        raise UserError(f"{source}: key '{key}' is null, but a model needs it (upstream requires it too); give a "
                        f"number, or leave the key out for this project's default {getattr(_DEFAULTS, key)!r}")
    if value is None and key in config_upstream.NULL_DEFAULT_FIELDS and not _type_ok(None, hint):
        return UNSET  # as upstream, whose default is None: this key's default here
    if not _type_ok(value, hint):
        raise UserError(
            f"{source}: key '{key}' must be {_type_name(hint)}, got {value!r} ({type(value).__name__})"
        )
    if hint in (float, float | None) and value is not None:
        return float(value)
    return value


def merge_files(paths: list[str | os.PathLike]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge YAML files in order; returns (values, key -> file that set it). Overrides are logged."""
    if not paths:
        raise UserError("no config file given; pass one or more YAML files, e.g. configs/tiny.yml")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for path in paths:
        for key, value in read_yaml(path).items():
            value = _check_key(key, value, str(path))
            if value is UNSET:  # null: as if no file so far had given the key
                if key in values:
                    log.info("config: %s unsets %s (null; was %r from %s)", path, key, values.pop(key),
                             sources.pop(key))
                continue
            if key in values and values[key] != value:
                log.info("config: %s overrides %s = %r (was %r from %s)", path, key, value, values[key], sources[key])
            values[key] = value
            sources[key] = str(path)
    return values, sources


def _older_alias(key: str, value: Any, values: dict[str, Any], sources: dict[str, str], source: str) -> str | None:
    """The key an older upstream name (config_upstream.OLDER_ALIASES) sets; None for a null. Both names with
    different values is one line."""
    target, where = config_upstream.OLDER_ALIASES[key], sources.get(key, source)
    if value is None:
        return None
    other = next((v for k, v in values.items() if normalize_key(k) == target), None)
    if other is not None and other != value:
        raise UserError(f"{where}: {key} {value!r} and {target} {other!r} disagree; they are one setting ({key} is "
                        "older upstream's name), give one of them")
    sources.setdefault(target, where)
    return target


def from_dict(values: dict[str, Any], sources: dict[str, str] | None = None, source: str = "config") -> NeoXConfig:
    """Build and validate a config from already-merged values (e.g. the dict saved beside a checkpoint)."""
    sources = dict(sources or {})
    checked = {}
    for key, value in values.items():
        key = normalize_key(key)
        if key in config_upstream.OLDER_ALIASES:  # older upstream's name: the value goes to the key here
            key = _older_alias(key, value, values, sources, source)
            if key is None:
                continue
        checked[key] = _check_key(key, value, sources.get(key, source))
        if checked[key] is UNSET:  # null where upstream's default is None: not given
            del checked[key]
            sources.pop(key, None)
            continue
        sources.setdefault(key, source)
    if checked.get("gas") is not None:  # upstream's alias: one value, whichever name carried it
        steps = checked.setdefault("gradient_accumulation_steps", checked["gas"])
        if steps != checked["gas"]:
            raise UserError(f"{sources['gas']}: gas {checked['gas']} and gradient_accumulation_steps {steps} "
                            "disagree; they are one setting, give one of them")
    upstream = config_upstream.split(checked, sources)  # before **checked: it takes the table's keys out
    config = NeoXConfig(**checked, sources=sources, upstream_keys=upstream)
    validate(config)
    config_upstream.validate(config)
    return config


def no_effect_keys() -> list[str]:
    """Keys accepted so GPT-NeoX configs load, that nothing here reads."""
    return [f.name for f in dataclasses.fields(NeoXConfig) if f.metadata.get("no_effect")]


def ignored_settings(c: NeoXConfig) -> dict[str, Any]:
    """The no-effect keys this config sets to something other than their default (or an empty value)."""
    defaults = NeoXConfig()
    return {**{k: getattr(c, k) for k in no_effect_keys()
               if getattr(c, k) not in (getattr(defaults, k), None, "", False)}, **config_upstream.ignored(c)}


def log_ignored_settings(c: NeoXConfig) -> None:
    """One line at start naming the no-effect keys a config sets, so nobody believes they took effect."""
    ignored = ignored_settings(c)
    if ignored:
        log.warning("config: accepted for GPT-NeoX compatibility but no effect here (see docs/config.md): %s",
                    ", ".join(f"{k}={v!r}" for k, v in ignored.items()))


def load_config(*paths: str | os.PathLike, overrides: dict[str, Any] | None = None) -> NeoXConfig:
    """Load, merge and validate NeoX YAML files (later files win), then apply `overrides`."""
    values, sources = merge_files(list(paths))
    for key, value in (overrides or {}).items():
        values[normalize_key(key)] = value
        sources[normalize_key(key)] = "overrides"
    config = from_dict(values, sources)
    config.given_files = config_upstream.config_files(paths)
    return config
