"""Typed, validated YAML experiment configs with ``a.b.c=value`` command-line overrides.

Rules, and why:

* **A config reads top to bottom.** There is no ``_base_`` / ``include`` inheritance: in
  mmsegmentation a config is a chain of ``_base_`` files merged with special keys
  (``_delete_=True``), so the value of a key is only known after running the merge. Here the
  one YAML file plus the command-line overrides *are* the config, and
  :func:`save_resolved_config` stores the resolved result with every run.
* **``extra="forbid"``:** a misspelt key (``lrr: 0.1``) is an error naming the key and the
  valid ones, never a silently ignored line that leaves the default in force.
* **Strict types:** a string is not a number, a float is not an int (``1.5``, and ``2.0``
  too), ``0``/``1``/``"yes"`` are not booleans, a list is not a scalar. The one coercion is
  int -> float (``lr: 1`` means 1.0). PyYAML (YAML 1.1) reads ``1e-3`` as a *string*: write
  ``1.0e-3`` (the error message says so). Fields whose type YAML cannot spell (``Path``,
  ``tuple``, enums) need ``Field(strict=False)``.
* **Overrides** ``a.b.c=value`` apply in order after the file; the value is parsed with
  ``yaml.safe_load`` (``0.01`` float, ``s3://b/p`` string, ``[1,2]`` list, ``null`` None). The
  key must exist in the schema, not necessarily in the file. A section may be replaced whole
  (``shards={url: x}``).
* **Errors:** one :class:`ConfigError`, one line per problem: source file (``<overrides>``,
  ``<defaults>``, ``<dict>``), dotted key, what was given, what was expected, and the override
  responsible, if any.
* **Secrets:** :func:`save_resolved_config` writes every non-null value whose key ends with
  ``secret``, ``password``, ``token``, ``access_key`` or ``secret_key`` (:data:`SECRET_KEY_RE`,
  case-insensitive) as ``"***"``. Credentials belong in the environment, not in configs.
* An empty file means all defaults.

Every field has a one-line ``description``; :func:`describe_schema` lists them.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from mcis_dist.config.base import ConfigError, ConfigSection  # noqa: F401  (re-exported)
from mcis_dist.config.schema import ExperimentConfig

T = TypeVar("T", bound=BaseModel)
SECRET_KEY_RE = re.compile(r"(secret|password|token|access_key|secret_key)$", re.IGNORECASE)
MASK = "***"
YAML_EXPONENT = re.compile(
    r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+"
)  # floats YAML 1.1 reads as strings
_OPS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_Overrides = Sequence[tuple[tuple[str, ...], str]]  # (key path, override text), in order


MISSING: Any = type("Missing", (), {"__repr__": lambda self: "<missing>"})()  # diff_configs


# --------------------------------------------------------------------------- schema helpers
def _section(annotation: Any) -> type[BaseModel] | None:
    """The model class behind a field annotation (``Model`` or ``Model | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for m in map(_section, typing.get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


def _allows_none(annotation: Any) -> bool:
    return annotation is None or type(None) in typing.get_args(annotation)


def _valid_keys(key: str, model: type[BaseModel], parts: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    where = f"in '{'.'.join(parts)}'" if parts else "at top level"
    return f"{hint}valid keys {where}: {', '.join(model.model_fields)}"


# --------------------------------------------------------------------------- error messages
def _got(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping (section)",
    "finite_number": "a finite number",
    "missing": "a value (required key)",
}


def _expected(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind == "literal_error":
        return f"one of {ctx['expected']}"
    bound = next((k for k in ctx if k in _OPS), None)
    if bound:
        return f"a value {_OPS[bound]} {ctx[bound]}"
    return err["msg"].removeprefix("Input should be ")


def _key_path(err: dict, schema: type[BaseModel]):
    """(key parts, field, model) of an error: walk the schema along the error's location."""
    parts: list[str] = []
    model, field, loc = schema, None, err["loc"]
    for i, item in enumerate(loc):
        if err["type"] == "extra_forbidden" and i == len(loc) - 1:
            parts.append(str(item))  # the unknown key itself
        elif isinstance(item, int):
            parts.append(f"[{item}]")
        elif model is not None and item in model.model_fields:
            field = model.model_fields[item]
            parts.append(item)
            model = _section(field.annotation)
        elif model is None and field is not None and typing.get_origin(field.annotation) is dict:
            parts.append(str(item))  # a key inside a dict-valued field
        # else: a union member tag ("int", "str"): not part of the key path
    return tuple(parts), field, model


def _format_errors(exc: ValidationError, schema: type[BaseModel], source: str, ovr: _Overrides):
    grouped: dict[tuple[str, ...], list[tuple[dict, Any, Any]]] = {}
    for err in exc.errors(include_url=False):
        parts, field, model = _key_path(err, schema)
        grouped.setdefault(parts, []).append((err, field, model))
    lines = []
    for parts, errs in grouped.items():
        key = ".".join(parts).replace(".[", "[") or "<top level>"
        err, field, model = errs[0]
        if err["type"] == "extra_forbidden":
            parent = schema
            for part in parts[:-1]:
                parent = _section(parent.model_fields[part].annotation) or parent
            line = f"{source}: unknown key '{key}' ({_valid_keys(parts[-1], parent, parts[:-1])})"
        elif err["type"] in ("value_error", "assertion_error"):
            got = "" if model is not None else f", got {_got(err['input'])}"
            line = f"{source}: {key}: {err['msg'].split(', ', 1)[-1]}{got}"
        else:
            want = " or ".join(dict.fromkeys(_expected(e) for e, _, _ in errs))
            if field is not None and _allows_none(field.annotation):
                want += " or null"
            line = f"{source}: {key}: expected {want}, got {_got(err['input'])}"
            if isinstance(err["input"], str) and YAML_EXPONENT.fullmatch(err["input"]):
                line += (
                    " (YAML 1.1 reads 1e-3 and 1.0e12 as strings: write 1.0e-3 or 1.0e+12, "
                    "with a dot and a signed exponent)"
                )
        for okey, text in reversed(ovr):  # the last override touching this key is responsible
            if okey[: len(parts)] == parts or parts[: len(okey)] == okey:
                line += f" [from override '{text}']"
                break
        lines.append(line)
    return ConfigError("\n".join(lines), lines)


# --------------------------------------------------------------------------- loading
def _validate(data: Any, schema: type[T], source: str, ovr: _Overrides = ()) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping of keys, got {_got(data)}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise _format_errors(exc, schema, source, ovr) from None


def config_from_dict(data: Mapping[str, Any], schema: type[T], source: str = "<dict>") -> T:
    """Validate an already-parsed dict (e.g. a checkpoint's stored config) against ``schema``."""
    return _validate(data, schema, source)


def _apply_override(data: dict, text: str, schema: type[BaseModel]) -> tuple[str, ...]:
    key, eq, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not eq or not all(parts):
        raise ValueError("expected KEY.PATH=VALUE, e.g. train.lr=0.01")
    model: type[BaseModel] | None = schema
    node = data  # walk the schema and the data together, creating missing sections
    for depth, part in enumerate(parts[:-1]):
        if part not in model.model_fields:
            raise ValueError(f"unknown key '{part}' ({_valid_keys(part, model, parts[:depth])})")
        where = ".".join(parts[: depth + 1])
        model = _section(model.model_fields[part].annotation)
        if model is None:
            raise ValueError(f"'{where}' is a value, not a section")
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ValueError(f"'{where}' is not a mapping in the file")
        node = node[part]
    if parts[-1] not in model.model_fields:
        raise ValueError(f"unknown key '{parts[-1]}' ({_valid_keys(parts[-1], model, parts[:-1])})")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"value is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parts


def load_config(
    path: str | os.PathLike | None, overrides: Sequence[str] = (), schema: type[T] | None = None
) -> T:
    """Read ``path`` (None: schema defaults), apply ``a.b=value`` overrides in order, validate.

    ``schema`` defaults to :class:`ExperimentConfig`. Every failure is a :class:`ConfigError`.
    """
    if schema is None:
        schema = ExperimentConfig
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    data: Any = {}
    source = "<overrides>" if overrides else "<defaults>"
    if path is not None:
        source = os.fspath(path)
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read config file: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{source}: YAML syntax error{where}: {problem}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping of keys, got {_got(data)}")
    applied, problems = [], []
    for text in overrides:
        try:
            applied.append((_apply_override(data, text, schema), text))
        except ValueError as exc:
            problems.append(f"override '{text}': {exc}")
    if problems:
        raise ConfigError("\n".join(problems), problems)
    return _validate(data, schema, source, applied)


# --------------------------------------------------------------------------- output
def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        secret = {k for k, v in value.items() if v is not None and SECRET_KEY_RE.search(str(k))}
        return {k: MASK if k in secret else _mask(v) for k, v in value.items()}
    return [_mask(v) for v in value] if isinstance(value, list) else value


def dump_config(cfg: BaseModel, *, mask_secrets: bool = False) -> str:
    """YAML of ``cfg``, keys in schema order; :func:`load_config` of it gives an equal object.

    With ``mask_secrets`` the secret-named values (:data:`SECRET_KEY_RE`) are written as "***".
    """
    data = cfg.model_dump(mode="json")
    data = _mask(data) if mask_secrets else data
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def resolved_config_text(cfg: BaseModel) -> str:
    """What every run folder's ``config.yaml`` holds: a header line, then :func:`dump_config`
    with secret-named values masked."""
    header = f"# Resolved {type(cfg).__name__}; secret-named values are masked as '***'.\n"
    return header + dump_config(cfg, mask_secrets=True)


def write_run_config(cfg: BaseModel, storage, name: str = "config.yaml") -> None:
    """Write ``cfg`` (:func:`resolved_config_text`) as ``name`` in a run folder, local or S3:
    ``storage`` is a :mod:`mcis_dist.storage` object, whose writes are atomic on both."""
    storage.write_bytes(name, resolved_config_text(cfg).encode())


def save_resolved_config(cfg: BaseModel, directory_or_path: str | os.PathLike) -> Path:
    """Write ``cfg``, secrets masked, to ``<dir>/config.yaml`` (or to a given ``*.yaml`` path).

    Atomic: a temp file in the same folder, fsynced, then ``os.replace``-d over the target, so
    readers never see half a file. Local paths only. Returns the path written.
    """
    if "://" in os.fspath(directory_or_path):
        raise ValueError(f"save_resolved_config writes local files only: {directory_or_path}")
    target = Path(directory_or_path)
    if target.suffix not in (".yaml", ".yml") or target.is_dir():
        target = target / "config.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    text = resolved_config_text(cfg)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if not isinstance(value, Mapping) or (prefix and not value):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def diff_configs(a: BaseModel | Mapping, b: BaseModel | Mapping) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (a value, b value) for each leaf that differs (:data:`MISSING` if absent).

    1 and 1.0 are equal, True and 1 are not. Secret-named values are reported as "***", and a
    "***" on either side (a saved, masked config) counts as equal to anything.
    """
    fa, fb = _flatten(a), _flatten(b)
    diff = {}
    for key in [*fa, *(k for k in fb if k not in fa)]:
        va, vb = fa.get(key, MISSING), fb.get(key, MISSING)
        if va == vb and isinstance(va, bool) == isinstance(vb, bool):
            continue
        if SECRET_KEY_RE.search(key.rsplit(".", 1)[-1]):
            if MASK in (va, vb):
                continue
            va, vb = (v if v is None or v is MISSING else MASK for v in (va, vb))
        diff[key] = (va, vb)
    return diff


def _type_name(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(map(_type_name, args))
    if ann is type(None):
        return "null"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(map(_type_name, args))}]"
    return getattr(ann, "__name__", str(ann))


def describe_schema(schema: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every leaf field, in schema order."""
    rows = []
    for name, field in schema.model_fields.items():
        key, sub = f"{prefix}{name}", _section(field.annotation)
        if sub is not None:
            rows += describe_schema(sub, f"{key}.")
            continue
        bounds = [
            f"{op} {getattr(m, k)}"
            for m in field.metadata
            for k, op in _OPS.items()
            if getattr(m, k, None) is not None
        ]
        kind = _type_name(field.annotation) + (f" ({', '.join(bounds)})" if bounds else "")
        default = field.get_default(call_default_factory=True)
        shown = default if isinstance(default, str) and default else json.dumps(default)
        rows.append((key, kind, shown, field.description or ""))
    return rows
