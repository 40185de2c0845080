"""``ncatool predict``: run a trained NCA of any task on new inputs.

The checkpoint names its task; :func:`ncatool.runtime.load` rebuilds that task's runner from the
checkpoint alone and the runner writes the outputs: segmentation masks that keep each input's
geometry (:mod:`ncatool.tasks.segmentation.runner`), or images grown from the seed
(:mod:`ncatool.tasks.generation`). This module owns what every runner shares: finding input cases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ncatool.data.io import is_image_file, split_extension
from ncatool.data.loading import CaseRecord
from ncatool.data.nnunet.layout import parse_channel_stem
from ncatool.errors import NcaError

# --------------------------------------------------------------------------------------------------
# Finding input cases
# --------------------------------------------------------------------------------------------------


def _group_files(files: Sequence[Path]) -> list[CaseRecord]:
    """Group image files into cases.

    ``CASE_0000.ext``, ``CASE_0001.ext``... form one multi-channel case ``CASE`` whenever a
    ``CASE_0000`` file exists; every other file is a one-file case named by its stem.
    """
    by_stem: dict[str, Path] = {}
    for path in files:
        stem, _ = split_extension(path)
        if stem in by_stem:
            raise NcaError(f"two input files for case {stem!r}: {by_stem[stem].name} and {path.name}", path)
        by_stem[stem] = path
    groups: dict[str, dict[int, Path]] = {}
    single: dict[str, Path] = {}
    for stem, path in by_stem.items():
        channel = parse_channel_stem(stem)
        if channel is not None and f"{channel[0]}_0000" in by_stem:
            groups.setdefault(channel[0], {})[channel[1]] = path
        else:
            single[stem] = path
    records = []
    for case, channels in groups.items():
        if case in single:
            raise NcaError(f"case {case!r} is both a single file and a _0000 channel group", single[case])
        missing = [c for c in range(max(channels) + 1) if c not in channels]
        if missing:
            first = channels[0]
            ext = split_extension(first)[1]
            raise NcaError(
                f"channel file missing for case {case!r}", first.with_name(f"{case}_{missing[0]:04d}{ext}")
            )
        records.append(CaseRecord(case, [channels[c] for c in sorted(channels)], None))
    records += [CaseRecord(stem, [path], None) for stem, path in single.items()]
    return sorted(records, key=lambda r: r.name)


def _same_case(path: Path, case: str) -> bool:
    channel = parse_channel_stem(split_extension(path)[0])
    return channel is not None and channel[0] == case


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def discover_cases(path: str | Path) -> tuple[list[CaseRecord], str]:
    """The cases of an input: one image file, a folder of images, or an nnU-Net dataset folder.

    Args:
        path: A file (``CASE_0000.nii.gz`` brings its sibling channel files along), a folder of image
            files (``CASE_XXXX`` channel files grouped per case), or an nnU-Net raw dataset folder
            (``imagesTs`` when it exists, else ``imagesTr``).

    Returns:
        ``(cases sorted by name, description of the source)``.

    Raises:
        NcaError: The path is missing, holds no images, or a case's files are incomplete.
    """
    from ncatool.data.loading import NnUNetDataset

    path = Path(path)
    if not path.exists():
        raise NcaError("input does not exist", path)
    if path.is_file():
        if not is_image_file(path):
            raise NcaError("not an image file ncatool can read", path)
        channel = parse_channel_stem(split_extension(path)[0])
        if channel is None:
            return [CaseRecord(split_extension(path)[0], [path], None)], str(path)
        siblings = [p for p in _image_files(path.parent) if _same_case(p, channel[0])]
        records = [r for r in _group_files(siblings) if path in r.image_paths]
        return records, str(path)
    if (path / "dataset.json").is_file():
        dataset = NnUNetDataset(path)
        split = "test" if (path / "imagesTs").is_dir() else "train"
        records = dataset.cases(split)
        if not records:
            raise NcaError("holds no cases", path / ("imagesTs" if split == "test" else "imagesTr"))
        return records, str(path / ("imagesTs" if split == "test" else "imagesTr"))
    files = _image_files(path)
    if not files:
        raise NcaError("folder holds no image files (.nii.gz, .nrrd, .mha, .png, ...)", path)
    return _group_files(files), str(path)


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------


def predict(
    checkpoint: str | Path,
    input_path: str | Path | None,
    output: str | Path,
    ensemble: int = 1,
    native: bool = False,
    device: str = "auto",
    amp: str = "none",
    seed: int = 0,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    samples: int = 4,
    labels: Sequence[int] | None = None,
    steps: int | None = None,
    format: str = "auto",
    context: str | Path | None = None,
    context_size: int | None = None,
    adapt_steps: int = 0,
) -> dict[str, Any]:
    """``ncatool predict``: run ``checkpoint``'s task on ``input_path`` (segmentation) or grow
    samples (generation) into ``output``.

    Args:
        checkpoint: A run's checkpoint, e.g. ``RUN/checkpoints/best.pt``.
        input_path: Segmentation: an image file, a folder of images, or an nnU-Net dataset folder
            (:func:`discover_cases`).
        output: The output folder.
        ensemble: Stochastic runs averaged per case (> 1 also writes ``_std`` maps and a quality score).
        native: Run at each input's own size instead of the training ``target_size``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        amp: ``none`` or ``bf16`` autocast.
        seed: Seed of the stochastic cell updates.
        on_case: Called with each case's result row as soon as it is written.
        samples: Generation: samples to grow (per digit for digits).
        labels: Digits: which digits (default all ten).
        steps: Generation: NCA steps (default as validated).
        format: Segmentation masks: ``auto`` (PNG of the input's size for PNG/JPG/BMP/TIFF inputs,
            ISIC-style ``CASE_segmentation.png`` 0/255 for ISIC-trained binary models; NIfTI with
            the input's geometry for volumes), ``nifti`` or ``png``.
        context: In-context checkpoints: the nnU-Net dataset whose examples say what to segment.
        context_size: In-context checkpoints: example pairs per label (None: the run's).
        adapt_steps: In-context checkpoints: fine-tune a copy of the model on each label's context
            for this many steps before segmenting (0: none).

    Returns:
        The runner's JSON-ready summary (segmentation: one row per case under ``cases``;
        generation: the written ``files``).

    Raises:
        NcaError: Bad checkpoint, inputs that do not fit it, or options its task does not use.
    """
    from ncatool.runtime import PredictRequest, load

    request = PredictRequest(
        output=Path(output),
        input=Path(input_path) if input_path is not None else None,
        ensemble=ensemble,
        native=native,
        seed=seed,
        samples=samples,
        labels=tuple(int(k) for k in labels) if labels is not None else None,
        steps=steps,
        format=format,
        on_case=on_case,
        context=Path(context) if context is not None else None,
        context_size=context_size,
        adapt_steps=adapt_steps,
    )
    return load(checkpoint, device, amp).predict(request)


__all__ = ["discover_cases", "predict"]
