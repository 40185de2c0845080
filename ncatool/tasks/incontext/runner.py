"""In-context checkpoints at work: segment new images from the examples of a context dataset, and
score the model per context size.

``predict --context DATASET --context-size K`` takes, for every foreground label of the context
dataset (or those of ``--labels``), the first K cases of a seeded order (``--seed``) whose mask holds
that label, encodes each case once and keeps only the sums the model needs
(:class:`ncatool.models.incontext.ContextStats`), so any K runs in the memory of one case. Each query
is then segmented once per label at the run's ``target_size`` and the probabilities resized back;
the label map holds, per voxel, the label with the highest probability above 0.5, written with the
query's geometry by the segmentation runner's code (case discovery, loading and normalisation, mask
files: this runner derives from :class:`~ncatool.tasks.segmentation.runner.SegmentationRunner`).

``eval --data DATASET --context-size 1,2,4,8``: for each K, each label and each query case, ``DRAWS``
seeded draws of K context cases among the *other* cases holding the label (``--split test``: queries
from imagesTs, contexts from imagesTr); Dice of the thresholded probability at the query's own size
(NaN when reference and prediction are both empty, left out of the means), its mean over queries and
draws per label, and the mean over labels. The naive Bayes prior the NCA starts from is scored too.

Everything is checked before anything is written: query and context must have the model's channel
count and dimension; a label must exist in the context; K must not exceed the cases that hold it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncatool.data.io import read_header
from ncatool.data.loading import CaseData, CaseRecord, NnUNetDataset, load_case
from ncatool.data.transforms import resize_image, resize_label
from ncatool.errors import NcaError
from ncatool.models.incontext import ContextStats, InContextModelConfig, InContextNCA, feature_stats
from ncatool.runtime import AnimateRequest, Checkpoint, EvalRequest, PredictRequest, autocast, load_weights
from ncatool.tasks.segmentation.runner import CasePrediction, SegmentationRunner, _welford

#: Random context draws per query and context size in ``eval``.
DRAWS = 5
#: Queries segmented at once.
QUERY_BATCH = 16


@dataclass
class LabelContext:
    """The context of one label: its value, name and the summed stats of its K pairs (``B = 1``),
    and with ``--adapt-steps`` the copy of the model fine-tuned on them (else the runner's model)."""

    value: int
    name: str
    stats: ContextStats
    cases: list[str]
    model: InContextNCA | None = None


@dataclass
class EncodedCase:
    """A case of the context / query set at the model's size (stats per label) and at its own."""

    name: str
    image: torch.Tensor  # (C, *S) at the model's size
    stats: dict[int, ContextStats]  # label value -> stats of this one pair (only labels present)
    label: np.ndarray | None  # (*S_native)
    spatial: tuple[int, ...]


def header_shape(record: CaseRecord) -> tuple[int, int]:
    """``(channels, dim)`` of a case from its files' headers (singleton-z 3D counts as 2D)."""
    size, components = read_header(record.image_paths[0])
    channels = components if len(record.image_paths) == 1 else len(record.image_paths)
    dim = 2 if len(size) == 2 or (len(size) == 3 and size[2] == 1) else len(size)
    return channels, dim


def label_map(probs: torch.Tensor, values: tuple[int, ...]) -> torch.Tensor:
    """Per voxel the value of the label with the highest probability above 0.5, else 0.

    The one rule of ``predict`` and ``animate`` (so equal probabilities give equal maps).

    Args:
        probs: ``(L, *S)`` probabilities, one channel per label.
        values: The L label values.

    Returns:
        ``(*S)`` int64 label values.
    """
    table = torch.tensor([0, *values], device=probs.device)
    best, idx = probs.max(dim=0)
    return table[torch.where(best > 0.5, idx + 1, torch.zeros_like(idx))]


class InContextRunner(SegmentationRunner):
    """A trained in-context NCA with the preprocessing of its run.

    Args:
        model: The model.
        config: The run's config.
        device: Where it runs.
        amp: ``none`` or ``bf16``.
        size: The working size (``target_size``).
        path: The checkpoint file.
    """

    def __init__(
        self,
        model: InContextNCA,
        config: Any,
        device: torch.device,
        amp: str,
        size: tuple[int, ...],
        path: Path | None = None,
    ) -> None:
        super().__init__(model, config, device, amp, path=path)  # type: ignore[arg-type]
        self.size = size
        self.contexts: list[LabelContext] = []

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, device: torch.device, amp: str = "none"
    ) -> InContextRunner:
        """Rebuild the model from the shape the checkpoint stored and load its weights.

        Raises:
            NcaError: No model shape, or weights that do not fit it.
        """
        state = checkpoint.task_state
        shape = dict(state.get("model") or {})
        try:
            cfg = InContextModelConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in shape.items()}
            )
            model = InContextNCA(cfg)
        except (TypeError, ValueError) as err:
            raise NcaError(
                f"checkpoint does not describe an in-context model ({err})", checkpoint.path
            ) from err
        load_weights(model, checkpoint)
        size = tuple(int(s) for s in state.get("target_size") or ())
        if len(size) != cfg.dim:
            raise NcaError("checkpoint stores no target_size", checkpoint.path)
        return cls(model, checkpoint.config, device, amp, size, checkpoint.path)

    @property
    def target_size(self) -> tuple[int, ...]:
        """The working size of the run."""
        return self.size

    @property
    def n_out(self) -> int:
        """Labels of the current context."""
        return max(1, len(self.contexts))

    # ------------------------------------------------------------------ checks and loading
    def check_query(self, record: CaseRecord) -> None:
        """Refuse a query whose channels or dimension differ from the context's (headers only).

        Raises:
            NcaError: Naming the file.
        """
        channels, dim = header_shape(record)
        if channels != self.in_channels:
            raise NcaError(
                f"query {record.name!r} has {channels} channel(s) but the context and the model have "
                f"{self.in_channels}",
                record.image_paths[0],
            )
        if dim != self.cfg.dim:
            raise NcaError(
                f"query {record.name!r} is {dim}D but the context and the model are {self.cfg.dim}D",
                record.image_paths[0],
            )

    def open_dataset(self, root: Path, what: str) -> NnUNetDataset:
        """A context / evaluation dataset that fits the model.

        Raises:
            NcaError: Missing, or another channel count or dimension than the model's.
        """
        ds = NnUNetDataset(root)
        if ds.num_channels != self.in_channels:
            raise NcaError(
                f"{what} has {ds.num_channels} channel(s) but the model was trained on {self.in_channels}",
                ds.json_path,
            )
        if ds.dim != self.cfg.dim:
            raise NcaError(f"{what} holds {ds.dim}D images but the model segments {self.cfg.dim}D", root)
        return ds

    @staticmethod
    def wanted_labels(ds: NnUNetDataset, labels: Any) -> list[int]:
        """``labels`` (all foreground labels when None), each checked against the dataset.

        Raises:
            NcaError: A requested label the dataset does not define.
        """
        values = sorted(ds.foreground_labels.values())
        if not labels:
            return values
        missing = [int(v) for v in labels if int(v) not in values]
        if missing:
            raise NcaError(
                f"label {missing[0]} is not in the context dataset (its labels: "
                + ", ".join(f"{v} {n}" for n, v in ds.foreground_labels.items())
                + ")",
                ds.json_path,
            )
        return sorted({int(v) for v in labels})

    def encode_case(self, record: CaseRecord, ds: NnUNetDataset, labels: list[int]) -> EncodedCase:
        """Load a case, encode it once and keep its stats for each label it holds."""
        data = load_case(record, self.data_config(), num_classes=ds.num_classes)
        if data.dim != self.cfg.dim:
            raise NcaError(f"is {data.dim}D but the model segments {self.cfg.dim}D", record.image_paths[0])
        image = resize_image(torch.from_numpy(data.image), self.size)
        stats: dict[int, ContextStats] = {}
        if data.label is not None:
            label = resize_label(torch.from_numpy(data.label), self.size).to(self.device)
            with torch.no_grad(), autocast(self.device, self.amp):
                feats = self.model.encode(image[None].to(self.device))[:, None]  # type: ignore[operator]
                for v in labels:
                    mask = (label == v)[None, None, None]
                    if bool(mask.any()):
                        stats[v] = feature_stats(feats, mask)
        return EncodedCase(record.name, image, stats, data.label, data.spatial_shape)

    # ------------------------------------------------------------------ context
    def adapted(
        self, cases: list[EncodedCase], value: int, steps: int, seed: int
    ) -> tuple[InContextNCA, ContextStats]:
        """A copy of the model fine-tuned for ``steps`` steps on the pairs ``cases`` of label ``value``
        (:func:`ncatool.tasks.incontext.adapt.adapt`, with the run's loss), and their stats under its
        encoder."""
        from ncatool.tasks.incontext.adapt import adapt

        images = torch.stack([c.image for c in cases]).to(self.device)
        masks = (
            torch.stack(
                [resize_label(torch.from_numpy(c.label == value).long(), self.size) for c in cases]  # type: ignore[operator]
            )[:, None]
            .float()
            .to(self.device)
        )
        with autocast(self.device, self.amp):
            loss = {"loss": self.config.loss, "aux_weight": float(self.config.aux_weight)}
            model = adapt(self.model, images, masks, steps, seed=seed, **loss)  # type: ignore[arg-type]
            with torch.no_grad():
                stats = model.pair_stats(images[None], masks[None])  # the k pairs as one batch entry
        return model, stats

    def prepare_context(
        self, root: Path, k: int, seed: int = 0, labels: Any = None, adapt_steps: int = 0
    ) -> list[LabelContext]:
        """The context of each label: the first ``k`` cases of a seeded order that hold it (with
        ``adapt_steps``, and the model fine-tuned on them, see :meth:`adapted`).

        Raises:
            NcaError: Bad dataset, unknown label, ``k`` larger than the cases, or fewer than ``k``
                cases whose mask holds a label (naming the label and an empty mask's file).
        """
        ds = self.open_dataset(root, "context")
        wanted = self.wanted_labels(ds, labels)
        records = ds.cases("train")
        if k < 1:
            raise NcaError(f"--context-size must be >= 1, got {k}")
        if k > len(records):
            raise NcaError(
                f"--context-size {k} is larger than the {len(records)} case(s) of the context dataset",
                root / "imagesTr",
            )
        names = {v: n for n, v in ds.foreground_labels.items()}
        chosen: dict[int, list[EncodedCase]] = {v: [] for v in wanted}
        empty: dict[int, list[CaseRecord]] = {v: [] for v in wanted}
        for i in np.random.default_rng(seed).permutation(len(records)):
            need = [v for v in wanted if len(chosen[v]) < k]
            if not need:
                break
            record = records[int(i)]
            case = self.encode_case(record, ds, need)
            for v in need:
                if v in case.stats:
                    chosen[v].append(case)
                else:
                    empty[v].append(record)
        for v in wanted:
            if len(chosen[v]) < k:
                first = empty[v][0]
                raise NcaError(
                    f"label {names[v]!r} ({v}): only {len(chosen[v])} of the {len(records)} context case(s) "
                    f"hold it and --context-size is {k}; the mask of {first.name!r} and "
                    f"{len(empty[v]) - 1} other(s) are empty for it",
                    first.label_path,
                )
        contexts = []
        for v in wanted:
            cases = [c.name for c in chosen[v]]
            if adapt_steps > 0:
                model, stats = self.adapted(chosen[v], v, adapt_steps, seed)
                contexts.append(LabelContext(v, names[v], stats, cases, model))
            else:
                stats = ContextStats.total([c.stats[v] for c in chosen[v]])
                contexts.append(LabelContext(v, names[v], stats, cases))
        return contexts

    # ------------------------------------------------------------------ one query
    def load(self, record: CaseRecord) -> CaseData:
        """Read and normalise a query (see :meth:`SegmentationRunner.load`) after the header checks."""
        self.check_query(record)
        return super().load(record)

    def label_probs(
        self, query: torch.Tensor, stats: ContextStats, model: InContextNCA | None = None
    ) -> torch.Tensor:
        """Probabilities ``(B, 1, *S)`` of queries at the model's size (by ``model``: an adapted copy)."""
        return torch.sigmoid((model or self.model).segment(query, stats)[0].float())  # type: ignore[operator]

    def predict_case(
        self, data: CaseData, ensemble: int = 1, native: bool = False, seed: int | None = 0
    ) -> CasePrediction:
        """Segment one query with every label's context: the label map, the probabilities
        ``(labels, *S)`` at the query's size, and with ``ensemble > 1`` the std map and quality."""
        if not self.contexts:
            raise NcaError("no context prepared: pass --context DATASET")
        if seed is not None:
            torch.manual_seed(seed)
        query = resize_image(torch.from_numpy(data.image), self.size)[None].to(self.device)
        means, stds = [], []
        with torch.no_grad(), autocast(self.device, self.amp):
            for ctx in self.contexts:
                mean, var = _welford(lambda ctx=ctx: self.label_probs(query, ctx.stats, ctx.model), ensemble)
                means.append(mean)
                stds.append(var.sqrt() if var is not None else None)
        mean = resize_image(torch.cat(means, dim=1), data.spatial_shape).clamp_(0.0, 1.0)[0]
        values = tuple(c.value for c in self.contexts)
        labels = label_map(mean, values).cpu().numpy()
        std = quality = None
        if ensemble > 1:
            std_small = torch.cat([s for s in stds if s is not None], dim=1)
            std = resize_image(std_small, data.spatial_shape)[0].clamp_(min=0.0).sum(0).numpy()
            total = float(torch.cat(means, dim=1).sum())
            quality = float(std_small.sum()) / total if total > 0 else 0.0
        dtype = np.uint8 if max(values) < 256 else np.uint16
        return CasePrediction(data.name, labels.astype(dtype), mean.cpu().numpy(), std, quality)

    def predict(self, request: PredictRequest) -> dict[str, Any]:
        """``ncatool predict --context DATASET [--context-size K]``: label maps of every input case."""
        from ncatool.predict import discover_cases

        request.refuse(self.task, "samples", "steps", "native")
        if request.context is None:
            raise NcaError(
                f"--context DATASET is required for {self.task} checkpoints: the examples of what to segment"
            )
        if request.input is None:
            raise NcaError(f"--input FILE_OR_DIR is required for {self.task} checkpoints")
        if request.ensemble < 1:
            raise NcaError(f"--ensemble must be >= 1, got {request.ensemble}")
        k = request.context_size or int(self.config.context_size)
        records, source = discover_cases(request.input)
        if not records:
            raise NcaError("no input cases found", request.input)
        for record in records:  # every query checked before the (slow) context and any output
            self.check_query(record)
        if request.adapt_steps < 0:
            raise NcaError(f"--adapt-steps must be >= 0, got {request.adapt_steps}")
        self.contexts = self.prepare_context(
            Path(request.context), k, request.seed, request.labels, request.adapt_steps
        )
        rows = self.predict_records(
            records, request.output, request.ensemble, False, request.seed, request.on_case, request.format
        )
        return {
            "checkpoint": str(self.path),
            "task": self.task,
            "input": source,
            "output": str(request.output),
            "context": str(request.context),
            "context_size": k,
            "adapt_steps": request.adapt_steps,
            "context_cases": {c.name: c.cases for c in self.contexts},
            "labels": {str(c.value): c.name for c in self.contexts},
            "ensemble": request.ensemble,
            "native": False,
            "target_size": list(self.size),
            "device": str(self.device),
            "amp": self.amp,
            "seed": request.seed,
            "format": request.format,
            "cases": rows,
        }

    # ------------------------------------------------------------------ scores
    def evaluate(self, request: EvalRequest) -> dict[str, Any]:
        """``ncatool eval -c CKPT --data DATASET --context-size 1,2,4,8``: Dice per context size and
        label (see the module docstring); ``metrics`` holds ``dice_k<K>`` and the per-label values."""
        from ncatool.evaluate import write_scores
        from ncatool.metrics import dice, nanmean

        if request.ensemble != 1 or request.native:
            raise NcaError(f"--ensemble and --native do not apply to {self.task} evaluation")
        if request.data is None:
            raise NcaError(f"--data DATASET is required to evaluate a {self.task} checkpoint")
        sizes = sorted(set(request.context_size or (int(self.config.context_size),)))
        if sizes[0] < 1:
            raise NcaError(f"--context-size values must be >= 1, got {sizes[0]}")
        ds = self.open_dataset(Path(request.data), "dataset")
        labels = self.wanted_labels(ds, request.labels)
        names = {v: n for n, v in ds.foreground_labels.items()}
        contexts = [self.encode_case(r, ds, labels) for r in ds.cases("train")]
        if request.split == "test":
            test = ds.cases("test")
            unlabelled = [r for r in test if r.label_path is None]
            if not test or unlabelled:
                raise NcaError("--split test needs imagesTs with labelsTs", ds.root / "labelsTs")
            queries, same = [self.encode_case(r, ds, []) for r in test], False
        else:
            queries, same = contexts, True
        pools = {v: [i for i, c in enumerate(contexts) if v in c.stats] for v in labels}
        for k in sizes:  # every request checked before the first query runs
            for v in labels:
                available = len(pools[v]) - (1 if same else 0)
                if k > available:
                    raise NcaError(
                        f"--context-size {k}: label {names[v]!r} ({v}) is held by {len(pools[v])} case(s), "
                        f"{available} of them usable as context for a query (k at most {available})",
                        ds.root / "labelsTr",
                    )
        rng = np.random.default_rng(request.seed)
        torch.manual_seed(request.seed)
        per_k: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        for k in sizes:
            t0, runs = time.perf_counter(), 0
            rows: dict[str, Any] = {}
            for v in labels:
                if request.adapt_steps > 0:
                    groups = self._adapted_draws(contexts, queries, pools[v], same, v, k, request, rng)
                else:
                    groups = [(self.model, self._query_draws(contexts, queries, pools[v], same, v, k, rng))]
                scores, prior_scores = [], []
                for model, jobs in groups:
                    for start in range(0, len(jobs), QUERY_BATCH):
                        part = jobs[start : start + QUERY_BATCH]
                        query = torch.stack([q.image for q, _ in part]).to(self.device)
                        stats = ContextStats.stack([s for _, s in part])
                        with torch.no_grad(), autocast(self.device, self.amp):
                            logits, bayes = model.segment(query, stats)  # type: ignore[operator]
                        for (q, _), lo, pr in zip(part, logits.float(), bayes.float(), strict=True):
                            assert q.label is not None
                            ref = q.label == v
                            scores.append(dice(resize_image(lo, q.spatial)[0].cpu().numpy() > 0, ref))
                            prior_scores.append(dice(resize_image(pr, q.spatial)[0].cpu().numpy() > 0, ref))
                        runs += len(part)
                rows[str(v)] = {
                    "name": names[v],
                    "dice": nanmean(scores),
                    "dice_std": float(np.nanstd(scores)) if any(s == s for s in scores) else float("nan"),
                    "dice_prior": nanmean(prior_scores),
                    "n": len(scores),
                    "nan": int(sum(1 for s in scores if s != s)),
                }
            mean = nanmean(r["dice"] for r in rows.values())
            prior = nanmean(r["dice_prior"] for r in rows.values())
            seconds = (time.perf_counter() - t0) / max(runs, 1)
            per_k[str(k)] = {"dice": mean, "dice_prior": prior, "seconds_per_query": seconds, "labels": rows}
            metrics[f"dice_k{k}"] = mean
            metrics[f"dice_prior_k{k}"] = prior
            for v, row in rows.items():
                metrics[f"dice_k{k}_{v}"] = row["dice"]
        summary = {
            "task": self.task,
            "checkpoint": str(self.path),
            "data": str(request.data),
            "split": "test" if not same else "all",
            "queries": len(queries),
            "draws": DRAWS,
            "adapt_steps": request.adapt_steps,
            "seed": request.seed,
            "labels": {str(v): names[v] for v in labels},
            "context_size": per_k,
            "metrics": metrics,
        }
        if request.output is not None:
            write_scores(summary, request.output)
        return summary

    @staticmethod
    def _query_draws(
        contexts: list[EncodedCase],
        queries: list[EncodedCase],
        pool: list[int],
        same: bool,
        value: int,
        k: int,
        rng: np.random.Generator,
    ) -> list[tuple[EncodedCase, ContextStats]]:
        """Every query with ``DRAWS`` random contexts of ``k`` cases of ``pool`` (never itself)."""
        jobs = []
        for qi, q in enumerate(queries):
            others = [i for i in pool if not (same and i == qi)]
            for _ in range(DRAWS):
                pick = rng.choice(others, size=k, replace=False)
                jobs.append((q, ContextStats.total([contexts[int(i)].stats[value] for i in pick])))
        return jobs

    def _adapted_draws(
        self,
        contexts: list[EncodedCase],
        queries: list[EncodedCase],
        pool: list[int],
        same: bool,
        value: int,
        k: int,
        request: EvalRequest,
        rng: np.random.Generator,
    ) -> list[tuple[InContextNCA, list[tuple[EncodedCase, ContextStats]]]]:
        """``--adapt-steps``: ``DRAWS`` random contexts of ``k`` cases of ``pool``, the model adapted to
        each (one fine-tuning per draw, not per query: it costs seconds), and every query that is not
        in the draw scored with it."""
        groups = []
        for d in range(DRAWS):
            pick = [int(i) for i in rng.choice(pool, size=k, replace=False)]
            model, stats = self.adapted(
                [contexts[i] for i in pick], value, request.adapt_steps, request.seed + d
            )
            jobs = [(q, stats) for qi, q in enumerate(queries) if not (same and qi in pick)]
            groups.append((model, jobs))
        return groups

    def animation(self, request: AnimateRequest) -> Any:
        """Every NCA step of one query with the label map of the context's labels: an
        :class:`~ncatool.tasks.incontext.animation.InContextSource` for ``--context DATASET
        [--context-size K] [--labels ...] --input QUERY`` (see :mod:`.animation`)."""
        from ncatool.tasks.incontext.animation import load_incontext_source

        return load_incontext_source(self, request)
