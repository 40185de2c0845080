"""``dataset.json``: the one reader (verify, prepare, training, predict and eval all use it) and writer.

nnU-Net v2's rules, checked by :func:`check_dataset_json`:

* required keys ``channel_names`` (the legacy ``modality`` is accepted with a warning), ``labels``,
  ``numTraining`` and ``file_ending``;
* ``channel_names``: a non-empty object with keys ``"0"``, ``"1"``, ... in channel order;
* ``labels``: name → integer, or name → list of integers for region-based labels; background is 0 and
  the values are consecutive (0, 1, 2, ...); an ``ignore`` label, if any, has the highest value;
* ``numTraining``: a non-negative integer (that it matches ``imagesTr`` is a case-level rule, see
  :mod:`ncatool.data.nnunet.verify`);
* ``file_ending``: one of the endings ncatool reads (``.nii.gz``, ``.png``, ...).

:func:`check_dataset_json` collects every problem (``verify`` lists them all);
:func:`read_dataset_json` raises them at once and otherwise returns a :class:`DatasetJson`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ncatool.data.io import SUPPORTED_EXTENSIONS, write_text_atomic
from ncatool.data.nnunet.layout import DATASET_JSON, FILE_ENDING
from ncatool.errors import NcaError, ValidationError

#: Keys nnU-Net v2 requires in ``dataset.json``.
REQUIRED_KEYS: tuple[str, ...] = ("channel_names", "labels", "numTraining", "file_ending")
#: The label name nnU-Net reserves for voxels that do not count in training.
IGNORE_LABEL = "ignore"
#: An extra key ``ncatool prepare`` writes: the layout the raw data came in (``"isic"``), so that a
#: model trained on the dataset writes masks the way that layout has them (``predict --format auto``).
SOURCE_LAYOUT_KEY = "source_layout"

#: A label's value: an integer, or a tuple of integers for a region-based label.
LabelValue = int | tuple[int, ...]


@dataclass(frozen=True)
class DatasetJson:
    """A valid ``dataset.json``.

    Attributes:
        path: The file.
        channel_names: ``{"0": name, ...}`` in channel order.
        labels: Name → value (tuples for region-based labels), as declared.
        num_training: ``numTraining``.
        file_ending: E.g. ``.nii.gz``.
        content: Everything the file holds (``name``, ``description`` and any other key).
    """

    path: Path
    channel_names: dict[str, str]
    labels: dict[str, LabelValue]
    num_training: int
    file_ending: str
    content: dict[str, Any] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        """Number of input channels."""
        return len(self.channel_names)

    @property
    def name(self) -> str | None:
        """The optional ``name``."""
        value = self.content.get("name")
        return None if value is None else str(value)

    @property
    def ignore_label(self) -> int | None:
        """The value of the ``ignore`` label, if declared."""
        value = self.labels.get(IGNORE_LABEL)
        return value if isinstance(value, int) else None

    @property
    def has_regions(self) -> bool:
        """True if some label is region-based (a list of values)."""
        return any(isinstance(v, tuple) for v in self.labels.values())

    @property
    def label_values(self) -> frozenset[int]:
        """Every value a label file may hold (including the ignore label)."""
        return frozenset(_values(self.labels.values()))


@dataclass
class DatasetJsonCheck:
    """What :func:`check_dataset_json` found; a field is None where its key is missing or invalid.

    Attributes:
        errors: ``"{path}: problem"`` lines.
        warnings: ``"{path}: note"`` lines.
    """

    path: Path
    content: dict[str, Any]
    channel_names: dict[str, str] | None = None
    labels: dict[str, LabelValue] | None = None
    num_training: int | None = None
    file_ending: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def label_values(self) -> frozenset[int] | None:
        """Every value a label file may hold, or None if ``labels`` is missing or invalid."""
        return None if self.labels is None else frozenset(_values(self.labels.values()))

    def dataset_json(self) -> DatasetJson:
        """The valid :class:`DatasetJson`.

        Raises:
            ValidationError: Any problem, all listed.
        """
        if (
            self.errors
            or self.channel_names is None
            or self.labels is None
            or self.num_training is None
            or self.file_ending is None
        ):
            n = len(self.errors)
            raise ValidationError(
                self.errors,
                f"{self.path}: {n} problem{'s' if n != 1 else ''}; not a valid nnU-Net v2 dataset.json",
            )
        return DatasetJson(
            path=self.path,
            channel_names=self.channel_names,
            labels=self.labels,
            num_training=self.num_training,
            file_ending=self.file_ending,
            content=self.content,
        )


def load_json_object(path: Path) -> dict[str, Any]:
    """Read a JSON file that must hold an object.

    Raises:
        NcaError: The file is missing, not valid JSON, or not a JSON object.
    """
    if not path.is_file():
        if path.name == DATASET_JSON:
            raise NcaError("no dataset.json (not an nnU-Net v2 raw dataset folder?)", path.parent)
        raise NcaError("file does not exist", path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NcaError(f"invalid JSON: {exc}", path) from exc
    if not isinstance(content, dict):
        raise NcaError("expected a JSON object", path)
    return content


def check_dataset_json(folder: Path) -> DatasetJsonCheck:
    """Read ``folder/dataset.json`` and check it against nnU-Net v2's rules, collecting every problem.

    Raises:
        NcaError: The file is missing, not valid JSON or not an object (nothing else to check).
    """
    path = folder / DATASET_JSON
    found = DatasetJsonCheck(path=path, content=load_json_object(path))
    content = found.content
    for key in REQUIRED_KEYS:
        if key not in content and not (key == "channel_names" and "modality" in content):
            found.errors.append(f"{path}: missing required key {key!r}")
    found.channel_names = _channel_names(content, path, found)
    if "labels" in content:
        found.labels = _labels(content["labels"], path, found.errors)
    if "file_ending" in content:
        ending = content["file_ending"]
        if not isinstance(ending, str) or ending.lower() not in SUPPORTED_EXTENSIONS:
            found.errors.append(
                f"{path}: file_ending {ending!r} is not one of {', '.join(SUPPORTED_EXTENSIONS)}"
            )
        else:
            found.file_ending = ending
    if "numTraining" in content:
        num = content["numTraining"]
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            found.errors.append(f"{path}: numTraining must be a non-negative integer, got {num!r}")
        else:
            found.num_training = num
    if "dataset" in content:
        found.warnings.append(f"{path}: explicit 'dataset' file lists are not checked")
    return found


def read_dataset_json(folder: Path) -> DatasetJson:
    """The ``dataset.json`` of a raw dataset folder, checked (warnings are dropped; ``verify`` shows them).

    Raises:
        NcaError: The file is missing or not a JSON object.
        ValidationError: It breaks nnU-Net's rules (every problem listed).
    """
    return check_dataset_json(folder).dataset_json()


def _channel_names(content: dict[str, Any], path: Path, found: DatasetJsonCheck) -> dict[str, str] | None:
    names = content.get("channel_names", content.get("modality"))
    if names is None:
        return None
    if "channel_names" not in content:
        found.warnings.append(f"{path}: legacy key 'modality' used instead of 'channel_names'")
    if not isinstance(names, dict) or not names:
        found.errors.append(f'{path}: channel_names must be a non-empty object like {{"0": "CT"}}')
        return None
    expected = {str(i) for i in range(len(names))}
    if set(names) != expected:
        found.errors.append(
            f'{path}: channel_names keys must be "0".."{len(names) - 1}", got {sorted(names)}'
        )
        return None
    return {str(i): str(names[str(i)]) for i in range(len(names))}


def _labels(labels: Any, path: Path, errors: list[str]) -> dict[str, LabelValue] | None:
    if not isinstance(labels, dict) or not labels:
        errors.append(f'{path}: labels must be a non-empty object like {{"background": 0}}')
        return None
    parsed: dict[str, LabelValue] = {}
    for name, value in labels.items():
        items = value if isinstance(value, list | tuple) else [value]
        if not items or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
            errors.append(f"{path}: label {name!r} has value {value!r}; expected an integer")
            return None
        parsed[str(name)] = tuple(items) if isinstance(value, list | tuple) else value
    values = set(_values(parsed.values()))
    regular = set(values)
    ignore = parsed.get(IGNORE_LABEL)
    if isinstance(ignore, int):
        if ignore != max(values):
            errors.append(f"{path}: the 'ignore' label must have the highest value")
        regular.discard(ignore)
    if 0 not in regular:
        errors.append(f"{path}: labels must contain background with value 0")
        return None
    if sorted(regular) != list(range(len(regular))):
        shown = ", ".join(str(v) for v in sorted(regular))
        errors.append(f"{path}: labels must be consecutive integers 0, 1, 2, ...; found [{shown}]")
        return None
    return parsed


def _values(values: Iterable[LabelValue]) -> list[int]:
    return [v for value in values for v in (value if isinstance(value, tuple) else (value,))]


# --------------------------------------------------------------------------------------------------
# Writing


def build_dataset_json(
    channel_names: Iterable[str],
    label_names: Iterable[str],
    num_training: int,
    name: str | None = None,
    description: str | None = None,
    file_ending: str = FILE_ENDING,
) -> dict[str, Any]:
    """The content of nnU-Net v2's ``dataset.json`` (the four required keys, as nnU-Net's
    ``generate_dataset_json`` writes them).

    Args:
        channel_names: One name per channel (nnU-Net picks the normalisation from it: ``CT`` is
            special, anything else means z-scoring).
        label_names: The *foreground* label names, for values 1, 2, ...; background is always 0.
        num_training: Number of training cases (files in ``labelsTr``).
        name: Optional dataset name.
        description: Optional free text.
        file_ending: The image file ending.

    Returns:
        The dictionary, keys in nnU-Net's order.
    """
    content: dict[str, Any] = {
        "channel_names": {str(i): n for i, n in enumerate(channel_names)},
        "labels": {"background": 0, **{n: i for i, n in enumerate(label_names, start=1)}},
        "numTraining": int(num_training),
        "file_ending": file_ending,
    }
    if name is not None:
        content["name"] = name
    if description is not None:
        content["description"] = description
    return content


def write_json(content: Any, path: Path) -> Path:
    """Write JSON (indented, trailing newline) atomically."""
    return write_text_atomic(json.dumps(content, indent=2) + "\n", path)
