#!/usr/bin/env python3
"""The in-context benchmark: segment structures never trained on from k examples, against baselines.

Data (2D, made here, seeded): label maps of ``mock-data --shape-labels`` (40×40, three objects per
case, one label per shape class: disk 1, square 2, rectangle 3, ellipse 4, ring 5, at random
places) turned into images by the label-map synthesiser (``mock-data --from-labels``: per-label
intensities from a random mixture, one per dataset, bias field, blur, noise, affine and elastic
deformation). Three training datasets (24 cases each, each its own contrast) and one test dataset
(80 cases, a contrast never seen): per task, the queries are the first 20 of its first 40 cases that
hold the structure; contexts are drawn from the other 40 (the pool), which the upper bound trains on.

Held-out tasks: ``ellipse`` and ``ring`` (``holdout_labels``: never a training target; they appear
in training images only as background). For each task and k in 1, 2, 4, 8, ``DRAWS`` seeded context
draws from the pool (cases holding the structure), each scored on every query: Dice at the query's
size, mean over queries and draws. Every method sees the same draws:

* ``incontext`` — ``ncatool train --task incontext`` stage 1, then stage 2 with ``--init`` (a fixed
  number of steps each); the NCA's output, and its naive Bayes prior alone (an ablation: the NCA's
  share);
* (i) ``seg-k`` — a per-task ``seg2d`` NCA of the same size trained only on the k context pairs for
  ``--seg-steps`` steps (the first ``--seg-draws`` draws: one training per draw);
* (ii) ``nearest`` — the mask of the context image with the highest normalised cross-correlation;
* (iii) ``mean-mask`` — the mean context mask thresholded at 0.5;
* (iv) ``seg-all`` — a per-task ``seg2d`` NCA trained on all 40 pool cases for ``--upper-steps``.

Budgets are steps, not seconds, so that a busy machine changes the times, not the results (the
measured times are reported).

Also measured: parameters, training time per stage, inference time per query against k, and the
activation memory a training step keeps for backward at k = 2 and k = 16 (chunked and not).

Usage::

    .venv/bin/python benchmarks/incontext/run.py            # 12 min on 2 cores (others' jobs running)
    .venv/bin/python benchmarks/incontext/run.py --quick    # a minute: checks the script runs

Results: ``benchmarks/results/incontext/results.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ncatool.data.io import Image, write_image  # noqa: E402
from ncatool.data.mock import SHAPES, SHAPES_2D, case_rng, generate_case  # noqa: E402
from ncatool.data.nnunet.dataset_json import build_dataset_json, write_json  # noqa: E402
from ncatool.data.synth import Mixture, synthesize  # noqa: E402
from ncatool.models.incontext import saved_bytes  # noqa: E402

LABELS = [SHAPES_2D[s] for s in SHAPES]  # disk, square, rectangle, ellipse, ring = 1..5
HELD_OUT = ("ellipse", "ring")
KS = (1, 2, 4, 8)
DRAWS = 5
QUERIES = 20
SIZE = 40
OBJECTS = 3
IC_SETTINGS = [
    "target_size=40,40",
    "steps=12,12",
    "iters_per_epoch=20",
    "val_episodes=24",
    "samples=2",
    "holdout_labels=" + ",".join(HELD_OUT),
]
SEG_SETTINGS = dict(
    target_size=(40, 40),
    steps=(12, 12),
    scale=2,
    kernels=(3, 3),
    patch=(0, 0),
    hidden=64,
    channels=16,
    iters_per_epoch=5,
    samples=0,
    val_every=1000000,
    device="cpu",
)


# ---------------------------------------------------------------------------------------------- data
def write_dataset(root: Path, ident: int, name: str, cases: int, seed: int) -> Path:
    """A synthetic multi-task dataset in nnU-Net's raw layout (see the module docstring)."""
    ds = root / f"Dataset{ident:03d}_{name}"
    mixture = Mixture.draw(np.random.default_rng((seed, 7_777)), range(len(LABELS) + 1))
    for i in range(cases):
        _, labels, _ = generate_case(
            case_rng(seed, i),
            dim=2,
            size_min=SIZE,
            size_max=SIZE,
            n_objects=OBJECTS,
            noise=0,
            bias=0,
            shape_labels=True,
        )
        image, warped = synthesize(
            labels, case_rng(seed + 1000, i), mixture, deform=0.5, blur=0.8, noise=0.08
        )
        write_image(Image.from_array(image), ds / "imagesTr" / f"{name}_{i:03d}_0000.nii.gz")
        write_image(Image.from_array(warped.astype(np.uint8)), ds / "labelsTr" / f"{name}_{i:03d}.nii.gz")
    write_json(build_dataset_json(["synth"], LABELS, cases, name=name), ds / "dataset.json")
    return ds


def binary_dataset(root: Path, images: list[np.ndarray], masks: list[np.ndarray]) -> Path:
    """A one-label nnU-Net dataset of (image, mask) pairs (what a per-task seg2d baseline trains on)."""
    if root.exists():
        shutil.rmtree(root)
    for i, (img, mask) in enumerate(zip(images, masks, strict=True)):
        write_image(Image.from_array(img.astype(np.float32)), root / "imagesTr" / f"c{i:03d}_0000.nii.gz")
        write_image(Image.from_array(mask.astype(np.uint8)), root / "labelsTr" / f"c{i:03d}.nii.gz")
    write_json(build_dataset_json(["synth"], ["task"], len(images)), root / "dataset.json")
    return root


