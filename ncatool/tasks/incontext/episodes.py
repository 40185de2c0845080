"""In-context episodes: datasets in memory, the tasks they define, and episodes drawn from them.

A *task* is a binary structure of one dataset: one foreground label, or a union of 1–5 of its labels.
An *episode* is a task, k context pairs (image, mask of the task) and a query of the same task from
another case. Every image of every dataset is loaded once, normalised as the segmentation tasks do
(:func:`ncatool.data.loading.load_case`) and resized to the run's ``target_size`` (image linear,
labels nearest, :mod:`ncatool.data.transforms`), so an episode is a few tensor lookups.

Held-out labels (``holdout_labels``) are never a training task nor part of a union; their voxels stay
in the images (they are background to the other tasks), as an unseen structure in a real image would.

Randomness comes from a NumPy generator the caller seeds (per epoch in training), so episodes are
reproducible and a resumed run draws the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ncatool.data.datasets import DataConfig
from ncatool.data.loading import CaseRecord, NnUNetDataset, load_case
from ncatool.data.transforms import resize_image, resize_label
from ncatool.errors import NcaError


@dataclass
class LoadedDataset:
    """One dataset at the working size.

    Attributes:
        root: Its folder.
        name: ``dataset.json``'s name (else the folder name).
        images: ``(N, C, *S)`` float32, normalised and resized.
        labels: ``(N, *S)`` int64 label maps, resized (nearest).
        label_values: Foreground label values, ascending.
        label_names: Name of each value (``dataset.json``).
        case_names: Case names, in ``images`` order.
        records: The cases' files.
    """

    root: Path
    name: str
    images: torch.Tensor
    labels: torch.Tensor
    label_values: list[int]
    label_names: dict[int, str]
    case_names: list[str]
    records: list[CaseRecord]

    def mask(self, index: int, labels: Sequence[int]) -> torch.Tensor:
        """``(*S)`` float mask of case ``index``: 1 where its label is one of ``labels``."""
        lab = self.labels[index]
        out = torch.zeros(lab.shape, dtype=torch.bool)
        for value in labels:
            out |= lab == value
        return out.float()

    def present(self, labels: Sequence[int]) -> np.ndarray:
        """``(N,)`` bool: the cases whose mask of ``labels`` is not empty."""
        flat = self.labels.flatten(1)
        hit = torch.zeros(flat.shape[0], dtype=torch.bool)
        for value in labels:
            hit |= (flat == value).any(1)
        return hit.numpy()


def resolve_dim(roots: Sequence[Path], dim: int) -> int:
    """The spatial dimension of the run: ``dim`` if given, else the datasets' (which must agree).

    Raises:
        NcaError: Datasets of different dimensions, or not the one asked for.
    """
    found = {root: NnUNetDataset(root).dim for root in roots}
    for root, d in found.items():
        if dim and d != dim:
            raise NcaError(f"holds {d}D images but the run is {dim}D (dim={dim})", root)
    dims = set(found.values())
    if len(dims) > 1:
        listing = ", ".join(f"{r.name} {d}D" for r, d in found.items())
        raise NcaError(f"--data datasets mix 2D and 3D images ({listing}); give datasets of one kind")
    return dim or dims.pop()


def load_dataset(
    root: Path, data: DataConfig, size: tuple[int, ...], in_channels: int | None = None
) -> LoadedDataset:
    """Load every training case of an nnU-Net raw dataset at ``size``.

    Raises:
        NcaError: No foreground label, a case breaking verify's rules, a channel count other than
            ``in_channels`` (when given), a case of another dimension.
    """
    ds = NnUNetDataset(root)
    if ds.num_foreground < 1:
        raise NcaError("dataset.json defines no foreground label", ds.json_path)
    if in_channels is not None and ds.num_channels != in_channels:
        raise NcaError(
            f"has {ds.num_channels} image channel(s) but the other datasets (or the model) have {in_channels}",
            ds.json_path,
        )
    records = ds.cases("train")
    if len(records) < 2:
        raise NcaError(f"has {len(records)} case(s); in-context episodes need at least 2", root / "imagesTr")
    images, labels = [], []
    for record in records:
        case = load_case(record, data, num_classes=ds.num_classes)
        if case.dim != len(size):
            raise NcaError(f"is {case.dim}D but the run is {len(size)}D", record.image_paths[0])
        assert case.label is not None  # cases("train") requires labels
        images.append(resize_image(torch.from_numpy(case.image), size))
        labels.append(resize_label(torch.from_numpy(case.label), size))
    names = {v: k for k, v in ds.foreground_labels.items()}
    return LoadedDataset(
        root=Path(root),
        name=ds.name,
        images=torch.stack(images),
        labels=torch.stack(labels),
        label_values=sorted(names),
        label_names=names,
        case_names=[r.name for r in records],
        records=records,
    )


def parse_holdout(entries: Sequence[str], datasets: Sequence[LoadedDataset]) -> set[tuple[int, int]]:
    """``holdout_labels`` entries → ``{(dataset index, label value)}``.

    An entry is a label name or value (in every dataset that has it), or ``DATASET:LABEL`` with the
    dataset's folder name or ``dataset.json`` name.

    Raises:
        NcaError: An entry that matches no label of any dataset.
    """
    out: set[tuple[int, int]] = set()
    for entry in entries:
        where, sep, label = entry.rpartition(":")
        hits = set()
        for i, ds in enumerate(datasets):
            if sep and where not in (ds.root.name, ds.name):
                continue
            for value, name in ds.label_names.items():
                if label in (name, str(value)):
                    hits.add((i, value))
        if not hits:
            known = "; ".join(f"{ds.root.name}: {', '.join(ds.label_names.values())}" for ds in datasets)
            raise NcaError(f"holdout_labels entry {entry!r} names no label of the --data datasets ({known})")
        out |= hits
    return out


@dataclass(frozen=True)
class Task:
    """A binary structure: labels of one dataset (their union)."""

    dataset: int
    labels: tuple[int, ...]

    def describe(self, datasets: Sequence[LoadedDataset]) -> str:
        """``Dataset101_A:liver+spleen``."""
        ds = datasets[self.dataset]
        return f"{ds.root.name}:{'+'.join(ds.label_names[v] for v in self.labels)}"


@dataclass
class Episode:
    """Indices of one episode: its task, the query case and the context cases (one dataset)."""

    task: Task
    query: int
    context: list[int]


class EpisodeSampler:
    """Draws episodes of the training tasks from the training cases.

    Args:
        datasets: The loaded datasets.
        cases: Per dataset, the case indices episodes may use (queries and contexts).
        holdout: ``(dataset, label)`` pairs never used.
        union_prob: Share of episodes whose task is a random union of labels of one dataset.
        max_union: Largest union.
    """

    def __init__(
        self,
        datasets: Sequence[LoadedDataset],
        cases: Sequence[Sequence[int]],
        holdout: set[tuple[int, int]],
        union_prob: float = 0.5,
        max_union: int = 5,
    ) -> None:
        self.datasets = list(datasets)
        self.cases = [np.asarray(sorted(c), dtype=np.int64) for c in cases]
        self.union_prob = union_prob
        self.max_union = max_union
        self.allowed = [
            [v for v in ds.label_values if (i, v) not in holdout] for i, ds in enumerate(self.datasets)
        ]
        # the single-label tasks with at least two usable cases (a query and a context)
        self.singles = [
            Task(i, (v,))
            for i, values in enumerate(self.allowed)
            for v in values
            if self.usable(Task(i, (v,))).size >= 2
        ]
        if not self.singles:
            raise NcaError(
                "no training task: every label is held out or present in fewer than two training cases"
            )

    def usable(self, task: Task) -> np.ndarray:
        """Case indices of the task's dataset (among ``cases``) whose mask is not empty."""
        idx = self.cases[task.dataset]
        return idx[self.datasets[task.dataset].present(task.labels)[idx]]

    def draw_task(self, rng: np.random.Generator) -> Task:
        """A single label, or with ``union_prob`` a union of 1–``max_union`` labels of one dataset."""
        if rng.random() < self.union_prob:
            d = int(rng.choice(sorted({t.dataset for t in self.singles})))
            values = self.allowed[d]
            n = int(rng.integers(1, min(self.max_union, len(values)) + 1))
            task = Task(d, tuple(sorted(int(v) for v in rng.choice(values, size=n, replace=False))))
            if self.usable(task).size >= 2:
                return task
        return self.singles[int(rng.integers(len(self.singles)))]

    def draw(self, rng: np.random.Generator, k: int) -> Episode:
        """A task, a query and ``k`` context cases other than the query (repeated when the task has
        fewer than ``k`` other cases: training only)."""
        task = self.draw_task(rng)
        usable = self.usable(task)
        query = int(rng.choice(usable))
        others = usable[usable != query]
        context = rng.choice(others, size=k, replace=len(others) < k)
        return Episode(task, query, [int(c) for c in context])


