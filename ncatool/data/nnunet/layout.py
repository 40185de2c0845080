"""Where things are in an nnU-Net v2 raw dataset: folder and file names, and the cases they hold.

::

    nnUNet_raw/Dataset001_Name/
        dataset.json                  channel_names, labels, numTraining, file_ending (+ name, description)
        imagesTr/{CASE}_0000.nii.gz   one file per channel: _0000, _0001, ...
        labelsTr/{CASE}.nii.gz
        imagesTs/{CASE}_0000.nii.gz   optional held-out cases (``prepare --test-fraction``)
        labelsTs/{CASE}.nii.gz        their labels (an ncatool addition; nnU-Net ignores it)
        splits.json                   {"train": [...], "test": [...]} (an ncatool addition)
        tiles.json                    where each tile came from (``prepare --tile``; an ncatool addition)

This module only names and lists files; it opens none. What the files must hold is checked by
:mod:`ncatool.data.nnunet.verify`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ncatool.errors import NcaError

#: The file ending ``prepare`` writes.
FILE_ENDING = ".nii.gz"
DATASET_JSON = "dataset.json"
SPLITS_JSON = "splits.json"
TILES_JSON = "tiles.json"
MAX_DATASET_ID = 999
#: The two case sets of a raw dataset: ``Tr`` (imagesTr/labelsTr) and ``Ts`` (imagesTs/labelsTs).
SPLIT_SUFFIXES: tuple[str, ...] = ("Tr", "Ts")

_CHANNEL_STEM = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """The nnU-Net folder name ``Dataset{id:03d}_{name}``.

    Raises:
        NcaError: The id is outside 1..999 or the name has characters other than letters, digits,
            ``_``, ``-`` and ``.``.
    """
    if not 1 <= dataset_id <= MAX_DATASET_ID:
        raise NcaError(f"--dataset-id must be between 1 and {MAX_DATASET_ID}, got {dataset_id}")
    if not _DATASET_NAME.match(name):
        raise NcaError(
            f"--name {name!r} is not a valid dataset name: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )
    return f"Dataset{dataset_id:03d}_{name}"


def channel_file_name(case: str, channel: int, file_ending: str = FILE_ENDING) -> str:
    """The image file name of one channel of a case: ``{case}_{channel:04d}{file_ending}``."""
    return f"{case}_{channel:04d}{file_ending}"


def label_file_name(case: str, file_ending: str = FILE_ENDING) -> str:
    """The label file name of a case: ``{case}{file_ending}``."""
    return f"{case}{file_ending}"


def parse_channel_stem(stem: str) -> tuple[str, int] | None:
    """``("CASE", 1)`` for the stem ``CASE_0001`` of a channel file, None if it is not one."""
    match = _CHANNEL_STEM.match(stem)
    return None if match is None else (match["case"], int(match["channel"]))


@dataclass
class RawCases:
    """The files of one case set (``Tr`` or ``Ts``) of a raw dataset.

    Attributes:
        images_dir: ``images{split}``.
        labels_dir: ``labels{split}``.
        images: ``case -> {channel index -> file}``.
        labels: ``case -> label file``.
        unexpected: Files in the images folder not named ``{CASE}_{XXXX}{file_ending}``.
    """

    images_dir: Path
    labels_dir: Path
    images: dict[str, dict[int, Path]] = field(default_factory=dict)
    labels: dict[str, Path] = field(default_factory=dict)
    unexpected: list[Path] = field(default_factory=list)

    @property
    def cases(self) -> list[str]:
        """All case identifiers with an image or a label, sorted."""
        return sorted(set(self.images) | set(self.labels))


def find_raw_cases(folder: Path, split: str = "Tr", file_ending: str = FILE_ENDING) -> RawCases:
    """List the cases of ``images{split}`` and ``labels{split}`` (hidden files are skipped).

    Args:
        folder: The dataset folder.
        split: ``"Tr"`` or ``"Ts"``.
        file_ending: From ``dataset.json``.

    Returns:
        The :class:`RawCases`; missing folders give empty mappings.
    """
    found = RawCases(images_dir=folder / f"images{split}", labels_dir=folder / f"labels{split}")
    for path in _files_with_ending(found.images_dir, file_ending):
        parsed = parse_channel_stem(path.name[: -len(file_ending)])
        if parsed is None:
            found.unexpected.append(path)
            continue
        case, channel = parsed
        found.images.setdefault(case, {})[channel] = path
    for path in _files_with_ending(found.labels_dir, file_ending):
        found.labels[path.name[: -len(file_ending)]] = path
    return found


def _files_with_ending(folder: Path, file_ending: str) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.name.endswith(file_ending) and not p.is_dir()
    )
