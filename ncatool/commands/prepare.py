"""``ncatool prepare``: raw image/label pairs → an nnU-Net v2 raw dataset."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Layout(str, Enum):
    """How image and label files are paired."""

    auto = "auto"
    mock = "mock"
    isic = "isic"
    dirs = "dirs"


def prepare(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            envvar="nnUNet_raw",
            help="The nnUNet_raw folder; the dataset folder Dataset{ID:03d}_{NAME} is created inside it.",
        ),
    ],
    dataset_id: Annotated[int, typer.Option("--dataset-id", help="nnU-Net dataset id, 1..999.")],
    name: Annotated[str, typer.Option("--name", help="Dataset name, e.g. Liver.")],
    input_dir: Annotated[
        Path | None,
        typer.Argument(
            metavar="INPUT",
            help="Folder with <case>_img.* and <case>_gt.* files (what `ncatool mock-data` writes).",
            show_default=False,
        ),
    ] = None,
    input_opt: Annotated[
        Path | None, typer.Option("--input", "-i", help="Same as INPUT.", show_default=False)
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Images folder (isic and dirs layouts).", show_default=False),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option("--labels", help="Labels folder (isic and dirs layouts).", show_default=False),
    ] = None,
    layout: Annotated[
        Layout,
        typer.Option(
            "--layout",
            help="mock: INPUT/<case>_img.* + <case>_gt.*; isic: <case>.jpg + <case>_segmentation.png "
            "(0/255 → 0/1); dirs: --images/--labels with the same stems; auto: detect.",
        ),
    ] = Layout.auto,
    label_names: Annotated[
        str | None,
        typer.Option(
            "--label-names",
            help="Comma-separated foreground label names for values 1, 2, ... (e.g. 'liver,tumour'); "
            "other values are then errors. Default: label_1, label_2, ... from the data.",
            show_default=False,
        ),
    ] = None,
    channel_names: Annotated[
        str | None,
        typer.Option(
            "--channel-names",
            help="Comma-separated channel names for dataset.json (nnU-Net: 'CT' means CT normalisation). "
            "Default: 'image', or R,G,B for colour images.",
            show_default=False,
        ),
    ] = None,
    description: Annotated[
        str | None, typer.Option("--description", help="Description for dataset.json.", show_default=False)
    ] = None,
    grayscale: Annotated[
        bool, typer.Option("--grayscale", help="Convert colour images to one luminance channel.")
    ] = False,
    link: Annotated[
        bool,
        typer.Option(
            "--link",
            help="Symlink single-channel .nii.gz inputs instead of copying them (others are converted).",
        ),
    ] = False,
    test_fraction: Annotated[
        float,
        typer.Option(
            "--test-fraction",
            help="Share of cases, in [0, 1), moved to imagesTs/labelsTs (seeded); "
            "the split goes to splits.json.",
        ),
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the test split.")] = 0,
    tile: Annotated[
        str | None,
        typer.Option(
            "--tile",
            help="Cut every case into spatially separate tiles that become cases CASE_t000, ... "
            "(their positions go to tiles.json): sizes in array order, one for all axes or one per "
            "axis (rows,cols in 2D; slices,rows,cols in 3D; 0 = whole axis), e.g. 128 or 10,0,0 for "
            "axial slabs. Each axis is cut into round(length/size) near-equal tiles; "
            "--test-fraction then splits tiles.",
            show_default=False,
        ),
    ] = None,
    skip_invalid: Annotated[
        bool,
        typer.Option("--skip-invalid", help="Prepare the valid pairs and report the invalid ones."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing dataset folder.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a machine-readable summary to stdout.")
    ] = False,
) -> None:
    """Convert raw image/label pairs into an nnU-Net v2 raw dataset.

    Every pair is checked before anything is written: partner present, file readable and 2D/3D,
    shape, spacing, origin and direction agree, no NaN/Inf, labels integer and consecutive.
    Any problem stops with all problems listed and nothing written (unless --skip-invalid).
    2D images become 2D NIfTI files.
    """
    from ncatool import console
    from ncatool.data.nnunet.pairs import parse_names
    from ncatool.data.nnunet.prepare import PrepareOptions, prepare_dataset
    from ncatool.data.nnunet.verify import console_escape
    from ncatool.data.tiles import parse_tile_spec
    from ncatool.errors import NcaError, ValidationError

    if input_dir is not None and input_opt is not None and input_dir != input_opt:
        raise NcaError("give the input folder once: as INPUT or as --input")
    options = PrepareOptions(
        out=out,
        dataset_id=dataset_id,
        name=name,
        layout=layout.value,
        folder=input_dir or input_opt,
        images=images,
        labels=labels,
        label_names=parse_names(label_names, "--label-names"),
        channel_names=parse_names(channel_names, "--channel-names"),
        description=description,
        grayscale=grayscale,
        link=link,
        test_fraction=test_fraction,
        seed=seed,
        skip_invalid=skip_invalid,
        overwrite=overwrite,
        tile=parse_tile_spec(tile),
    )
    try:
        result = prepare_dataset(options)
    except ValidationError as exc:
        if json_output:
            console.emit_json({"ok": False, "problems": exc.problems})
        raise
    if result.ignored:
        shown = ", ".join(Path(p).name for p in result.ignored[:5])
        more = f" and {len(result.ignored) - 5} more" if len(result.ignored) > 5 else ""
        console.warn(
            console_escape(
                f"ignored {len(result.ignored)} files matching no {result.layout} pattern: {shown}{more}"
            )
        )
    for warning in result.warnings:
        console.warn(console_escape(warning))
    files = result.files
    tiled = f" (tiles of {len(result.tiles)} source cases)" if result.tiles is not None else ""
    console.info(
        console_escape(
            f"wrote {result.dataset}: {len(result.train)} training + {len(result.test)} test cases{tiled}, "
            f"{result.ndim}D, channels {result.channel_names}, labels {result.labels}; "
            f"files: {files['converted']} converted, {files['copied']} copied, {files['linked']} linked; "
            f"{len(result.skipped)} skipped, {len(result.warnings)} warnings"
        )
    )
    if json_output:
        console.emit_json({"ok": True, **result.to_json()})
