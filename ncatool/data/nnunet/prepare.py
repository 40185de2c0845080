"""Raw image/label pairs → an nnU-Net v2 raw dataset (``ncatool prepare``).

1. pair the input files (:func:`ncatool.data.nnunet.pairs.discover_pairs`) and check every pair with
   the rules of :mod:`ncatool.data.nnunet.verify` (:func:`~ncatool.data.nnunet.pairs.check_pair`);
   any invalid pair stops here, before anything is written (unless ``skip_invalid``);
2. optionally cut every case into tiles (:mod:`ncatool.data.tiles`) and hold out a seeded test set
   (:func:`ncatool.data.splits.split_cases`);
3. write every case into a hidden temporary sibling folder (``.DatasetNNN_Name.tmp-XXXX``): NIfTI
   inputs are linked or copied as they are, everything else is converted; then ``dataset.json``,
   ``splits.json`` (and ``tiles.json``);
4. rename the temporary folder into place, so a crash never leaves half a dataset under the final name.

**2D images** (PNG/JPG or 2D NIfTI/NRRD inputs) are written as genuine *2D* NIfTI files: array
``(Y, X)``, spacing ``(x, y)``, no invented z axis. nnU-Net's ``SimpleITKIO`` reads a 2D file as
``(1, Y, X)`` with a dummy out-of-plane spacing of 999 (how it marks 2D data), so nnU-Net plans the
dataset as 2D. In ncatool, :func:`ncatool.data.io.read_image` returns ``Image.ndim == 2`` for such
files and :func:`ncatool.data.loading.load_case` gives arrays ``(C, Y, X)``; 3D cases ``(C, Z, Y, X)``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ncatool import console
from ncatool.data.io import Image, read_image, write_image
from ncatool.data.nnunet.dataset_json import SOURCE_LAYOUT_KEY, build_dataset_json, write_json
from ncatool.data.nnunet.layout import (
    DATASET_JSON,
    SPLITS_JSON,
    TILES_JSON,
    channel_file_name,
    dataset_folder_name,
    label_file_name,
)
from ncatool.data.nnunet.pairs import (
    PairCheck,
    check_dataset,
    check_pair,
    discover_pairs,
    image_channels,
    label_array,
    label_dtype,
)
from ncatool.data.nnunet.verify import Issue, console_escape
from ncatool.data.splits import split_cases
from ncatool.data.tiles import crop_image, tile_name, tile_slices
from ncatool.errors import NcaError, ValidationError


@dataclass
class PrepareOptions:
    """What ``ncatool prepare`` was asked to do (see the command's help for each option)."""

    out: Path
    dataset_id: int
    name: str
    layout: str = "auto"
    folder: Path | None = None
    images: Path | None = None
    labels: Path | None = None
    label_names: list[str] | None = None
    channel_names: list[str] | None = None
    description: str | None = None
    grayscale: bool = False
    link: bool = False
    test_fraction: float = 0.0
    seed: int = 0
    skip_invalid: bool = False
    overwrite: bool = False
    tile: tuple[int, ...] | None = None


#: Tiles of each source case: ``{case: [(tile case, region in array order), ...]}``.
TilePlan = dict[str, list[tuple[str, tuple[slice, ...]]]]


@dataclass
class SkippedCase:
    """A case left out by ``--skip-invalid`` and why."""

    case: str
    problems: list[str]


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` wrote."""

    dataset: Path
    layout: str
    ndim: int
    train: list[str]
    test: list[str]
    channel_names: dict[str, str]
    labels: dict[str, int]
    skipped: list[SkippedCase] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=lambda: {"linked": 0, "copied": 0, "converted": 0})
    tiles: TilePlan | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable summary."""
        return {
            "dataset": str(self.dataset),
            "dataset_name": self.dataset.name,
            "layout": self.layout,
            "ndim": self.ndim,
            "num_training": len(self.train),
            "num_test": len(self.test),
            "cases": {"train": self.train, "test": self.test},
            "channel_names": self.channel_names,
            "labels": self.labels,
            "files": self.files,
            "skipped": [{"case": s.case, "problems": s.problems} for s in self.skipped],
            "warnings": self.warnings,
            "ignored": self.ignored,
            "tiled_from": None
            if self.tiles is None
            else {c: [t for t, _ in ts] for c, ts in self.tiles.items()},
        }


def prepare_dataset(options: PrepareOptions) -> PrepareResult:
    """Validate raw image/label pairs and write them as an nnU-Net v2 raw dataset.

    Nothing is written unless every pair is valid (or ``skip_invalid``): all pairs are read and
    checked first, then converted into a temporary sibling folder that is renamed into place.

    Args:
        options: The inputs, the target and the conversion options.

    Returns:
        What was written, skipped and warned about.

    Raises:
        NcaError: Bad options, no pairs, or the dataset folder exists without ``overwrite``.
        ValidationError: Invalid pairs (without ``skip_invalid``), all listed.
    """
    folder_name = dataset_folder_name(options.dataset_id, options.name)
    if not 0.0 <= options.test_fraction < 1.0:
        raise NcaError(f"--test-fraction must be in [0, 1), got {options.test_fraction}")
    if options.out.exists() and not options.out.is_dir():
        raise NcaError("--out is not a folder", options.out)
    target = options.out / folder_name
    _check_target(options.out, target, options.dataset_id, options.overwrite)

    pairing = discover_pairs(options.layout, options.folder, options.images, options.labels)
    if not pairing.pairs and not pairing.problems:
        where = options.folder or options.images
        raise NcaError(f"no image/label pairs found ({pairing.layout} layout)", where)
    unpaired = f", {len(pairing.problems)} unpaired" if pairing.problems else ""
    console.info(f"checking {len(pairing.pairs)} image/label pairs ({pairing.layout} layout{unpaired})")
    max_label = len(options.label_names) if options.label_names else None
    checks = [check_pair(p, options.grayscale, max_label) for p in pairing.pairs]
    check_dataset(checks, len(options.label_names) if options.label_names else None)

    skipped = _skipped(pairing.problems, checks)
    if skipped and not options.skip_invalid:
        problems = [p for case in skipped for p in case.problems]
        total = len({*(p.case for p in pairing.problems), *(c.pair.case for c in checks)})
        raise ValidationError(
            problems,
            f"{len(skipped)} of {total} cases are invalid; nothing was written "
            "(fix them, or use --skip-invalid to prepare only the valid ones)",
        )
    valid = [c for c in checks if c.valid]
    if not valid:
        raise ValidationError([p for case in skipped for p in case.problems], "no valid cases to prepare")
    for s in skipped:
        console.warn(console_escape(f"skipping case {s.case!r}: " + "; ".join(s.problems)))

    warnings = [str(w) for c in valid for w in c.warnings]
    labels = _labels(options.label_names, valid, warnings)
    channel_names = _channel_names(options.channel_names, valid[0])
    tiles = plan_tiles(valid, options.tile) if options.tile else None
    cases = [t for ts in tiles.values() for t, _ in ts] if tiles else [c.pair.case for c in valid]
    train, test = split_cases(cases, options.test_fraction, options.seed)
    if options.test_fraction > 0 and not test:
        warnings.append(f"--test-fraction {options.test_fraction} of {len(cases)} cases gives no test case")
    result = PrepareResult(
        dataset=target,
        layout=pairing.layout,
        ndim=valid[0].ndim or 0,
        train=train,
        test=test,
        channel_names={str(i): n for i, n in enumerate(channel_names)},
        labels=labels,
        skipped=skipped,
        warnings=warnings,
        ignored=[str(p) for p in pairing.ignored],
        tiles=tiles,
    )
    dataset_json = build_dataset_json(
        channel_names, list(labels)[1:], len(train), name=options.name, description=options.description
    )
    if pairing.layout == "isic":
        # an extra key (nnU-Net ignores it): models trained on this dataset write ISIC-style PNG masks
        dataset_json[SOURCE_LAYOUT_KEY] = "isic"
    _build(options, valid, result, dataset_json)
    return result


def plan_tiles(valid: list[PairCheck], sizes: tuple[int, ...]) -> TilePlan:
    """Cut every valid case into tiles (see :mod:`ncatool.data.tiles`).

    Args:
        valid: The checked pairs (their image shapes are known).
        sizes: Tile sizes in array order (one for all axes, or one per axis; 0 = whole axis).

    Returns:
        The tiles of each case, named ``CASE_tNNN`` in C order.

    Raises:
        NcaError: ``sizes`` does not match the dimensionality.
    """
    plan: TilePlan = {}
    for check in valid:
        if check.shape is None:  # cannot happen for a valid pair
            raise NcaError("image shape unknown while tiling", check.pair.image)
        regions = tile_slices(check.shape, sizes)
        plan[check.pair.case] = [(tile_name(check.pair.case, i), r) for i, r in enumerate(regions)]
    return plan


def tiles_json(plan: TilePlan) -> dict[str, Any]:
    """``tiles.json`` content: for each tile, its source case and ``start``/``shape`` in array order."""
    return {
        tile: {
            "case": case,
            "start": [s.start for s in region],
            "shape": [s.stop - s.start for s in region],
        }
        for case, tiles in plan.items()
        for tile, region in tiles
    }


def _check_target(out: Path, target: Path, dataset_id: int, overwrite: bool) -> None:
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise NcaError("dataset folder already exists; use --overwrite to replace it", target)
    if out.is_dir():
        prefix = f"Dataset{dataset_id:03d}_"
        for other in sorted(out.iterdir()):
            if other.name.startswith(prefix) and other.name != target.name and other.is_dir():
                raise NcaError(
                    f"dataset id {dataset_id} is already used by {other.name}; nnU-Net needs unique ids "
                    "(choose another --dataset-id or remove that folder)",
                    other,
                )


def _skipped(pairing_problems: list[Issue], checks: list[PairCheck]) -> list[SkippedCase]:
    by_case: dict[str, list[str]] = {}
    for issue in pairing_problems:
        by_case.setdefault(issue.case or str(issue.path), []).append(str(issue))
    for check in checks:
        if not check.valid:
            by_case.setdefault(check.pair.case, []).extend(str(e) for e in check.errors)
    return [SkippedCase(case, problems) for case, problems in sorted(by_case.items())]


def _labels(label_names: list[str] | None, valid: list[PairCheck], warnings: list[str]) -> dict[str, int]:
    found = set().union(*(c.label_values for c in valid))
    if label_names is None:
        highest = max(found, default=0)
        if highest == 0:
            warnings.append("no label file has any foreground voxel")
        names = [f"label_{i}" for i in range(1, highest + 1)]
    else:
        if "background" in label_names:
            raise NcaError("--label-names names the foreground labels 1, 2, ...; background is always 0")
        names = label_names
        for value, name in enumerate(names, start=1):
            if value not in found:
                warnings.append(f"label {value} ({name!r}) does not occur in any label file")
    return {"background": 0, **{n: i for i, n in enumerate(names, start=1)}}


def _channel_names(given: list[str] | None, reference: PairCheck) -> list[str]:
    defaults = list(reference.default_channel_names)
    if given is None:
        return defaults
    if len(given) != len(defaults):
        raise NcaError(
            f"--channel-names gives {len(given)} names but the images have {len(defaults)} channels "
            f"(e.g. {reference.pair.image})"
        )
    return given


def _build(
    options: PrepareOptions, valid: list[PairCheck], result: PrepareResult, dataset_json: dict[str, Any]
) -> None:
    created = _missing_parents(options.out)
    options.out.mkdir(parents=True, exist_ok=True)
    tmp = options.out / f".{result.dataset.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        test = set(result.test)
        highest_label = max(result.labels.values())
        for check in valid:
            if result.tiles is not None:
                _write_tiles(check, result.tiles[check.pair.case], tmp, test, options, highest_label, result)
                continue
            split = "Ts" if check.pair.case in test else "Tr"
            console.debug(f"writing {check.pair.case} → images{split}")
            _write_case(check, tmp / f"images{split}", tmp / f"labels{split}", options, highest_label, result)
        if result.tiles is not None:
            write_json(tiles_json(result.tiles), tmp / TILES_JSON)
        (tmp / "imagesTr").mkdir(exist_ok=True)
        (tmp / "labelsTr").mkdir(exist_ok=True)
        write_json(dataset_json, tmp / DATASET_JSON)
        write_json({"train": result.train, "test": result.test}, tmp / SPLITS_JSON)
        _commit(tmp, result.dataset, options.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _missing_parents(path: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create, deepest first."""
    missing: list[Path] = []
    current = path.absolute()
    while not current.exists():
        missing.append(current)
        current = current.parent
    return missing


def _write_case(
    check: PairCheck,
    images_dir: Path,
    labels_dir: Path,
    options: PrepareOptions,
    highest_label: int,
    result: PrepareResult,
) -> None:
    pair = check.pair
    images_dir.mkdir(exist_ok=True)
    labels_dir.mkdir(exist_ok=True)
    reference: Image | None = None
    if check.image_passthrough:
        _transfer(pair.image, images_dir / channel_file_name(pair.case, 0), options.link, result)
    else:
        image = read_image(pair.image)
        channels, _ = image_channels(image, pair.image, options.grayscale)
        for index, channel in enumerate(channels):
            write_image(channel, images_dir / channel_file_name(pair.case, index))
        result.files["converted"] += len(channels)
        reference = channels[0]
    destination = labels_dir / label_file_name(pair.case)
    if check.label_passthrough:
        _transfer(pair.label, destination, options.link, result)
        return
    write_image(_label_image(check, highest_label, reference), destination)
    result.files["converted"] += 1


def _label_image(check: PairCheck, highest_label: int, reference: Image | None) -> Image:
    """The label of a pair as written: 0/1 for planar 0/255 masks, smallest dtype, image geometry if needed."""
    label = read_image(check.pair.label)
    array, _ = label_array(label, check.pair.label)
    if array is None:  # cannot happen for a valid pair
        raise NcaError("label became unreadable while preparing", check.pair.label)
    geometry = label
    if check.harmonize_label:
        geometry = reference if reference is not None else read_image(check.pair.image)
    return Image(
        array=array.astype(label_dtype(highest_label)),
        spacing=geometry.spacing,
        origin=geometry.origin,
        direction=geometry.direction,
    )


def _write_tiles(
    check: PairCheck,
    tiles: list[tuple[str, tuple[slice, ...]]],
    root: Path,
    test: set[str],
    options: PrepareOptions,
    highest_label: int,
    result: PrepareResult,
) -> None:
    """Write every tile of one case as a case of its own (always converted, never linked)."""
    channels, _ = image_channels(read_image(check.pair.image), check.pair.image, options.grayscale)
    label = _label_image(check, highest_label, channels[0])
    for tile, region in tiles:
        split = "Ts" if tile in test else "Tr"
        console.debug(f"writing {tile} ({check.pair.case} {region}) → images{split}")
        images_dir, labels_dir = root / f"images{split}", root / f"labels{split}"
        images_dir.mkdir(exist_ok=True)
        labels_dir.mkdir(exist_ok=True)
        for index, channel in enumerate(channels):
            write_image(crop_image(channel, region), images_dir / channel_file_name(tile, index))
        write_image(crop_image(label, region), labels_dir / label_file_name(tile))
        result.files["converted"] += len(channels) + 1


def _transfer(source: Path, destination: Path, link: bool, result: PrepareResult) -> None:
    try:
        if link:
            os.symlink(source.resolve(), destination)
        else:
            shutil.copyfile(source, destination)
    except OSError as err:
        # copyfile names the source in its error even when writing the copy failed (disk full)
        if isinstance(err, FileNotFoundError | PermissionError) and err.filename == str(source):
            raise
        raise NcaError(f"cannot write: {err.strerror or err}", destination) from err
    result.files["linked" if link else "copied"] += 1


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder to ``target`` (replacing it with ``overwrite``)."""
    if not (target.exists() or target.is_symlink()):
        os.rename(tmp, target)
        return
    if not overwrite:
        raise NcaError("dataset folder already exists; use --overwrite to replace it", target)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
