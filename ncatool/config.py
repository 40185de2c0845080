"""Frozen, typed run configurations: defaults, TOML/JSON files, ``key=value`` overrides.

Each task has one flat frozen dataclass deriving from :class:`TrainConfig` (the loop's settings).
A config file may be flat or grouped in sections (``[model]``, ``[train]``...): section names are
ignored, keys must be fields. The resolved config is saved with every run as ``config.json`` and can
be passed back with ``--config``.
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
    plateau_patience: int = 5  # ReduceLROnPlateau on the validation score
    plateau_factor: float = 0.5
    nan_patience: int = 5  # consecutive non-finite steps before rolling back
    amp: str = "none"  # none | bf16 | fp16 autocast
    grad_checkpoint: int = 0  # recompute chunks of this many NCA steps in backward; 0 disables
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    samples: int = 3  # validation cases drawn in samples/epoch_NNN.png
    time_limit: float = 0.0  # minutes; stop after the epoch that reaches it (0 = no limit)


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


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML or JSON config into a flat dict.

    Raises:
        NcaError: Missing file, unknown extension or a parse error (with the file named).
    """
    if not path.is_file():
        raise NcaError("config file does not exist", path)
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        elif path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise NcaError("config must be .toml or .json", path)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
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


def build_config(cls: type[C], values: dict[str, Any], source: str = "options") -> C:
    """Instantiate ``cls`` from defaults plus ``values`` (coerced to the field types).

    Raises:
        NcaError: Unknown keys (listing the valid ones) or values of the wrong type.
    """
    known = config_fields(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise NcaError(f"unknown setting(s) {unknown}; valid: {', '.join(sorted(known))}", source)
    kwargs = {k: _coerce(v, known[k], k, source) for k, v in values.items()}
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
