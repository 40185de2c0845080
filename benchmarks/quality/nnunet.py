#!/usr/bin/env python3
"""nnU-Net v2 as a row of the quality benchmark, trained for the NCA's wall-clock time on the CPU.

nnU-Net is never a dependency of ncatool: on first use this script makes its own virtual environment
(``benchmarks/results/nnunet-venv``, git-ignored) with the CPU torch of ``constraints.txt`` and a
pinned ``nnunetv2``, and runs nnU-Net's own commands in it on a dataset that ``ncatool prepare``
wrote in nnU-Net v2 raw format:

1. ``nnUNetv2_plan_and_preprocess -d NNN -c 2d|3d_fullres --verify_dataset_integrity``;
2. ``nnUNetv2_train NNN CONF all -tr nnUNetTrainer_NCAToolBudget -device cpu``: fold ``all`` (every
   training case), with a trainer written by this script (``TRAINER_TEMPLATE``) into the venv's
   ``nnunetv2.training.nnUNetTrainer`` package, where nnU-Net looks trainers up by name (its
   ``nnUNet_extTrainer`` path is searched only after that package, whose ``primus`` trainers import
   timm → torchvision, and PyPI's torchvision is built for CUDA torch: the import fails on the CPU
   torch). It is nnU-Net's default trainer except that it stops at a wall-clock
   deadline — the NCA's measured training seconds after the command starts — and runs the poly
   learning-rate schedule over that time instead of over 1000 epochs;
3. ``nnUNetv2_predict -f all`` on ``imagesTs``; the caller scores the folder with ``ncatool eval``.

Standalone, on a prepared dataset (prints the row as JSON)::

    .venv/bin/python benchmarks/quality/nnunet.py --data DIR/Dataset501_Nuclei --configuration 2d \\
        --seconds 364 --work benchmarks/results/nnunet-work/nuclei
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / "benchmarks" / "results" / "nnunet-venv"
NNUNET_VERSION = "2.8.1"
TORCH = "torch==2.13.0"  # the CPU wheel of constraints.txt; unpinned, pip pulls GBs of CUDA wheels
TRAINER = "nnUNetTrainer_NCAToolBudget"
#: Processes for nnU-Net's data augmentation, preprocessing and export: the benchmark machine's cores.
PROCESSES = 2
#: ``ncatool prepare``'s task → nnU-Net configuration.
CONFIGURATIONS = {"seg2d": "2d", "seg3d": "3d_fullres"}


def budget_lr(initial_lr: float, elapsed: float, budget: float, exponent: float = 0.9) -> float:
    """nnU-Net's poly learning rate, ``lr0 · (1 − t/T)^0.9``, in seconds instead of epochs.

    ``elapsed`` and ``budget`` are seconds since the first training step; past the budget (or with
    none) the rate is 0.
    """
    if budget <= 0:
        return 0.0
    fraction = min(max(elapsed / budget, 0.0), 1.0)
    return initial_lr * (1.0 - fraction) ** exponent


def stop_now(now: float, deadline: float, step_seconds: float) -> bool:
    """Whether to stop before the next training step.

    Stop when that step would end more than half a step past ``deadline`` (all Unix seconds;
    ``step_seconds`` is the last step's duration, 0 before the first): the run then ends as close to
    the deadline as whole steps allow, on either side.
    """
    return now + 0.5 * step_seconds >= deadline


TRAINER_TEMPLATE = '''\
"""Written by ncatool's benchmarks/quality/nnunet.py; nnU-Net's default trainer, stopped at a deadline."""

import json
import os
import time
from os.path import join

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


{helpers}


class {name}(nnUNetTrainer):
    """nnUNetTrainer that trains until the Unix time in $NCATOOL_NNUNET_DEADLINE.

    Epochs keep nnU-Net's 250 iterations (the last one is cut at the deadline); the learning rate is
    nnU-Net's poly schedule over the seconds between the first step and the deadline. No validation
    epochs or final validation: fold 'all' would validate on its own training cases.
    """

    def run_training(self):
        deadline = float(os.environ["NCATOOL_NNUNET_DEADLINE"])
        self.on_train_start()
        start = time.time()
        step_seconds, iterations = 0.0, 0
        while not stop_now(time.time(), deadline, step_seconds):
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            for _ in range(self.num_iterations_per_epoch):
                now = time.time()
                if stop_now(now, deadline, step_seconds):
                    break
                for group in self.optimizer.param_groups:
                    group["lr"] = budget_lr(self.initial_lr, now - start, deadline - start)
                outputs.append(self.train_step(next(self.dataloader_train)))
                step_seconds = time.time() - now
                iterations += 1
            if outputs:
                self.on_train_epoch_end(outputs)
            self.logger.log("epoch_end_timestamps", time.time(), self.current_epoch)
            self.print_to_log_file(f"epoch {{self.current_epoch}}: {{len(outputs)}} iterations")
            self.current_epoch += 1
        loop_seconds = time.time() - start
        self.on_train_end()
        budget = {{
            "iterations": iterations,
            "iterations_per_epoch": self.num_iterations_per_epoch,
            "loop_seconds": loop_seconds,
            "setup_seconds": start - float(os.environ["NCATOOL_NNUNET_START"]),
            "batch_size": self.batch_size,
            "patch_size": [int(s) for s in self.configuration_manager.patch_size],
        }}
        with open(join(self.output_folder, "ncatool_budget.json"), "w") as f:
            json.dump(budget, f, indent=2)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("validation skipped (ncatool benchmark: test cases are scored apart)")
'''


def trainer_source() -> str:
    """The trainer module, with this file's ``budget_lr`` and ``stop_now`` copied in verbatim."""
    helpers = "\n\n".join(inspect.getsource(f) for f in (budget_lr, stop_now))
    return TRAINER_TEMPLATE.format(helpers=helpers.strip(), name=TRAINER)


def dataset_id(dataset: Path) -> int:
    """``.../Dataset501_Nuclei`` → 501."""
    match = re.fullmatch(r"Dataset(\d{3})_\w+", dataset.name)
    if match is None:
        raise SystemExit(f"{dataset}: not an nnU-Net raw dataset folder (DatasetNNN_Name)")
    return int(match.group(1))


def _display(arg: str) -> str:
    return Path(arg).relative_to(ROOT).as_posix() if arg.startswith(str(ROOT)) else arg


def _run(commands: list[str], args: list[str], env: Mapping[str, str], shown_env: Mapping[str, str]) -> float:
    """Run ``args`` from the repository root, record it (with ``shown_env``) and return its seconds."""
    prefix = [f"{k}={_display(v)}" for k, v in shown_env.items()]
    line = shlex.join([*prefix, *(_display(a) for a in args)])
    print(f"$ {line}", file=sys.stderr, flush=True)
    commands.append(line)
    start = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, env=dict(env), check=False)
    if done.returncode != 0:
        raise SystemExit(f"command failed with exit code {done.returncode}: {line}")
    return time.perf_counter() - start


