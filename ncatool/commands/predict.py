"""``ncatool predict``: segment new images with a trained NCA, keeping their geometry."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ncatool.commands.choices import ContextSizeOption, adapt_steps_option, device_option


class Amp(str, Enum):
    """Autocast at inference."""

    none = "none"
    bf16 = "bf16"


class MaskFormat(str, Enum):
    """The kind of mask files."""

    auto = "auto"
    nifti = "nifti"
    png = "png"


def predict(
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint", "-c", help="A run's checkpoint, e.g. RUN/checkpoints/best.pt.", show_default=False
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Folder for the masks (grow/digits: PNG samples).", show_default=False
        ),
    ],
    input_path: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            help="An image file, a folder of images (CASE_0000, CASE_0001... grouped per case), or an "
            "nnU-Net dataset folder (imagesTs, else imagesTr). Not for grow/digits checkpoints.",
            show_default=False,
        ),
    ] = None,
    ensemble: Annotated[
        int,
        typer.Option(
            "--ensemble",
            "-n",
            min=1,
            help="Stochastic runs averaged per case; N > 1 also writes CASE_std.nii.gz and a quality score.",
        ),
    ] = 1,
    native: Annotated[
        bool,
        typer.Option(
            "--native", help="Run at each input's own size instead of resizing to the training target_size."
        ),
    ] = False,
    device: Annotated[str, device_option("Where to run (auto: cuda, then mps, then cpu).")] = "auto",
    amp: Annotated[Amp, typer.Option("--amp", help="Autocast: none or bf16.")] = Amp.none,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the stochastic cell updates.")] = 0,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="grow/digits: samples to grow (per digit for digits).")
    ] = 4,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="digits: which digits, e.g. 0,3,7; incontext: which context labels (default: all).",
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="grow/digits: NCA steps (default: as validated).")
    ] = None,
    mask_format: Annotated[
        MaskFormat,
        typer.Option(
            "--format",
            help="Masks: auto = the input's kind (PNG/JPG/BMP/TIFF images give PNG masks of their size, "
            "ISIC-trained binary models CASE_segmentation.png with 0/255; volumes give CASE.nii.gz), "
            "or always nifti / png.",
        ),
    ] = MaskFormat.auto,
    context: Annotated[
        Path | None,
        typer.Option(
            "--context",
            help="incontext: nnU-Net dataset whose image/mask pairs show what to segment (one label map "
            "output, one task per label).",
        ),
    ] = None,
    context_size: ContextSizeOption = None,
    adapt_steps: Annotated[int, adapt_steps_option("each label's context")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
) -> None:
    """Segment images with a trained NCA (seg2d, seg3d), or grow samples (grow, digits).

    Preprocessing repeats training: normalisation, slicing, resize to the
    training target_size. Probabilities are resized back to each input's size
    and thresholded; masks keep the input's spacing, origin and direction.
    PNG/JPG/BMP/TIFF inputs give PNG masks of their size (--format).

    With --ensemble N > 1 the quality score (sum of std / sum of mean
    probability) flags likely failures without ground truth: higher is worse.

    grow and digits checkpoints need no --input: they write --samples PNGs
    (digits: per digit in --labels).
    """
    from ncatool.perf import tune_process

    tune_process()  # allocator settings before the heavy work (see ncatool/perf.py)
    from ncatool.console import debug, emit_json
    from ncatool.predict import predict as run_predict

    def progress(row: dict[str, Any]) -> None:
        debug(f"{row['case']}: {row['mask']} ({row['seconds']:.2f} s)")

    from ncatool.errors import NcaError

    digits = None
    if labels is not None:
        try:
            digits = [int(v) for v in labels.replace(" ", "").split(",") if v]
        except ValueError as err:
            raise NcaError(f"--labels must be integers such as 0,3,7; got {labels!r}") from err
    result = run_predict(
        checkpoint,
        input_path,
        output,
        ensemble=ensemble,
        native=native,
        device=device,
        amp=amp.value,
        seed=seed,
        on_case=progress,
        samples=samples,
        labels=digits,
        steps=steps,
        format=mask_format.value,
        context=context,
        context_size=context_size,
        adapt_steps=adapt_steps,
    )
    if "cases" in result:
        _print_table(result)
    else:
        from ncatool.console import info

        info(
            f"{result['task']}: {len(result['files'])} PNG(s) after {result['steps']} steps in {result['output']}"
        )
    if json_out:
        emit_json(result)


def _print_table(result: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from ncatool.console import err, state

    if state.quiet:
        return
    show_quality = result["ensemble"] > 1
    size = (
        "native size"
        if result["native"] or result["target_size"] is None
        else f"size {result['target_size']}"
    )
    table = Table(
        title=f"{result['task']} on {len(result['cases'])} case(s), {size}, ensemble {result['ensemble']}",
        title_justify="left",
    )
    for col in ("case", "shape", "foreground voxels", *(["quality"] if show_quality else []), "seconds"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for row in result["cases"]:
        quality = [f"{row['quality']:.4f}"] if show_quality else []
        shape = "x".join(str(s) for s in row["shape"])
        table.add_row(
            escape(row["case"]), shape, str(row["foreground_voxels"]), *quality, f"{row['seconds']:.2f}"
        )
    err.print(table)
    err.print(f"masks written to {escape(result['output'])}")