def boundary(masks: torch.Tensor) -> torch.Tensor:
    """The cells of binary ``masks (N, 1, *S)`` that touch the outside (face or corner neighbours)."""
    import torch.nn.functional as F

    pool = F.max_pool2d if masks.dim() == 4 else F.max_pool3d
    return masks * pool(1.0 - masks, 3, stride=1, padding=1)


def remap_intensities(images: torch.Tensor, rng: np.random.Generator, knots: int = 7) -> torch.Tensor:
    """One random contrast for all ``images (N, C, *S)`` (z-scored): a piecewise-linear curve through
    ``knots`` random values on [-3, 3], not necessarily monotonic, then each image z-scored again."""
    ys = torch.from_numpy(rng.normal(0.0, 1.0, knots).astype(np.float32))
    x = images.clamp(-3.0, 3.0)
    pos = (x + 3.0) / 6.0 * (knots - 1)
    lo = pos.floor().clamp(max=knots - 2).long()
    frac = pos - lo
    out = ys[lo] * (1 - frac) + ys[lo + 1] * frac
    flat = out.flatten(1)
    mean, std = flat.mean(1), flat.std(1).clamp(min=1e-6)
    view = (-1, *([1] * (images.dim() - 1)))
    return (out - mean.view(view)) / std.view(view)


