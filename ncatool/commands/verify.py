"""``ncatool verify``: check an nnU-Net v2 raw dataset folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def verify(
    dataset_dir: Annotated[
        Path,
        typer.Argument(
            metavar="DATASET_DIR",
            help="The dataset folder, e.g. nnUNet_raw/Dataset001_Liver.",
            show_default=False,
        ),
    ],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a machine-readable summary to stdout.")
    ] = False,
) -> None:
    """Check an nnU-Net v2 raw dataset as nnU-Net's verify_dataset_integrity does.

    Checks dataset.json keys and numTraining, that every case has all channel files and a label,
    consecutive labels and no unexpected label values, no NaN/Inf, matching shapes and geometry.
    imagesTs/labelsTs are checked too. Every problem is listed; exit code 2 if there is any.
    """
    from ncatool import console
    from ncatool.data.nnunet.verify import console_escape, verify_raw_dataset
    from ncatool.errors import ValidationError

    try:
        report = verify_raw_dataset(dataset_dir)
    except ValidationError as exc:
        if json_output:
            console.emit_json({"dataset": str(dataset_dir), "ok": False, "problems": exc.problems})
        raise
    for warning in report.warnings:
        console.warn(console_escape(warning))
    console.info(
        console_escape(
            f"{dataset_dir}: ok: {report.num_training} training and {report.num_test} test cases, "
            f"{report.ndim}D, channels {report.channel_names}, labels {report.labels}, "
            f"{len(report.warnings)} warnings"
        )
    )
    if json_output:
        console.emit_json(report.to_json())
