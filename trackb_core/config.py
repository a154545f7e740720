"""Typed configuration: one pydantic model per stage, loaded from YAML with overrides.

Each stage module defines its own ``<Stage>Config`` beside the code that uses it (as
trl does with ``SFTConfig``). Its class docstring is the command's ``--help`` text and
each field's ``description`` is the option's help, so every default is documented
exactly once. Fields that name an upstream artifact are declared with
:func:`input_field`; the stage runner hashes them into the manifest.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticUndefined, to_jsonable_python

from trackb_core.errors import ConfigError

C = TypeVar("C", bound="StageConfig")

# Kinds of input a field can name (see trackb_core.stage.hash_input).
INPUT_KINDS = ("file", "dir", "model", "corpus")


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def input_field(default: Any = None, *, description: str, kind: str, filename: str = "",
                required: bool = True) -> Any:
    """A field naming an upstream artifact.

    ``kind`` is one of :data:`INPUT_KINDS`. For ``file`` inputs, ``filename`` is the
    file looked for when the URI names the upstream stage's folder. A ``required``
    input left empty is a ConfigError when the stage starts.
    """
    assert kind in INPUT_KINDS, kind
    return Field(default, description=description,
                 json_schema_extra={"input": kind, "filename": filename, "required": required})


def missing_inputs(config: StageConfig) -> list[str]:
    """Names of required input fields that ``config`` leaves empty."""
    missing = []
    for name, info in type(config).model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("required") and getattr(config, name) in (None, ""):
            missing.append(name)
    return missing


def declared_inputs(config: StageConfig) -> list[tuple[str, str, str, str]]:
    """``(field, uri, kind, filename)`` for every input field that has a value; a value
    that is not a string (a list of corpora) is given as its JSON."""
    found = []
    for name, info in type(config).model_fields.items():
        extra = info.json_schema_extra or {}
        if isinstance(extra, dict) and "input" in extra:
            value = getattr(config, name)
            if value not in (None, "", []):
                # a structured value (a list of corpora) travels as its JSON
                uri = value if isinstance(value, str) else json.dumps(
                    to_jsonable_python(value), sort_keys=True)
                found.append((name, str(uri), str(extra["input"]), str(extra["filename"])))
    return found


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping. Raises ConfigError if missing, unparsable or not a mapping."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def build_config(cls: type[C], values: dict[str, Any], *, source: str = "config") -> C:
    """Validate ``values`` into ``cls``. Raises ConfigError naming every bad field."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid {source} for {cls.__name__}: {problems}") from exc


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; nested mappings merge key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_dotted_overrides(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``["train.epochs=1", "run_id=x"]`` -> nested dict; values parsed as YAML scalars.

    Raises ConfigError on an item without ``=``.
    """
    import yaml

    result: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key=value (e.g. train.epochs=1)")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {pair!r} has an empty key part (e.g. train.epochs=1)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {pair!r}: the value is not valid YAML") from exc
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {pair!r} conflicts with {part}={child!r} given earlier")
            node = child
        node[parts[-1]] = value
    return result


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """(click type, is_flag) for a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _click_type(args[0])
        return str, False
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if origin in (list, tuple):
        return str, False  # comma-separated on the command line
    if annotation is bool:
        return bool, True
    if annotation in (int, float, str):
        return annotation, False
    return str, False


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return origin in (list, tuple)


def config_options(cls: type[StageConfig], skip: tuple[str, ...] = ()):
    """Decorator adding one ``--field-name`` option per field of ``cls``.

    Options default to None, meaning "not given": only given options override the
    YAML config and the class defaults. The help shows the class default.
    """

    def decorate(func):
        for name, info in reversed(list(cls.model_fields.items())):
            if name in skip:
                continue
            flag = "--" + name.replace("_", "-")
            click_type, is_flag = _click_type(info.annotation)
            default = info.get_default(call_default_factory=True)
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if default is PydanticUndefined or (extra.get("required") and default in (None, "")):
                default = "(required)"
            shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
            help_text = (info.description or "").rstrip(".") + (
                "  [required]" if shown == "(required)" else f".  [default: {shown}]")
            if is_flag:
                func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None,
                                    help=help_text)(func)
            else:
                func = click.option(flag, name, type=click_type, default=None,
                                    help=help_text, metavar=_metavar(click_type))(func)
        return func

    return decorate


def _metavar(click_type: Any) -> str | None:
    if isinstance(click_type, click.Choice):
        return None
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(click_type, None)


def options_to_overrides(cls: type[StageConfig], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options a user actually gave, converted to config values."""
    overrides: dict[str, Any] = {}
    for name, value in kwargs.items():
        if value is None or name not in cls.model_fields:
            continue
        if _is_list(cls.model_fields[name].annotation) and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        overrides[name] = value
    return overrides


def describe_defaults(cls: type[StageConfig]) -> str:
    """A YAML document of ``cls``'s defaults with each field's description as a comment."""
    lines = [f"# {(cls.__doc__ or cls.__name__).strip().splitlines()[0]}"]
    for name, info in cls.model_fields.items():
        lines.append(f"# {info.description}")
        default = to_jsonable_python(info.get_default(call_default_factory=True))
        import yaml

        lines.append(yaml.safe_dump({name: default}, sort_keys=False).strip())
    return "\n".join(lines) + "\n"
