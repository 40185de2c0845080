#!/usr/bin/env python3
"""The quality benchmark: NCA against baselines on the real samples shipped under ``data/``.

Every figure comes from a command this script runs (all printed, and stored with the results):

* ``nuclei`` — seg2d on the stardist nuclei field cut into 16 spatially separate 128×128 tiles
  (12 train, 4 test, ``prepare --tile 128``): the NCA (Med-NCA, two levels) against the Otsu
  threshold, the best global threshold (both chosen on the training tiles) and a small U-Net
  trained for the NCA's training wall-clock time (``baselines.py``).
* ``brain`` — seg3d grey/white matter on the MNI152 template at 2 mm cut into 8 axial slabs
  (6 train, 2 test; never split by hemisphere, the template is mirror-symmetric): the NCA against
  the two best thresholds, two multi-Otsu thresholds and the same U-Net (3D).
* ``nuclei3d`` — seg3d on stardist's 3D nuclei volume (31×61×57, synthetic) cut into 18 spatially
  separate sub-volumes of about 16×20×19 voxels (14 train, 4 test, ``prepare --tile 16,20,19``):
  the NCA (one level) against the Otsu threshold, the best global threshold and the same U-Net (3D).
* ``mock3d`` — seg3d on synthetic shapes (``mock-data --difficulty hard``: three labels a small
  intensity step apart, texture, touching objects), 4 held-out volumes; the NCA against the Otsu and
  the best global thresholds.
* ``digits`` — class-conditional digits: share of generated digits a classifier trained on the real
  digits recognises as the class asked for.
* ``grow`` — Growing NCA on the retina target with damage training: PSNR after growing, after
  twice the steps, and after damage and regrowth.

Segmentation methods are all scored by ``ncatool eval --pred DIR --gt DS/labelsTs`` (Dice per case,
mean over cases and foreground labels). Seeds are fixed; wall-clock limits make the NCA's epoch count
depend on the machine, so the U-Net gets the NCA's measured training time, not a fixed count.
The segmentation sections end with nnU-Net v2 (``2d`` for seg2d, ``3d_fullres`` for seg3d), installed
into its own venv on first use and trained for the NCA's measured time too (``nnunet.py``).

Usage::

    .venv/bin/python benchmarks/quality/run.py                 # everything (about 70 min on 2 cores)
    .venv/bin/python benchmarks/quality/run.py --only nuclei,brain
    .venv/bin/python benchmarks/quality/run.py --table         # the table from stored results only
    .venv/bin/python benchmarks/quality/run.py --skip-nnunet   # without the nnU-Net rows

Results: ``benchmarks/results/quality/<section>.json`` (git-ignored) and a Markdown table on stdout
and in ``benchmarks/results/quality/quality.md``. Run it on an otherwise idle machine: another
process on the same cores slows the NCA's training epochs (and so its result within the time limit).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nnunet import CONFIGURATIONS, nnunet_row

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NCATOOL = str(BIN / "ncatool")
BASELINES = str(ROOT / "benchmarks" / "quality" / "baselines.py")
ENV = {
    **os.environ,
    "GLIBC_TUNABLES": os.environ.get(
        "GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
    ),
}

#: Set by ``--skip-nnunet``: no nnU-Net row (its venv needs the package registry on first use).
SKIP_NNUNET = False

#: Minutes of NCA training per section (the U-Net gets the same wall-clock time).
MINUTES = {"nuclei": 6.0, "brain": 6.0, "nuclei3d": 6.0, "mock3d": 6.0, "digits": 3.0, "grow": 20.0}

NUCLEI_NCA = ["target_size=none", "iters_per_epoch=10"]
# The slabs differ wildly in how much of them is brain (7-74 %), so per-image z-score or min-max
# maps the same tissue to different values in different slabs; a fixed window does not. GM/WM on a
# T1 template is mostly two intensity bands: eight soft intensity bins as extra inputs let the NCA
# place those bands (issue 18: 0.922 without them).
BRAIN_NCA = [
    "target_size=none",
    "iters_per_epoch=8",
    "batch_size=4",
    "levels=1",
    "steps=12",
    "kernels=3",
    "patch=0",
    "normalization=ct",
    "ct_window=0,255",
    "intensity_bins=8",
]
BRAIN_NORMALIZATION = ["--normalization", "ct", "--ct-window", "0", "255"]
# The tiles are 15-16 x 20-21 x 19 voxels and the nuclei about 7 x 15 x 14 (z, y, x): one level at
# full resolution whose 16 steps of 3x3x3 perception reach across a nucleus. The tiles hold 31-54 %
# nuclei, so a per-tile z-score would shift the same intensity differently in every tile; the fixed
# window covers the volume's whole range (104..375).
NUCLEI3D_NCA = [
    "target_size=none",
    "iters_per_epoch=8",
    "batch_size=4",
    "levels=1",
    "steps=16",
    "kernels=3",
    "patch=0",
    "normalization=ct",
    "ct_window=100,400",
]
NUCLEI3D_NORMALIZATION = ["--normalization", "ct", "--ct-window", "100", "400"]
MOCK3D_NCA = ["iters_per_epoch=8"]  # seg3d defaults: resized to 64³, level 1 on 32³ patches
# Growing NCA's own recipe (per-parameter gradient normalisation, lr x 0.1 after a fixed number of
# steps) instead of the loop's defaults (global clip, ReduceLROnPlateau on a noisy score): README.
GROW = ["img_size=24", "padding=6", "train_steps=48,64", "damage=true", "iters_per_epoch=50"]
GROW += ["grad_normalize=true", "lr_schedule=step", "lr_milestones=3000"]


class Recorder:
    """Runs commands, echoes them, and keeps them for the results file."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def run(self, args: list[str], capture: bool = False) -> tuple[str, float]:
        """Run ``args`` from the repository root; return ``(stdout, seconds)``; stop on failure."""
        line = shlex.join(
            Path(a).relative_to(ROOT).as_posix() if a.startswith(str(ROOT)) else a for a in args
        )
        print(f"$ {line}", file=sys.stderr, flush=True)
        self.commands.append(line)
        start = time.perf_counter()
        done = subprocess.run(
            args, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE if capture else None, check=False
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"command failed with exit code {done.returncode}: {line}")
        return (done.stdout or ""), seconds

    def json(self, args: list[str]) -> tuple[dict[str, Any], float]:
        """Run a command that prints JSON on stdout."""
        out, seconds = self.run(args, capture=True)
        return json.loads(out), seconds


