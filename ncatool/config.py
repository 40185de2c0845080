"""Frozen, typed run configurations: defaults, TOML/JSON/YAML files, ``key=value`` overrides.

Each task has one flat frozen dataclass deriving from :class:`TrainConfig` (the loop's settings).
A config file may be flat or grouped in sections (``[model]``, ``[train]``...): section names are
ignored, keys must be fields. The resolved config is saved with every run as ``config.json`` and can
be passed back with ``--config``.

Names from elsewhere are accepted where they mean the same thing: a config class lists plain renames
in ``RENAMED`` (older ncatool names, or the names of a tool the task absorbs) and may translate
settings that need more than a rename in a classmethod ``translate_keys(values, source)`` (e.g. the
Growing NCA's ``iterations``, see :meth:`ncatool.tasks.growing.GrowConfig.translate_keys`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from ncatool.errors import NcaError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the one training loop, shared by every task."""

    task: str = ""
    epochs: int = 50  # passes over the training data (or iters_per_epoch batches)
    iters_per_epoch: int = 0  # 0: one pass over the training items
    batch_size: int = 8
    lr: float = 1.6e-3  # Adam, as Med-NCA / M3D-NCA
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0
    val_every: int = 1  # validate every N epochs
    early_stop: int = 0  # stop after N validations without improvement; 0 disables
    lr_schedule: str = "plateau"  # plateau: ReduceLROnPlateau on the validation score | step: see below
    plateau_patience: int = 5  # plateau: validations without improvement before the lr is cut
    plateau_factor: float = 0.5  # plateau: the cut
    lr_milestones: tuple[int, ...] = (2000,)  # step: optimiser steps at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1  # step: the factor (Growing NCA: 2e-3 -> 2e-4 after 2000 steps)
    grad_normalize: bool = False  # divide each parameter's gradient by its own norm (Growing NCA)
    nan_patience: int = 5  # consecutive non-finite steps before rolling back
    amp: str = "none"  # none | bf16 | fp16 autocast
    grad_checkpoint: int = 0  # recompute chunks of this many NCA steps in backward; 0 disables
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    samples: int = 3  # validation cases drawn in samples/epoch_NNN.png
    time_limit: float = 0.0  # minutes; stop after the epoch that reaches it (0 = no limit)
    logger: str = "none"  # none | tensorboard (RUN/tensorboard: scalars per epoch, sample pictures)


def config_fields(cls: type) -> dict[str, Any]:
    """Map field name → resolved type annotation for a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert ``value`` (str from the CLI, or a JSON/TOML value) to the field type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is tuple:
        items = (
            value.split(",")
            if isinstance(value, str)
            else list(value)
            if isinstance(value, list | tuple)
            else [value]
        )
        items = [
            i.strip() if isinstance(i, str) else i
            for i in items
            if not (isinstance(i, str) and i.strip() == "")
        ]
        elem = args[0]
        out = tuple(_coerce(i, elem, key, source) for i in items)
        if args and args[-1] is not Ellipsis and len(out) != len(args):
            raise NcaError(f"{key} needs {len(args)} values, got {len(out)}", source)
        return out
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            low = str(value).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if isinstance(value, list | tuple):  # e.g. --data repeated for a task that reads one dataset
                if len(value) != 1:
                    raise NcaError(
                        f"{key} takes one value, got {len(value)}: {', '.join(map(str, value))}", source
                    )
                value = value[0]
            return str(value)
    except (TypeError, ValueError):
        raise NcaError(f"{key}={value!r} is not a valid {getattr(tp, '__name__', tp)}", source) from None
    return value


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    """Merge ``[section]`` tables of a config file into one flat mapping."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value))
        else:
            flat[key] = value
    return flat


#: Config file endings ``--config`` reads.
CONFIG_SUFFIXES: tuple[str, ...] = (".toml", ".json", ".yaml", ".yml")


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML, JSON or YAML config into a flat dict.

    Raises:
        NcaError: Missing file, unknown extension or a parse error (with the file named).
    """
    import yaml

    if not path.is_file():
        raise NcaError("config file does not exist", path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise NcaError(f"config must be one of {', '.join(CONFIG_SUFFIXES)}", path)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise NcaError(f"cannot parse config: {err}", path) from err
    if not isinstance(data, dict):
        raise NcaError("config must be a table/object of settings", path)
    return _flatten(data)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["steps=64,64", "lr=1e-3"]`` → ``{"steps": "64,64", "lr": "1e-3"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise NcaError(f"override {item!r} must look like key=value")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def rename_old_keys(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Settings under another name (an older ncatool's, or a tool's the task absorbs), renamed with a
    one-line note.

    A config class lists its renames as ``RENAMED = {"old": "new"}``; an old name is never reused
    with another meaning, so a rename is always safe. When both names are given, the new one wins.
    """
    renamed = getattr(cls, "RENAMED", {})
    hits = [(old, new) for old, new in renamed.items() if old in values]
    if not hits:
        return values
    out = dict(values)
    for old, new in hits:
        value = out.pop(old)
        out.setdefault(new, value)
    from ncatool.console import info

    info(f"{source}: renamed setting(s) " + ", ".join(f"{o} -> {n}" for o, n in hits))
    return out


