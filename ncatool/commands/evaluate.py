"""``ncatool eval``: Dice, IoU, HD95... of predictions against ground truth."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ncatool.commands.choices import adapt_steps_option, device_option


class Split(str, Enum):
    """Cases evaluated with ``--checkpoint``."""

    val = "val"
    train = "train"
    test = "test"
    all = "all"


class Amp(str, Enum):
    """Autocast at inference."""

    none = "none"
    bf16 = "bf16"


def evaluate(
    pred: Annotated[
        Path | None, typer.Option("--pred", "-p", help="Folder of predicted masks (CASE.nii.gz, ...).")
    ] = None,
    gt: Annotated[
        Path | None,
        typer.Option("--gt", "-g", help="Folder of ground-truth masks, or an nnU-Net dataset folder."),
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", "-c", help="Predict with this checkpoint, then evaluate.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            "-d",
            help="With --checkpoint: the nnU-Net dataset folder (grow/digits: replaces the run's data path).",
        ),
    ] = None,
    split: Annotated[
        Split,
        typer.Option(
            "--split",
            help="With --checkpoint: val (held-out cases stored in the checkpoint), train, test "
            "(imagesTs/labelsTs) or all (imagesTr).",
        ),
    ] = Split.val,
    labels: Annotated[
        str | None, typer.Option("--labels", "-l", help="Evaluate only these labels, e.g. 1,2.")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write summary.json and metrics.csv here (with --checkpoint also predictions/).",
        ),
    ] = None,
    ensemble: Annotated[
        int, typer.Option("--ensemble", "-n", min=1, help="With --checkpoint: stochastic runs per case.")
    ] = 1,
    native: Annotated[
        bool, typer.Option("--native", help="With --checkpoint: predict at each input's own size.")
    ] = False,
    device: Annotated[str, device_option("Where to run (auto: cuda, then mps, then cpu).")] = "auto",
    amp: Annotated[Amp, typer.Option("--amp", help="Autocast: none or bf16.")] = Amp.none,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the stochastic cell updates.")] = 0,
    context_size: Annotated[
        str | None,
        typer.Option(
            "--context-size",
            help="With an incontext --checkpoint: context sizes to score, e.g. 1,2,4,8 (default: the run's).",
        ),
    ] = None,
    adapt_steps: Annotated[int, adapt_steps_option("each context draw")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print summary.json to stdout.")] = False,
) -> None:
    """Evaluate segmentations against ground truth (two forms, see below).

    --pred DIR --gt DIR, or --checkpoint CKPT --data DATASET [--split val].

    Per case and label: Dice, IoU, accuracy, precision, recall, TP/FP/FN/TN,
    HD95 in mm, volumes. A label empty in both reference and prediction has
    Dice NaN: left out of the means, and the output says how often.
    summary.json follows nnU-Net (metric_per_case, mean, foreground_mean);
    undefined values are null there.

    grow and digits checkpoints (--checkpoint alone): the task's own validation
    (PSNR; digits: pixel accuracy and classifier recognition rate).
    """
    from ncatool.perf import tune_process

    tune_process()  # allocator settings before the heavy work (see ncatool/perf.py)
    from ncatool.console import emit_json, state
    from ncatool.evaluate import evaluate as run_evaluate
    from ncatool.evaluate import (
        parse_context_sizes,
        parse_labels,
        print_generation_summary,
        print_summary,
        summary_to_json,
    )

    summary = run_evaluate(
        pred,
        gt,
        checkpoint=checkpoint,
        data=data,
        split=split.value,
        labels=parse_labels(labels),
        output=output,
        ensemble=ensemble,
        native=native,
        device=device,
        amp=amp.value,
        seed=seed,
        context_size=parse_context_sizes(context_size),
        adapt_steps=adapt_steps,
    )
    if "metric_per_case" in summary:
        print_summary(summary, per_case=state.verbose)
    else:
        print_generation_summary(summary)
    if output is not None and not state.quiet:
        from ncatool.console import info

        info(f"wrote {output / 'summary.json'} and {output / 'metrics.csv'}")
    if json_out:
        emit_json(summary_to_json(summary))