def episode_tensors(
    datasets: Sequence[LoadedDataset],
    episodes: Sequence[Episode],
    rng: np.random.Generator | None = None,
    boundary_prob: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack episodes of one k into a batch, augmented when ``rng`` is given.

    Augmentation: every pair and the query are flipped along each axis with probability 0.5 (so a
    copied context mask does not fit the query); a whole episode gets a new contrast (a new task: the
    same structures, other intensities) with probability 0.5 by :func:`remap_intensities`, else
    with probability 0.25 its intensities are negated; with probability ``boundary_prob`` its task
    becomes the structures' boundary (:func:`boundary`: thin and hollow shapes, which the labels of
    the training data may never show; the model must then read the task from the masks, not only from
    the intensities).

    Returns:
        ``query (B, C, *S)``, ``query mask (B, 1, *S)``, ``context (B, k, C, *S)``,
        ``context masks (B, k, 1, *S)``.
    """
    queries, qmasks, contexts, cmasks = [], [], [], []
    for ep in episodes:
        ds = datasets[ep.task.dataset]
        idx = [ep.query, *ep.context]
        images = ds.images[idx].clone()
        masks = torch.stack([ds.mask(i, ep.task.labels) for i in idx])[:, None]
        if rng is not None:
            if rng.random() < boundary_prob:
                masks = boundary(masks)
            nd = masks.dim() - 2
            for j in range(len(idx)):
                axes = [1 + a for a in range(nd) if rng.random() < 0.5]  # spatial axes of (C, *S)
                if axes:
                    images[j] = images[j].flip(axes)
                    masks[j] = masks[j].flip(axes)
            if rng.random() < 0.5:
                images = remap_intensities(images, rng)
            elif rng.random() < 0.5:
                images = -images
        queries.append(images[0])
        qmasks.append(masks[0])
        contexts.append(images[1:])
        cmasks.append(masks[1:])
    return torch.stack(queries), torch.stack(qmasks), torch.stack(contexts), torch.stack(cmasks)
