"""``ncatool train``: one command, one loop, every task."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

TASK_HELP = (
    "seg2d (Med-NCA 2D), seg3d (M3D-NCA 3D), grow (Growing NCA; --data = target image, default the "
    "shipped retina), digits (class-conditional digits; --data = MNIST IDX or NPZ, default the shipped "
    "sklearn digits)."
)


def train(
    task: Annotated[str | None, typer.Option("--task", "-t", help=f"Task: {TASK_HELP}")] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="nnU-Net raw dataset folder.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML/JSON config (e.g. a run's config.json).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run folder [default: runs/<task>_<time>].")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the run in this folder from checkpoints/last.pt."),
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Training epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=1, help="Batch size.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="Learning rate.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for Python, NumPy and torch.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = None,
    amp: Annotated[str | None, typer.Option("--amp", help="Autocast: none, bf16 or fp16.")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Any config field as KEY=VALUE (repeatable), e.g. steps=32,32."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the run summary as JSON on stdout.")
    ] = False,
) -> None:
    """Train an NCA. Settings: defaults < --config file < options and --set.

    Writes config.json, metrics.jsonl, checkpoints/last.pt and best.pt, loss_curve.png and
    samples/epoch_NNN.png into the run folder.
    """
    from ncatool.perf import tune_process

    tune_process()  # allocator settings before the heavy work (see ncatool/perf.py)
    from ncatool.console import emit_json, info

    cli_values: dict[str, Any] = {
        k: v
        for k, v in {
            "data": str(data) if data is not None else None,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "device": device,
            "amp": amp,
        }.items()
        if v is not None
    }
    summary = run_training(task, config, out, resume, cli_values, overrides or [])
    if json_out:
        emit_json(summary)
    else:
        best = {k: v for k, v in summary.items() if k.startswith("best_")}
        info(f"run folder: {summary['run_dir']}  " + "  ".join(f"{k}={v:.4f}" for k, v in best.items()))


def run_training(
    task: str | None,
    config: Path | None,
    out: Path | None,
    resume: Path | None,
    cli_values: dict[str, Any],
    overrides: list[str],
) -> dict[str, Any]:
    """Resolve the config, build the task and train (or resume); return the run summary."""
    from ncatool.config import build_config, parse_overrides, read_config_file
    from ncatool.errors import NcaError
    from ncatool.tasks import config_class, make_task
    from ncatool.train import Trainer, select_device

    values: dict[str, Any] = {}
    if resume is not None:
        if not (resume / "checkpoints" / "last.pt").is_file():
            raise NcaError("no checkpoints/last.pt to resume from", resume)
        values.update(read_config_file(resume / "config.json"))
        source = str(resume / "config.json")
    elif config is not None:
        values.update(read_config_file(config))
        source = str(config)
    else:
        source = "options"
    values.update(cli_values)
    values.update(parse_overrides(overrides))
    if task is not None:
        if resume is not None and values.get("task") not in (None, task):
            raise NcaError(f"--task {task} differs from the resumed run's task {values.get('task')}", resume)
        values["task"] = task
    name = values.get("task")
    if not name:
        raise NcaError("--task is required (or a config file that names one)")
    cfg = build_config(config_class(name), values, source)
    dev = select_device(cfg.device)
    run_dir = resume or out or Path("runs") / f"{cfg.task}_{time.strftime('%Y%m%d-%H%M%S')}"
    if resume is None and (run_dir / "checkpoints").exists():
        raise NcaError("run folder already holds checkpoints; use --resume or another --out", run_dir)
    trainer = Trainer(make_task(cfg, dev), run_dir, dev)
    if resume is not None:
        trainer.resume()
    return trainer.fit()