def ensure_venv(commands: list[str], venv: Path = VENV) -> Path:
    """The ``bin`` folder of nnU-Net's own environment, installed on first use (needs the registry)."""
    marker = venv / f".ncatool-nnunetv2-{NNUNET_VERSION}"
    if marker.is_file():
        return venv / "bin"
    shutil.rmtree(venv, ignore_errors=True)  # a half-made or older environment
    constraints = str(ROOT / "constraints.txt")
    py = str(venv / "bin" / "python")
    try:
        _run(commands, [sys.executable, "-m", "venv", str(venv)], os.environ, {})
        for package in (TORCH, f"nnunetv2=={NNUNET_VERSION}"):
            _run(commands, [py, "-m", "pip", "install", "-q", "-c", constraints, package], os.environ, {})
    except SystemExit as err:
        raise SystemExit(
            f"{err}\ninstalling nnU-Net needs the package registry; pass --skip-nnunet"
        ) from None
    marker.write_text(f"{TORCH}\nnnunetv2=={NNUNET_VERSION}\n")
    return venv / "bin"


def install_trainer(venv: Path) -> Path:
    """Write the trainer module next to nnU-Net's own trainer in ``venv`` (top level, so it is found
    before the subpackages are imported); return its path."""
    found = sorted(venv.glob("lib/python*/site-packages/nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py"))
    if not found:
        raise SystemExit(f"{venv}: no nnunetv2 installed (delete the folder to reinstall)")
    path = found[0].with_name(f"{TRAINER}.py")
    path.write_text(trainer_source())
    return path


