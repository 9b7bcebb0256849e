"""Loading and saving configs: YAML with ``include:``, dotted overrides, typed coercion, hashing.

YAML files may pull in other files with a top-level ``include:`` list (paths relative to the
including file, merged in order, the including file winning), which is how phase files reuse a
base config and model presets. An include that is not beside the including file names a shipped
preset (``model/small.yaml``: the repository's ``configs/`` folder, see ``preset_dirs``), so a
config in any folder can use them. An unknown key is an error that suggests the nearest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cprec.atomic import write_text
from cprec.config.sections import Config


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML value into the annotated type, or raise naming the field."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config field '{name}': expected a mapping, got {value!r}")
        return _build(tp, value, name)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], name)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field '{name}': expected a list, got {value!r}")
        return [_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"config field '{name}': expected a mapping, got {value!r}")
        return {str(k): _coerce(v, vt, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"config field '{name}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"config field '{name}': expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ValueError(f"config field '{name}': expected an integer, got {value!r}") from None
        if f != int(f):
            raise ValueError(f"config field '{name}': expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config field '{name}': expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"config field '{name}': expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _unknown(cls: type, key: str, prefix: str) -> ValueError:
    names = [f.name for f in dataclasses.fields(cls)]
    near = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
    return ValueError(f"unknown config key '{prefix}{key}'{hint}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    pre = f"{prefix}." if prefix else ""
    for key, value in values.items():
        if key not in names:
            raise _unknown(cls, key, pre)
        kwargs[key] = _coerce(value, _field_type(cls, key), f"{pre}{key}")
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _REPLACE_KEYS:
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# Mapping-valued fields that a later file replaces whole rather than merging key by key, so an
# anneal file can state its own data mixture without inheriting the stable run's weights.
_REPLACE_KEYS = {"mixing"}


def preset_dirs() -> list[Path]:
    """Folders holding the shipped presets, in the order they are searched.

    ``cprec/presets`` is where a built wheel has them (setup.py packages the repository's
    ``configs/`` there); ``configs/`` beside the ``cprec`` package is the source checkout or an
    editable install (``pip install -e .``), which read the repository's folder itself.
    """
    package = Path(__file__).resolve().parents[1]
    return [d for d in (package / "presets", package.parent / "configs") if d.is_dir()]


def _resolve_include(path: Path, inc: str) -> Path:
    """``inc`` beside the including file ``path``, else a shipped preset of that name."""
    beside = path.parent / inc
    if beside.is_file() or Path(inc).is_absolute():
        return beside
    for folder in preset_dirs():
        if (folder / inc).is_file():
            return folder / inc
    raise FileNotFoundError(
        f"{path}: include {inc!r} not found: neither {beside} nor a shipped preset "
        f"(searched {', '.join(str(d) for d in preset_dirs()) or 'no preset folder found'})"
    )


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML config, resolving ``include:`` (beside the file, else a shipped preset; merged in
    order)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"{path}: include cycle through {[str(p) for p in _seen]}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    includes = raw.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, read_yaml(_resolve_include(path, str(inc)), _seen + (path,)))
    return _deep_merge(merged, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ValueError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    values = json.loads(json.dumps(values))  # deep copy of plain data
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or defaults when None) and apply dotted ``key=value`` overrides."""
    values = read_yaml(path) if path else {}
    values = apply_overrides(values, overrides or [])
    return _build(Config, values)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict, cls: type = Config) -> Any:
    return _build(cls, values)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the effective config as YAML next to an output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config (or a section of it)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, docstring, default) for every field, read from the class source."""
    docs = _field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = _field_type(cls, f.name)
        if dataclasses.is_dataclass(tp):
            out.extend(describe_fields(tp, name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((name, docs.get(f.name, ""), default))
    return out


def _field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls).lstrip())
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = node.value.value.strip()
    return docs
