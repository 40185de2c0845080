"""``ncatool animate``: watch the automaton work, as a GIF, an MP4 or PNG frames."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ncatool.commands.choices import ContextSizeOption, device_option


class Overlay(str, Enum):
    """How the segmentation is drawn over the input."""

    mask = "mask"
    prob = "prob"


#: ``--context`` and ``--labels`` of in-context checkpoints, as ``predict`` takes them.
ContextOption = Annotated[
    Path | None,
    typer.Option(
        "--context",
        help="incontext: nnU-Net dataset whose image/mask pairs show what to segment (one task per "
        "label; the frames show the label map).",
        show_default=False,
    ),
]
ContextLabelsOption = Annotated[
    str | None,
    typer.Option(
        "--labels", help="incontext: which context labels, e.g. 1,2 (default: all).", show_default=False
    ),
]


def _pair(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    from ncatool.errors import NcaError

    parts = [p.strip() for p in text.split(",")]
    try:
        y, x = (float(p) for p in parts)
    except ValueError:
        raise NcaError(f"--damage-center must be Y,X in grid pixels (e.g. 36,30), got {text!r}") from None
    return y, x


def animate(
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint", "-c", help="A run's checkpoint, e.g. RUN/checkpoints/best.pt.", show_default=False
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="out.gif, or out.mp4 (needs ffmpeg).", show_default=False),
    ] = None,
    input_path: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="Segmentation and incontext: the image to segment (NIfTI, NRRD, MHA, PNG...); several channels as "
            "comma-separated files, a CASE_0000 file (its _0001... siblings come along) or a case "
            "prefix such as imagesTs/CASE.",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[
        str | None,
        typer.Option(
            "--steps",
            metavar="N[,N...]",
            help="NCA steps (default: the run's). Segmentation: per level (N for every level, or one "
            "per level). Growing with --damage: default twice the run's steps, damage half-way.",
            show_default=False,
        ),
    ] = None,
    every: Annotated[int, typer.Option("--every", min=1, help="A frame every K steps.")] = 1,
    fps: Annotated[float, typer.Option("--fps", min=0.1, help="Frames per second.")] = 10.0,
    scale: Annotated[
        int | None,
        typer.Option(
            "--scale",
            min=1,
            help="Nearest-neighbour enlargement (default: tiles of about 256 px).",
            show_default=False,
        ),
    ] = None,
    frames: Annotated[
        Path | None,
        typer.Option("--frames", help="Also write each frame as DIR/frame_NNNNN.png.", show_default=False),
    ] = None,
    axis: Annotated[
        int | None,
        typer.Option(
            "--axis",
            min=0,
            max=2,
            help="3D: show one slice (or the --montage) along this array axis (default: three "
            "orthogonal slices). seg2d on a volume: the slicing axis (default: the run's).",
            show_default=False,
        ),
    ] = None,
    slice_index: Annotated[
        int | None,
        typer.Option(
            "--slice",
            min=0,
            help="The slice shown (input voxels) (default: the middle one).",
            show_default=False,
        ),
    ] = None,
    montage: Annotated[
        bool, typer.Option("--montage", help="3D: up to 16 evenly spaced slices along --axis.")
    ] = False,
    hidden: Annotated[
        int, typer.Option("--hidden", min=0, help="Also show the first K hidden channels.")
    ] = 0,
    overlay: Annotated[
        Overlay,
        typer.Option(
            "--overlay", help="Segmentation: mask (probability > 0.5) or prob (opacity = probability)."
        ),
    ] = Overlay.mask,
    damage: Annotated[
        bool, typer.Option("--damage", help="grow/digits: erase a circle part-way and show the regrowth.")
    ] = False,
    damage_at: Annotated[
        int | None,
        typer.Option("--damage-at", min=1, help="Step after which the circle is erased.", show_default=False),
    ] = None,
    damage_center: Annotated[
        str | None,
        typer.Option(
            "--damage-center",
            metavar="Y,X",
            help="Circle centre in grid pixels (default: random).",
            show_default=False,
        ),
    ] = None,
    damage_radius: Annotated[
        float | None,
        typer.Option(
            "--damage-radius",
            min=0.0,
            help="Circle radius in grid pixels (default: random).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Seed of the cell updates and random damage.")
    ] = 0,
    device: Annotated[str, device_option("Where to run (auto: cuda, then mps, then cpu).")] = "auto",
    context: ContextOption = None,
    context_size: ContextSizeOption = None,
    labels: ContextLabelsOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a summary as JSON on stdout.")] = False,
) -> None:
    """Render a trained NCA step by step (seg2d, seg3d, incontext, grow, digits).

    Segmentation: the input with the predicted mask overlaid as it evolves, every level in turn; 3D: orthogonal slices, one --axis/--slice, or a --montage.

    incontext: the --input query with the label map of the --context dataset's labels (as predict makes it) over the last level's steps.

    grow: the image growing from the seed (with --damage: and healing). digits: all ten classes side by side.

    Frames: the initial state, every --every steps, the last step (and the damage step): 1 + ceil(steps / every) without damage.
    """
    from ncatool.perf import tune_process

    tune_process()  # allocator settings before the heavy work (see ncatool/perf.py)
    from rich.markup import escape

    from ncatool.animate import animate as run_animate
    from ncatool.console import emit_json, info
    from ncatool.evaluate import parse_labels

    result = run_animate(
        checkpoint,
        output=output,
        input_spec=input_path,
        steps=steps,
        every=every,
        fps=fps,
        scale=scale,
        frames_dir=frames,
        axis=axis,
        slice_index=slice_index,
        montage=montage,
        hidden=hidden,
        overlay=overlay.value,
        damage=damage,
        damage_at=damage_at,
        damage_center=_pair(damage_center),
        damage_radius=damage_radius,
        seed=seed,
        device=device,
        context=context,
        context_size=context_size,
        labels=parse_labels(labels),
    )
    width, height = result["size"]
    where = " and ".join(
        escape(str(p)) for p in (result["output"], result["frames_dir"] and f"{result['frames_dir']}/") if p
    )
    info(
        f"{result['task']}: {result['frames']} frames ({result['total_steps']} steps, every "
        f"{result['every']}), {width}x{height} px, written to {where}"
    )
    if "damage" in result:
        d = result["damage"]
        info(
            f"damage after step {d['step']}: circle at y,x = {d['center'][0]},{d['center'][1]}, radius {d['radius']}"
        )
    if json_out:
        emit_json(result)
