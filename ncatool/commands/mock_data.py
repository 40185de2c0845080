"""``ncatool mock-data``: synthetic image/mask pairs for tests, demos and benchmarks."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer


class Difficulty(str, Enum):
    """``--difficulty`` presets (:data:`ncatool.data.mock.DIFFICULTIES`)."""

    easy = "easy"
    hard = "hard"


def mock_data(
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output folder for <case>_img.nii.gz / <case>_gt.nii.gz."),
    ],
    cases: Annotated[int, typer.Option("--cases", "-n", min=1, help="Number of cases.")] = 6,
    dim: Annotated[int, typer.Option("--dim", min=2, max=3, help="2 (images) or 3 (volumes).")] = 3,
    size_min: Annotated[
        int,
        typer.Option("--size-min", help="Smallest side length in voxels (each axis drawn independently)."),
    ] = 60,
    size_max: Annotated[int, typer.Option("--size-max", help="Largest side length in voxels.")] = 70,
    shapes: Annotated[
        list[str] | None,
        typer.Option(
            "--shapes",
            help="Comma list or repeated: sphere, cube, cylinder, ellipsoid, torus, or all. "
            "In 2D they become disk, square, rectangle, ellipse, ring (these names work too). "
            "Default: all.",
        ),
    ] = None,
    multi: Annotated[
        int | None,
        typer.Option(
            "--multi",
            min=1,
            help="Objects per case, labelled 1..K with distinct intensities (1 = binary). "
            "Default: 1 (easy), 3 (hard).",
        ),
    ] = None,
    noise: Annotated[
        float | None,
        typer.Option(
            "--noise",
            min=0.0,
            help="Gaussian noise std relative to object/background contrast. Default: 0.1 (easy), 0.15 (hard).",
        ),
    ] = None,
    bias: Annotated[
        float | None,
        typer.Option(
            "--bias",
            min=0.0,
            help="Strength of the smooth multiplicative bias field (0 = off). Default: 0.2 (easy), 0.15 (hard).",
        ),
    ] = None,
    difficulty: Annotated[
        Difficulty,
        typer.Option(
            "--difficulty",
            help="Preset: easy (one bright object, weak noise: a threshold solves it) or hard (three "
            "labels a small intensity step apart, fine texture on top of the noise, touching "
            "objects). Options given explicitly override the preset.",
        ),
    ] = Difficulty.easy,
    contrast: Annotated[
        float | None,
        typer.Option(
            "--contrast",
            help="Intensity step from the background to label 1 and between labels (background 0..0.2). "
            "Default: objects at 0.5..1.0 (easy), 0.25 (hard).",
        ),
    ] = None,
    texture: Annotated[
        float | None,
        typer.Option(
            "--texture",
            min=0.0,
            help="Fine random texture, std relative to the object/background contrast. "
            "Default: 0 (easy), 0.15 (hard).",
        ),
    ] = None,
    touching: Annotated[
        bool | None,
        typer.Option(
            "--touching/--apart",
            help="Place objects in contact with each other. Default: apart (easy), touching (hard).",
            show_default=False,
        ),
    ] = None,
    spacing: Annotated[
        str | None,
        typer.Option(
            "--spacing", help="Voxel size in mm, x,y[,z] order: one value or one per axis, e.g. 1,1,2.5."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Random seed; the same seed gives identical files.")
    ] = 0,
    prefix: Annotated[
        str, typer.Option("--prefix", help="Case name prefix: case -> case_001, case_002, ...")
    ] = "case",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing files.")] = False,
    shape_labels: Annotated[
        bool,
        typer.Option(
            "--shape-labels",
            help="One label per shape class (label k = the k-th of --shapes) instead of one per object: "
            "a multi-task set; with --multi K each case holds K objects of random classes.",
        ),
    ] = False,
    from_labels: Annotated[
        Path | None,
        typer.Option(
            "--from-labels",
            help="Synthesise images from real label maps instead (a file, a folder, or an nnU-Net "
            "dataset's labelsTr): --cases images per map, random per-label intensities, bias, blur, "
            "noise and deformation; geometry kept. Uses --cases, --noise, --bias, --seed.",
        ),
    ] = None,
    deform: Annotated[
        float, typer.Option("--deform", min=0.0, help="--from-labels: affine/elastic deformation strength.")
    ] = 1.0,
    blur: Annotated[
        float, typer.Option("--blur", min=0.0, help="--from-labels: largest Gaussian blur (voxels).")
    ] = 1.0,
    contrast_per_case: Annotated[
        bool,
        typer.Option(
            "--contrast-per-case",
            help="--from-labels: a new intensity mixture for every case (default: one for the set).",
        ),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print a JSON list of the cases to stdout.")
    ] = False,
) -> None:
    """Generate synthetic image/mask pairs (spheres, cubes, cylinders, ellipsoids, tori).

    Writes [bold]<out>/<case>_img.nii.gz[/bold] (float32) and [bold]<out>/<case>_gt.nii.gz[/bold]
    (uint8, labels 0..K). Never replaces existing files without --overwrite.
    """
    from ncatool.console import emit_json, state
    from ncatool.data.mock import parse_shapes, parse_spacing, resolve_difficulty, write_mock_dataset

    preset = resolve_difficulty(
        difficulty.value,
        n_objects=multi,
        noise=noise,
        bias=bias,
        contrast=contrast,
        texture=texture,
        touching=touching,
    )
    if from_labels is not None:
        _from_labels(
            from_labels,
            out,
            cases,
            preset.noise,
            preset.bias,
            deform,
            blur,
            contrast_per_case,
            seed,
            overwrite,
            json_out,
        )
        return
    shape_names = parse_shapes(shapes)
    spacing_xyz = parse_spacing(spacing, dim)
    records = write_mock_dataset(
        out,
        cases,
        dim=dim,
        size_min=size_min,
        size_max=size_max,
        shapes=shape_names,
        n_objects=preset.n_objects,
        noise=preset.noise,
        bias=preset.bias,
        spacing=spacing_xyz,
        seed=seed,
        prefix=prefix,
        overwrite=overwrite,
        shape_labels=shape_labels,
        contrast=preset.contrast,
        texture=preset.texture,
        touching=preset.touching,
    )
    if not state.quiet:
        _print_summary(records, out)
    if json_out:
        emit_json(records)


def _from_labels(
    labels: Path,
    out: Path,
    cases: int,
    noise: float,
    bias: float,
    deform: float,
    blur: float,
    per_case: bool,
    seed: int,
    overwrite: bool,
    json_out: bool,
) -> None:
    """``mock-data --from-labels``: :func:`ncatool.data.synth.write_synth_dataset`."""
    from ncatool.console import emit_json, state
    from ncatool.data.synth import write_synth_dataset

    records = write_synth_dataset(
        labels,
        out,
        cases,
        seed=seed,
        deform=deform,
        bias=bias,
        blur=blur,
        noise=noise,
        per_case=per_case,
        overwrite=overwrite,
    )
    if not state.quiet:
        _print_summary(records, out)
    if json_out:
        emit_json(records)


def _print_summary(records: list[dict[str, Any]], out: Path) -> None:
    """Rich table of the written cases on stderr."""
    from rich.table import Table

    from ncatool.console import err

    table = Table(title=f"{len(records)} mock case(s) in {out}", title_justify="left")
    for column in ("case", "shape(s)", "size (x×y[×z])", "spacing (mm)", "label voxels"):
        table.add_column(column, justify="right" if column == "label voxels" else "left")
    for rec in records:
        table.add_row(
            rec["case"],
            ", ".join(rec["shapes"]),
            "×".join(str(s) for s in rec["size"]),
            ",".join(f"{s:g}" for s in rec["spacing"]),
            " ".join(f"{k}:{v}" for k, v in rec["label_voxels"].items()),
        )
    err.print(table)