def build_config(cls: type[C], values: dict[str, Any], source: str = "options") -> C:
    """Instantiate ``cls`` from defaults plus ``values`` (coerced to the field types).

    Raises:
        NcaError: Unknown keys (listing the valid ones) or values of the wrong type.
    """
    translate = getattr(cls, "translate_keys", None)
    if translate is not None:
        values = translate(values, source)
    values = rename_old_keys(cls, values, source)
    known = config_fields(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise NcaError(f"unknown setting(s) {unknown}; valid: {', '.join(sorted(known))}", source)
    kwargs = {k: _coerce(v, known[k], k, source) for k, v in values.items()}
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# --------------------------------------------------------------------------------------------------
# Every setting of a config class with its default and its comment (``ncatool config TASK``)
# --------------------------------------------------------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of a config dataclass, read from the class bodies' source.

    A field's comment is the ``# ...`` after it (also after a field written over several lines) or,
    without one, the comment lines right above it. A subclass that sets a new default without a
    comment keeps its base class's comment.
    """
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            for name, text in _class_body_comments(klass).items():
                out.setdefault(name, text)
    return out


def _class_body_comments(klass: type) -> dict[str, str]:
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (a zipped install without .py files): no comments
        return {}
    names = {f.name for f in fields(klass)}
    comments: dict[str, str] = {}
    above: list[str] = []  # comment lines since the last statement
    trailing: list[str] = []  # comments inside the statement being read
    field_name: str | None = None  # the field the statement being read defines
    depth = 0  # indentation: 1 = the class body
    starts_statement = True
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        kind, text = tok.type, tok.string
        if kind == tokenize.INDENT:
            depth += 1
        elif kind == tokenize.DEDENT:
            depth -= 1
        elif kind == tokenize.COMMENT:
            (above if starts_statement else trailing).append(text.lstrip("#").strip())
        elif kind == tokenize.NL and starts_statement and not tok.line.strip():
            above = []  # a blank line: the comments above belong to nothing below
        elif kind == tokenize.NEWLINE:
            if field_name is not None:
                comments[field_name] = " ".join(trailing or above)
            above, trailing, field_name, starts_statement = [], [], None, True
            continue
        elif kind not in (tokenize.NL, tokenize.ENCODING) and starts_statement:
            starts_statement = False
            if depth == 1 and kind == tokenize.NAME and text in names:
                field_name = text
    return {k: v for k, v in comments.items() if v}


def _toml_value(value: Any) -> str:
    """One TOML value: booleans, numbers, strings, arrays; None as ``"none"`` (what ``--set`` takes)."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def config_toml(cls: type, header: str = "") -> str:
    """Every setting of the config dataclass ``cls`` with its default and comment, as TOML.

    The loop's settings (:class:`TrainConfig`) go in a ``[train]`` table and the task's own in a
    table named after the task; ``--config`` ignores table names, so the text reads back into the
    defaults: ``build_config(cls, read_config_file(path)) == cls()``.

    Args:
        cls: A config dataclass deriving from :class:`TrainConfig`.
        header: Comment lines (without ``#``) put first.
    """
    defaults = cls()
    comments = field_comments(cls)
    loop = {f.name for f in fields(TrainConfig)}

    def line(name: str) -> str:
        text = f"{name} = {_toml_value(getattr(defaults, name))}"
        return f"{text}  # {comments[name]}" if name in comments else text

    names = [f.name for f in fields(cls) if f.name != "task"]
    lines = [f"# {h}".rstrip() for h in header.splitlines()]
    lines += [line("task"), "", "[train]"]
    lines += [line(n) for n in names if n in loop]
    lines += ["", f"[{defaults.task or 'task'}]"]
    lines += [line(n) for n in names if n not in loop]
    return "\n".join(lines) + "\n"
