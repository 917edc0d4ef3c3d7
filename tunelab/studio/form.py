"""The new-run form of `tunelab studio`, generated from the typed config (tunelab.config).

Every leaf field of `Config` becomes one input: a select for a `Literal`, a checkbox for a bool,
a text box otherwise, with the field's `doc` as help text and its default filled in. The form
sends back only the fields that differ from the defaults, as the `key=value` overrides
`tunelab train` takes, and they are checked by the same `load_config` the command runs: an error
names its key, and the page shows it next to that field before anything starts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from tunelab.config import Config, field_docs, load_config
from tunelab.errors import ConfigError

# the sections shown first and open; the others start folded
MAIN_SECTIONS = ("", "data", "train")
# `model`, `data.*` file fields: picked from the data folder (the model may also be a name)
FILE_FIELDS = ("data.train", "data.validation", "data.test")
# keys the studio sets itself
HIDDEN = ("output_dir", "train.progress_bar")


@dataclasses.dataclass
class Field:
    key: str
    doc: str
    default: Any
    kind: Literal["select", "bool", "text", "file"]
    choices: list[str]
    section: str

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "doc": self.doc, "default": shown(self.default), "kind": self.kind,
                "choices": self.choices, "section": self.section}  # fmt: skip


def shown(value: Any) -> str:
    """A default as the text box shows it (YAML, as an override would spell it); None is empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def field_types(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> type annotation of every leaf field."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update(field_types(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


def literal_choices(tp: Any) -> list[str] | None:
    """The choices of a `Literal` (or `Literal | None`) annotation; None for other types."""
    if typing.get_origin(tp) is Literal:
        return [str(a) for a in typing.get_args(tp)]
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and typing.get_origin(args[0]) is Literal:
            return [""] + [str(a) for a in typing.get_args(args[0])]
    return None


def fields() -> list[Field]:
    """The form's fields, in the config's own order."""
    types_of = field_types()
    out = []
    for key, text, default in field_docs():
        if key in HIDDEN:
            continue
        tp = types_of[key]
        choices = literal_choices(tp)
        section = key.rsplit(".", 1)[0] if "." in key else ""
        if choices is not None:
            kind: Literal["select", "bool", "text", "file"] = "select"
        elif tp is bool:
            kind, choices = "bool", []
        elif key in FILE_FIELDS:
            kind, choices = "file", []
        else:
            kind, choices = "text", []
        out.append(Field(key, text, default, kind, choices, section))
    return out


def overrides(values: dict[str, str]) -> list[str]:
    """The `key=value` overrides of a submitted form: the fields whose text differs from the default."""
    defaults = {f.key: shown(f.default) for f in fields()}
    out = []
    for key, text in values.items():
        text = str(text).strip()
        if key not in defaults or text == defaults[key]:
            continue
        out.append(f"{key}={text if text else 'null'}")
    return out


ERROR_KEY = re.compile(r"^(?:unknown key ')?([A-Za-z_][\w.]*)")


def error_key(message: str) -> str | None:
    """The config key a ConfigError names (`train.epochs: ...`, `unknown key 'x.y'`), if any."""
    match = ERROR_KEY.match(message)
    if not match:
        return None
    key = match.group(1).rstrip(".")
    known = {f.key for f in fields()} | set(HIDDEN)
    while key and key not in known and "." in key:  # `data.fill.name` -> `data.fill`
        key = key.rsplit(".", 1)[0]
    return key if key in known else None


def resolve_data_paths(values: dict[str, str], data: Path) -> dict[str, str]:
    """File fields name files relative to the data folder; the run gets their absolute paths."""
    out = dict(values)
    for key in FILE_FIELDS:
        text = str(out.get(key) or "").strip()
        if text and not Path(text).is_absolute():
            out[key] = str((data / text).resolve())
    return out


def check(values: dict[str, str], data: Path) -> tuple[Config | None, list[str], dict[str, str]]:
    """(config, overrides, errors by key) of a submitted form, checked by `load_config`.

    File fields must lie inside the data folder. `errors` maps a key (or "" when no field is to
    blame) to the message; the config is None when there are errors.
    """
    errors: dict[str, str] = {}
    base = data.resolve()
    for key in FILE_FIELDS:
        text = str(values.get(key) or "").strip()
        if not text:
            continue
        path = (base / text).resolve()
        if not path.is_relative_to(base):
            errors[key] = f"{key}: {text} is outside the data folder; pick a file inside it"
        elif not path.is_file():
            errors[key] = f"{key}: {text} is not a file in the data folder"
    if not str(values.get("data.train") or "").strip():
        errors["data.train"] = "data.train: pick the training file"
    given = overrides(resolve_data_paths(values, data))
    try:
        config = load_config(overrides=given)
    except ConfigError as e:
        errors.setdefault(error_key(str(e)) or "", str(e))
        return None, given, errors
    return (None if errors else config), given, errors
