"""``ncatool train``: one command, one loop, every task."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ncatool.commands.choices import TaskName, TrainAmp, device_option

TASK_HELP = (
    "seg2d (Med-NCA 2D), seg3d (M3D-NCA 3D), grow (Growing NCA; --data = target image, default the "
    "shipped retina), digits (class-conditional digits; --data = MNIST IDX or NPZ, default the shipped "
    "sklearn digits), incontext (in-context segmentation from k examples; --data repeatable)."
)


def train(
    task: Annotated[
        TaskName | None, typer.Option("--task", "-t", help=f"Task: {TASK_HELP}", show_default=False)
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option("--data", "-d", help="nnU-Net raw dataset folder (repeat it for incontext: several)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML, JSON or YAML config: a run's config.json, the output of ncatool config TASK, "
            "or seed 001's train_config.yaml (--task grow).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run folder (default: runs/<task>_<time>).")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the run in this folder from checkpoints/last.pt."),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option("--init", help="Start from this checkpoint's weights (a new optimizer and run)."),
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Training epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=1, help="Batch size.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="Learning rate.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for Python, NumPy and torch.")] = None,
    device: Annotated[str | None, device_option("Where to train (auto: cuda, then mps, then cpu).")] = None,
    amp: Annotated[TrainAmp | None, typer.Option("--amp", help="Autocast (default: none).")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Any config field as KEY=VALUE (repeatable), e.g. steps=32,32; ncatool config TASK lists them.",
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the run summary as JSON on stdout.")
    ] = False,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Train with N processes on this machine (torch.distributed.run; batch_size stays the "
            "global batch). Under torchrun, leave it out.",
        ),
    ] = 1,
) -> None:
    """Train an NCA. Settings: defaults < --config file < options and --set.

    Writes config.json, metrics.jsonl, checkpoints/last.pt and best.pt, loss_curve.png and
    samples/epoch_NNN.png into the run folder. Under torchrun (or with --nproc N) the ranks share
    every batch and only rank 0 writes.
    """
    if nproc > 1:
        launch_local(nproc)
        return
    from ncatool.perf import tune_process

    tune_process()  # allocator settings before the heavy work (see ncatool/perf.py)
    from ncatool.console import emit_json, info

    cli_values: dict[str, Any] = {
        k: v
        for k, v in {
            "data": ([str(d) for d in data] if len(data) > 1 else str(data[0])) if data else None,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "device": device,
            "amp": amp.value if amp is not None else None,
        }.items()
        if v is not None
    }
    from ncatool.distributed import teardown

    try:
        name = task.value if task is not None else None
        summary = run_training(name, config, out, resume, cli_values, overrides or [], init)
    finally:
        teardown()
    if json_out and summary:
        emit_json(summary)
    elif summary:
        best = {k: v for k, v in summary.items() if k.startswith("best_")}
        info(f"run folder: {summary['run_dir']}  " + "  ".join(f"{k}={v:.4f}" for k, v in best.items()))


def launch_local(nproc: int) -> None:
    """Run this same ``ncatool train`` command as ``nproc`` ranks on this machine through torch's own
    launcher (``python -m torch.distributed.run --standalone``); exit with its status.

    Raises:
        typer.Exit: Always, with the launcher's exit code.
    """
    import subprocess
    import sys

    from ncatool.distributed import launched_by_torchrun
    from ncatool.errors import NcaError

    if launched_by_torchrun():
        raise NcaError("--nproc starts its own ranks; under torchrun use --nproc_per_node instead")
    args = sys.argv[1:]
    cleaned: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        cleaned.append(arg)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    code = subprocess.call([*launcher, "-m", "ncatool", *cleaned])
    raise typer.Exit(code)


def run_training(
    task: str | None,
    config: Path | None,
    out: Path | None,
    resume: Path | None,
    cli_values: dict[str, Any],
    overrides: list[str],
    init: Path | None = None,
) -> dict[str, Any]:
    """Resolve the config, build the task and train (or resume); return the run summary.

    ``init``: a checkpoint whose weights the model starts from (weights only: a new optimizer, counters
    and run folder; e.g. stage 2 of ``incontext`` from stage 1).
    """
    from ncatool.config import build_config, parse_overrides, read_config_file
    from ncatool.console import state
    from ncatool.distributed import rank_device, setup
    from ncatool.errors import NcaError
    from ncatool.runtime import select_device
    from ncatool.tasks import config_class, make_task
    from ncatool.train import Trainer, lock_run_folder

    values: dict[str, Any] = {}
    if init is not None and (resume is not None or not init.is_file()):
        raise NcaError(
            "--init and --resume exclude each other" if resume else "checkpoint does not exist", init
        )
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
    world = setup(cfg.device)
    if not world.is_main:
        state.quiet = True  # only rank 0 prints progress; errors still reach stderr
    dev = select_device(rank_device(cfg.device, world))
    default = Path("runs") / f"{cfg.task}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = resume or out or Path(world.broadcast(str(default)))
    with lock_run_folder(run_dir, world.is_main):
        if resume is None and (run_dir / "checkpoints").exists():
            raise NcaError("run folder already holds checkpoints; use --resume or another --out", run_dir)
        trainer = Trainer(make_task(cfg, dev), run_dir, dev)
        if resume is not None:
            trainer.resume()
        elif init is not None:
            trainer.init_weights(init)
        summary = trainer.fit()
    return summary if world.is_main else {}