# ---------------------------------------------------------------------------------------------- methods
def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice (NaN when both are empty)."""
    from ncatool.metrics import dice as _dice

    return _dice(pred.astype(bool), ref.astype(bool))


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two images."""
    za = (a - a.mean()) / (a.std() + 1e-8)
    zb = (b - b.mean()) / (b.std() + 1e-8)
    return float((za * zb).mean())


def train_seg(data: Path, out: Path, steps: int, seed: int) -> tuple[Any, float]:
    """A per-task seg2d NCA trained for ``steps`` steps; its runner and the time taken."""
    import ncatool
    from ncatool.runtime import load

    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    ncatool.train(
        "seg2d",
        data=str(data),
        out=str(out),
        seed=seed,
        epochs=max(1, steps // int(SEG_SETTINGS["iters_per_epoch"])),  # type: ignore[call-overload]
        val_fraction=0.0,
        **SEG_SETTINGS,
    )
    return load(out / "checkpoints" / "last.pt", device="cpu"), time.perf_counter() - t0


def seg_predict(runner: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """Binary masks of raw query images by a seg2d runner (normalised as its training)."""
    from ncatool.data.loading import CaseData, normalize

    out = []
    for img in images:
        data = CaseData("q", normalize(img[None]), None, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
        out.append(runner.predict_case(data, seed=0).labels > 0)
    return out


# ---------------------------------------------------------------------------------------------- run
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "incontext")
    parser.add_argument("--stage1-epochs", type=int, default=60, help="in-context stage 1 (20 steps each)")
    parser.add_argument("--stage2-epochs", type=int, default=15, help="in-context stage 2 (20 steps each)")
    parser.add_argument("--seg-steps", type=int, default=120, help="(i): steps per task, k and draw")
    parser.add_argument("--seg-draws", type=int, default=1, help="(i): draws trained (of the 5)")
    parser.add_argument("--upper-steps", type=int, default=300, help="(iv): steps per task")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: check that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.stage1_epochs, args.stage2_epochs, args.seg_steps, args.upper_steps = 2, 1, 10, 10
        args.seg_draws = 1
    torch.set_num_threads(2)
    started = time.perf_counter()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    data = out / "data"
    train_sets = [write_dataset(data, 301 + i, f"Train{i + 1}", 24, seed=11 + i) for i in range(3)]
    test_set = write_dataset(data, 310, "Test", 80, seed=29)
    print(f"data written in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    from ncatool.data.loading import NnUNetDataset, load_case
    from ncatool.models.incontext import ContextStats
    from ncatool.runtime import load

    # ------------------------------------------------------------------ the in-context NCA
    common = dict(a.split("=", 1) for a in IC_SETTINGS)
    data_args = [str(d) for d in train_sets]
    from ncatool.commands.train import run_training

    def train_stage(stage: int, epochs: int, init: Path | None) -> tuple[dict[str, Any], float]:
        values = {"data": data_args, "stage": stage, "epochs": epochs, **common}
        t0 = time.perf_counter()
        summary = run_training("incontext", None, out / f"ic{stage}", None, values, [], init=init)
        return summary, time.perf_counter() - t0

    s1, t_stage1 = train_stage(1, args.stage1_epochs, None)
    s2, t_stage2 = train_stage(2, args.stage2_epochs, out / "ic1" / "checkpoints" / "best.pt")
    ckpt = out / "ic2" / "checkpoints" / "best.pt"
    runner = load(ckpt, device="cpu")
    model = runner.model
    size = runner.target_size

    # ------------------------------------------------------------------ the test set
    ds = NnUNetDataset(test_set)
    records = ds.cases("train")
    candidates, pool_r = records[:40], records[40:]
    names = {n: v for n, v in ds.foreground_labels.items()}
    raw = {r.name: load_case(r) for r in records}  # raw intensities (the baselines normalise themselves)
    tasks = {name: names[name] for name in HELD_OUT}
    t0 = time.perf_counter()
    pool = [runner.encode_case(r, ds, list(tasks.values())) for r in pool_r]
    encode_ms = 1000 * (time.perf_counter() - t0) / len(pool)
    encoded = {r.name: runner.encode_case(r, ds, []) for r in candidates}
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    results: dict[str, Any] = {}
    timing: dict[str, float] = {}
    seg_train_seconds, upper_seconds = [], []
    for task, value in tasks.items():
        holders = [i for i, c in enumerate(pool) if value in c.stats]
        queries_r = [r for r in candidates if (raw[r.name].label == value).any()][:QUERIES]  # type: ignore[union-attr]
        queries = [encoded[r.name] for r in queries_r]
        refs = [raw[r.name].label == value for r in queries_r]  # type: ignore[operator]
        q_raw = [raw[r.name].image[0] for r in queries_r]
        results[task] = {}
        for k in KS:
            draws = [rng.choice(holders, size=k, replace=False) for _ in range(DRAWS)]
            scores: dict[str, list[float]] = {
                m: [] for m in ("incontext", "prior", "nearest", "mean-mask", "seg-k")
            }
            for d, pick in enumerate(draws):
                stats = ContextStats.total([pool[int(i)].stats[value] for i in pick])
                ctx_img = [raw[pool_r[int(i)].name].image[0] for i in pick]
                ctx_mask = [raw[pool_r[int(i)].name].label == value for i in pick]  # type: ignore[operator]
                t1 = time.perf_counter()
                with torch.no_grad():
                    for q, ref in zip(queries, refs, strict=True):
                        logits, bayes = model.segment(q.image[None], stats)
                        up = torch.nn.functional.interpolate
                        scores["incontext"].append(
                            dice(up(logits, size=ref.shape, mode="bilinear")[0, 0].numpy() > 0, ref)
                        )
                        scores["prior"].append(
                            dice(up(bayes, size=ref.shape, mode="bilinear")[0, 0].numpy() > 0, ref)
                        )
                timing[f"k{k}"] = 1000 * (time.perf_counter() - t1) / len(queries)
                mean_mask = np.mean(ctx_mask, axis=0) > 0.5
                for qi, ref in zip(q_raw, refs, strict=True):
                    best = int(np.argmax([ncc(qi, c) for c in ctx_img]))
                    scores["nearest"].append(dice(ctx_mask[best], ref))
                    scores["mean-mask"].append(dice(mean_mask, ref))
                if d < args.seg_draws:
                    seg_data = binary_dataset(out / "seg" / "data", ctx_img, ctx_mask)
                    seg, secs = train_seg(seg_data, out / "seg" / "run", args.seg_steps, seed=d)
                    seg_train_seconds.append(secs)
                    scores["seg-k"] += [
                        dice(p, r) for p, r in zip(seg_predict(seg, q_raw), refs, strict=True)
                    ]
            results[task][str(k)] = {m: float(np.nanmean(v)) if v else None for m, v in scores.items()}
            print(f"{task} k={k}: " + "  ".join(f"{m} {v:.3f}" for m, v in results[task][str(k)].items() if v is not None),
                  file=sys.stderr, flush=True)  # fmt: skip
        pool_img = [raw[r.name].image[0] for r in pool_r]
        pool_mask = [raw[r.name].label == value for r in pool_r]  # type: ignore[operator]
        upper, secs = train_seg(binary_dataset(out / "seg" / "data", pool_img, pool_mask), out / "seg" / "upper",
                             args.upper_steps, seed=0)  # fmt: skip
        upper_seconds.append(secs)
        results[task]["seg-all"] = float(
            np.nanmean([dice(p, r) for p, r in zip(seg_predict(upper, q_raw), refs, strict=True)])
        )

    # ------------------------------------------------------------------ memory and size
    memory = {
        f"k{k}_{'chunk4' if c else 'no_chunk'}": saved_bytes(model.train(), k, c, size)
        for k in (2, 16)
        for c in (4, 0)
    }
    summary = {
        "command": "benchmarks/incontext/run.py" + (" --quick" if args.quick else ""),
        "settings": vars(args) | {"out": str(args.out)},
        "incontext_settings": IC_SETTINGS,
        "seg_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in SEG_SETTINGS.items()},
        "params": {
            "incontext": int(sum(p.numel() for p in model.parameters())),
            "seg2d": int(sum(p.numel() for p in upper.model.parameters())),
        },
        "stage1": {
            "seconds": round(t_stage1, 1),
            "epochs": s1["epochs"],
            "best_dice": s1["best_dice"],
            "last": s1["last"],
        },
        "stage2": {
            "seconds": round(t_stage2, 1),
            "epochs": s2["epochs"],
            "best_dice": s2["best_dice"],
            "last": s2["last"],
        },
        "seg_k_train_seconds": round(float(np.mean(seg_train_seconds)), 1),
        "seg_all_train_seconds": round(float(np.mean(upper_seconds)), 1),
        "inference_ms_per_query": {k: round(v, 2) for k, v in timing.items()},
        "context_encoding_ms_per_pair": round(encode_ms, 2),
        "saved_for_backward_bytes": memory,
        "results": results,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))


def table(summary: dict[str, Any]) -> str:
    """The Markdown table of a results file."""
    lines = ["| task | k | in-context NCA | its prior alone | (i) seg2d on k pairs | (ii) nearest (NCC) | "
             "(iii) mean mask | (iv) seg2d on all 40 |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for task, rows in summary["results"].items():
        for k in KS:
            r = rows[str(k)]
            cells = [r["incontext"], r["prior"], r["seg-k"], r["nearest"], r["mean-mask"]]
            text = " | ".join("" if c is None else f"{c:.3f}" for c in cells)
            upper = f"{rows['seg-all']:.3f}" if k == KS[0] else ""
            lines.append(f"| {task} | {k} | {text} | {upper} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        print(table(json.loads((ROOT / "benchmarks" / "results" / "incontext" / "results.json").read_text())))
    else:
        main()