def sets(items: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` → ``["--set", "a=1", "--set", "b=2"]``."""
    return [arg for item in items for arg in ("--set", item)]


def evaluate(rec: Recorder, pred: Path, gt: Path) -> dict[str, float]:
    """Mean Dice (and per label) of a prediction folder against ``gt`` with ``ncatool eval``."""
    summary, _ = rec.json([NCATOOL, "-q", "eval", "--pred", str(pred), "--gt", str(gt), "--json"])
    result = {"dice": summary["foreground_mean"]["Dice"]}
    for label, values in summary.get("mean", {}).items():
        result[f"dice_{summary['labels'][label]}"] = values["Dice"]  # names from the dataset.json
    return result


def segmentation_section(
    rec: Recorder,
    work: Path,
    name: str,
    prepare: list[str],
    task: str,
    nca_sets: list[str],
    unet_args: list[str],
    minutes: float,
) -> dict[str, Any]:
    """Prepare the tiles, train and test the NCA, then the baselines on the same test tiles."""
    raw = work / "raw"
    rec.run([NCATOOL, "-q", "prepare", *prepare, "--out", str(raw), "--overwrite"])
    dataset = next(raw.glob("Dataset*"))
    gt = dataset / "labelsTs"
    run = work / "nca"
    train_args = [NCATOOL, "-q", "train", "--task", task, "--data", str(dataset), "--out", str(run)]
    train_args += [
        "--epochs",
        "1000",
        "--seed",
        "0",
        *sets([*nca_sets, f"time_limit={minutes}", "samples=1"]),
    ]
    summary, train_seconds = rec.json([*train_args, "--json"])
    pred = work / "pred_nca"
    rec.run([NCATOOL, "-q", "predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--input",
             str(dataset / "imagesTs"), "--output", str(pred)])  # fmt: skip
    methods: dict[str, Any] = {
        "NCA": {
            **evaluate(rec, pred, gt),
            "train_seconds": round(train_seconds, 1),
            "epochs": summary["epochs"],
            "params": summary["params"],
        }
    }
    for method in ("otsu", "best"):
        out = work / f"pred_{method}"
        rec.run([sys.executable, BASELINES, "threshold", "--data", str(dataset), "--output", str(out),
                 "--method", method])  # fmt: skip
        methods[f"threshold ({method})"] = evaluate(rec, out, gt)
    out = work / "pred_unet"
    seconds = f"{train_seconds:.0f}"
    rec.run([sys.executable, BASELINES, "unet", "--data", str(dataset), "--output", str(out),
             "--seconds", seconds, "--seed", "0", *unet_args])  # fmt: skip
    unet = json.loads((out / "unet.json").read_text())
    methods["U-Net"] = {**evaluate(rec, out, gt), "train_seconds": unet["seconds"], "params": unet["params"]}
    if not SKIP_NNUNET:  # nnU-Net v2 in its own venv, trained for the NCA's wall-clock (nnunet.py)
        conf = CONFIGURATIONS[task]
        methods[f"nnU-Net ({conf}, same wall-clock)"] = nnunet_row(
            rec.commands, work / "nnunet", dataset, conf, train_seconds, lambda p, g: evaluate(rec, p, g), ENV
        )
    return {"section": name, "dataset": dataset.name, "methods": methods}


def nuclei(rec: Recorder, work: Path) -> dict[str, Any]:
    """seg2d on the nuclei tiles."""
    prepare = ["data/nuclei", "--dataset-id", "501", "--name", "Nuclei", "--tile", "128"]
    prepare += ["--test-fraction", "0.25", "--seed", "1812", "--label-names", "nucleus"]
    return segmentation_section(rec, work, "nuclei", prepare, "seg2d", NUCLEI_NCA, [], MINUTES["nuclei"])


def brain(rec: Recorder, work: Path) -> dict[str, Any]:
    """seg3d GM/WM on the axial slabs (seed 0 puts slabs 2 and 4 in the test set)."""
    prepare = ["data/brain", "--dataset-id", "502", "--name", "BrainGMWM", "--tile", "10,0,0"]
    prepare += ["--test-fraction", "0.25", "--seed", "0", "--label-names", "gray_matter,white_matter"]
    return segmentation_section(
        rec, work, "brain", prepare, "seg3d", BRAIN_NCA, BRAIN_NORMALIZATION, MINUTES["brain"]
    )


def nuclei3d(rec: Recorder, work: Path) -> dict[str, Any]:
    """seg3d on the 3D nuclei sub-volumes (seed 0 holds out tiles 2, 3, 10 and 12)."""
    prepare = ["data/nuclei3d", "--dataset-id", "504", "--name", "Nuclei3D", "--tile", "16,20,19"]
    prepare += ["--test-fraction", "0.25", "--seed", "0", "--label-names", "nucleus"]
    return segmentation_section(
        rec, work, "nuclei3d", prepare, "seg3d", NUCLEI3D_NCA, NUCLEI3D_NORMALIZATION, MINUTES["nuclei3d"]
    )


def mock3d(rec: Recorder, work: Path) -> dict[str, Any]:
    """seg3d on 16 hard synthetic volumes, 4 held out."""
    raw = work / "mock"
    rec.run([NCATOOL, "-q", "mock-data", "--out", str(raw), "--cases", "16", "--seed", "11", "--difficulty",
             "hard"])  # fmt: skip
    rec.run([NCATOOL, "-q", "prepare", str(raw), "--out", str(work / "raw"), "--dataset-id", "503", "--name",
             "Shapes3D", "--test-fraction", "0.25", "--seed", "1812", "--overwrite"])  # fmt: skip
    dataset = work / "raw" / "Dataset503_Shapes3D"
    run = work / "nca"
    args = [NCATOOL, "-q", "train", "--task", "seg3d", "--data", str(dataset), "--out", str(run), "--epochs",
            "1000", "--seed", "0", "-b", "2"]  # fmt: skip
    args += sets([*MOCK3D_NCA, f"time_limit={MINUTES['mock3d']}", "samples=1"])
    summary, seconds = rec.json([*args, "--json"])
    pred = work / "pred_nca"
    rec.run([NCATOOL, "-q", "predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--input",
             str(dataset / "imagesTs"), "--output", str(pred)])  # fmt: skip
    result = {**evaluate(rec, pred, dataset / "labelsTs"), "train_seconds": round(seconds, 1)}
    methods: dict[str, Any] = {"NCA": {**result, "epochs": summary["epochs"], "params": summary["params"]}}
    for method in ("otsu", "best"):  # what an intensity threshold alone gets on these volumes
        out = work / f"pred_{method}"
        rec.run([sys.executable, BASELINES, "threshold", "--data", str(dataset), "--output", str(out),
                 "--method", method])  # fmt: skip
        methods[f"threshold ({method})"] = evaluate(rec, out, dataset / "labelsTs")
    return {"section": "mock3d", "methods": methods}


def generation(rec: Recorder, work: Path, task: str, extra: list[str]) -> dict[str, Any]:
    """Train a grow/digits model for the section's minutes and evaluate its best checkpoint."""
    run = work / "run"
    args = [NCATOOL, "-q", "train", "--task", task, "--out", str(run), "--epochs", "1000", "--seed", "0"]
    args += sets([*extra, f"time_limit={MINUTES[task]}", "samples=1"])
    summary, seconds = rec.json([*args, "--json"])
    ckpt = run / "checkpoints" / "best.pt"
    metrics, _ = rec.json([NCATOOL, "-q", "eval", "--checkpoint", str(ckpt), "--json"])
    values = metrics.get("metrics", metrics)
    methods = {"NCA": {**values, "train_seconds": round(seconds, 1), "epochs": summary["epochs"]}}
    methods.update(metrics.get("baselines", {}))  # grow: the flat disc and the empty grid, same grid
    return {"section": task, "methods": methods}


def digits(rec: Recorder, work: Path) -> dict[str, Any]:
    """Class-conditional digits: recognition of generated digits."""
    return generation(rec, work, "digits", ["iters_per_epoch=50"])


def grow(rec: Recorder, work: Path) -> dict[str, Any]:
    """Growing NCA on the retina, with damage training."""
    return generation(rec, work, "grow", GROW)


SECTIONS: dict[str, Callable[[Recorder, Path], dict[str, Any]]] = {
    "nuclei": nuclei,
    "brain": brain,
    "nuclei3d": nuclei3d,
    "mock3d": mock3d,
    "digits": digits,
    "grow": grow,
}


#: The grow figures ``ncatool eval`` reports (on seeds validation never saw), in table order.
GROW_COLUMNS = ("psnr", "psnr_alpha", "ssim", "psnr_long", "psnr_regrow")


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "–" if value is None else str(value)


def table(results: dict[str, dict[str, Any]]) -> str:
    """The Markdown tables of whatever sections have results."""
    lines = ["| data | method | Dice (mean) | per label | params | train s |", "|---|---|---|---|---|---|"]
    for name in ("nuclei", "brain", "nuclei3d", "mock3d"):
        if name not in results:
            continue
        for method, m in results[name]["methods"].items():
            labels = ", ".join(f"{k[5:]} {_fmt(v)}" for k, v in m.items() if k.startswith("dice_"))
            lines.append(
                f"| {name} | {method} | {_fmt(m['dice'])} | {labels} | {_fmt(m.get('params'))} | "
                f"{_fmt(m.get('train_seconds'), 0)} |"
            )
    gen = []
    if "digits" in results:
        m = results["digits"]["methods"]["NCA"]
        gen.append(
            f"| digits | recognised {_fmt(100 * m['recognised'], 1)} % (pixel accuracy "
            f"{_fmt(m.get('pixel_acc'))}) | {_fmt(m['train_seconds'], 0)} |"
        )
    if gen:
        lines += ["", "| task | result | train s |", "|---|---|---|", *gen]
    if "grow" in results:
        lines += ["", "| grow (retina) | PSNR | inside alpha | SSIM | 2× steps | after damage | train s |"]
        lines.append("|---|---|---|---|---|---|---|")
        for method, m in results["grow"]["methods"].items():
            cells = [_fmt(m.get(k), 2 if k == "ssim" else 1) for k in GROW_COLUMNS]
            lines.append(f"| {method} | {' | '.join(cells)} | {_fmt(m.get('train_seconds'), 0)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality")
    parser.add_argument("--table", action="store_true", help="print the table of stored results only")
    parser.add_argument("--skip-nnunet", action="store_true", help="no nnU-Net row (nnunet.py)")
    args = parser.parse_args()
    global SKIP_NNUNET
    SKIP_NNUNET = args.skip_nnunet
    args.out.mkdir(parents=True, exist_ok=True)
    names = [] if args.table else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    for name in names:
        rec = Recorder()
        work = args.out / name
        shutil.rmtree(work, ignore_errors=True)  # every section starts from scratch
        start = time.perf_counter()
        result = SECTIONS[name](rec, work)
        result.update(commands=rec.commands, seconds=round(time.perf_counter() - start, 1))
        result["threads"] = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    results = {p.stem: json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))}
    text = table(results)
    (args.out / "quality.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