def count_params(python: Path, checkpoint: Path) -> int:
    """Number of weights in an nnU-Net checkpoint's network (its ``network_weights`` state dict)."""
    code = (
        "import sys, torch; w = torch.load(sys.argv[1], map_location='cpu', weights_only=False)"
        "['network_weights']; print(sum(v.numel() for v in w.values() if v.is_floating_point()))"
    )
    out = subprocess.run(
        [str(python), "-c", code, str(checkpoint)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def nnunet_row(
    commands: list[str],
    work: Path,
    dataset: Path,
    configuration: str,
    seconds: float,
    evaluate: Callable[[Path, Path], dict[str, float]],
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Plan, preprocess, train for ``seconds`` of wall-clock and predict ``imagesTs`` with nnU-Net.

    ``commands`` collects every command line run; ``evaluate(pred, gt)`` scores the prediction folder
    (the benchmark's ``ncatool eval``); ``env`` is the environment the other methods ran in.
    Everything nnU-Net writes goes under ``work`` (emptied first). Returns the row: Dice, ``params``,
    ``train_seconds`` (the whole ``nnUNetv2_train`` command, as the NCA's is its whole command),
    ``budget_seconds``, ``epochs`` (of 250 iterations; the last may be partial) and the rest.
    """
    if configuration not in CONFIGURATIONS.values():
        raise SystemExit(f"configuration {configuration!r}: choose from {sorted(CONFIGURATIONS.values())}")
    ident = dataset_id(dataset)
    bin_dir = ensure_venv(commands)
    shutil.rmtree(work, ignore_errors=True)
    paths = {
        "nnUNet_raw": dataset.parent,
        "nnUNet_preprocessed": work / "preprocessed",
        "nnUNet_results": work / "results",
    }
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    install_trainer(bin_dir.parent)
    shown = {k: str(v) for k, v in paths.items()}
    shown.update(nnUNet_n_proc_DA=str(PROCESSES), nnUNet_def_n_proc=str(PROCESSES), nnUNet_compile="false")
    full = {
        **(env if env is not None else os.environ),
        **shown,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    d = str(ident)

    preprocess = _run(commands, [str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", d, "-c", configuration,
                                 "--verify_dataset_integrity", "-np", str(PROCESSES), "-npfp", str(PROCESSES)],
                      full, shown)  # fmt: skip
    start = time.time()
    timing = {"NCATOOL_NNUNET_START": f"{start:.3f}", "NCATOOL_NNUNET_DEADLINE": f"{start + seconds:.3f}"}
    train_args = [str(bin_dir / "nnUNetv2_train"), d, configuration, "all", "-tr", TRAINER, "-device", "cpu"]
    train = _run(
        commands, train_args, {**full, **timing}, {**shown, "NCATOOL_NNUNET_SECONDS": f"{seconds:.0f}"}
    )
    model = (
        next((work / "results").glob(f"Dataset{ident:03d}_*")) / f"{TRAINER}__nnUNetPlans__{configuration}"
    )
    checkpoint = model / "fold_all" / "checkpoint_final.pth"
    budget = json.loads((model / "fold_all" / "ncatool_budget.json").read_text())
    pred = work / "pred"
    predict = _run(commands, [str(bin_dir / "nnUNetv2_predict"), "-i", str(dataset / "imagesTs"), "-o", str(pred),
                              "-d", d, "-c", configuration, "-f", "all", "-tr", TRAINER, "-chk", checkpoint.name,
                              "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"],
                        full, shown)  # fmt: skip
    iterations = budget["iterations"]
    return {
        **evaluate(pred, dataset / "labelsTs"),
        "train_seconds": round(train, 1),
        "budget_seconds": round(seconds, 1),
        "epochs": round(iterations / budget["iterations_per_epoch"], 2),
        "iterations": iterations,
        "params": count_params(bin_dir / "python", checkpoint),
        "loop_seconds": round(budget["loop_seconds"], 1),
        "setup_seconds": round(budget["setup_seconds"], 1),
        "batch_size": budget["batch_size"],
        "patch_size": budget["patch_size"],
        "preprocess_seconds": round(preprocess, 1),
        "predict_seconds": round(predict, 1),
        "nnunetv2": NNUNET_VERSION,
        "configuration": configuration,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="nnU-Net raw dataset (DatasetNNN_Name)")
    parser.add_argument("--configuration", choices=sorted(CONFIGURATIONS.values()), required=True)
    parser.add_argument("--seconds", type=float, required=True, help="wall-clock budget of nnUNetv2_train")
    parser.add_argument(
        "--work", type=Path, required=True, help="folder for everything nnU-Net writes (emptied first)"
    )
    args = parser.parse_args()
    if not (args.data / "dataset.json").is_file():
        raise SystemExit(f"{args.data}: no dataset.json (run `ncatool prepare` first)")
    if not math.isfinite(args.seconds) or args.seconds <= 0:
        raise SystemExit(f"--seconds must be positive, got {args.seconds}")
    from run import ENV, Recorder, evaluate  # the benchmark's environment and scoring, same folder

    rec = Recorder()
    row = nnunet_row(rec.commands, args.work.resolve(), args.data.resolve(), args.configuration, args.seconds,
                     lambda pred, gt: evaluate(rec, pred, gt), ENV)  # fmt: skip
    print(json.dumps({**row, "commands": rec.commands}, indent=2))


if __name__ == "__main__":
    main()
