"""In-context segmentation at work, step by step: a query with the label map of its context's labels.

``ncatool animate -c CKPT --context DATASET [--context-size K] [--labels 1,2] -i QUERY -o out.gif``
prepares the context as ``predict`` does (:meth:`InContextRunner.prepare_context`: the first K cases
of a seeded order that hold each label, summed into :class:`~ncatool.models.incontext.ContextStats`),
loads the query as ``predict`` does (the segmentation runner's loading and normalisation, resized to
the run's ``target_size``) and shows the NCA's states: the query in grayscale with, per voxel, the
colour of the label whose probability is highest above 0.5 (``overlay="mask"``), or of the most
likely label at an opacity proportional to its probability (``overlay="prob"``). Colours follow
the label values, as in the sample pictures. 3D: the views of ``seg3d``
(:mod:`ncatool.tasks.segmentation.animation`), through the final label map's foreground.

The states are those :meth:`~ncatool.models.incontext.InContextNCA.segment` returns for its last
(finest) level, preceded by the state that level starts from (the coarser levels' result): the
coarser levels run first and are not shown. Every label is segmented in turn, in ``predict``'s
order and from the same seed, so the last frame is the label map ``ncatool predict`` writes for the
same seed and context (at the run's size; ``predict`` resizes it back to the query's).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ncatool.animate import StepCallback, check_hidden, parse_steps
from ncatool.errors import NcaError
from ncatool.runtime import AnimateRequest, autocast
from ncatool.tasks.incontext.runner import label_map
from ncatool.viz.colour import OVERLAYS, gray_to_rgb, hidden_tiles, overlay_probs, window
from ncatool.viz.grid import HIDDEN_PER_ROW, TILES_PER_ROW_2D, in_rows, tile_grid, upscale
from ncatool.viz.text import titled
from ncatool.viz.volume import VolumeView, foreground_slices, take_slice

if TYPE_CHECKING:
    from ncatool.tasks.incontext.runner import InContextRunner, LabelContext


def by_value(probs: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    """``(L, H, W)`` probabilities → ``(max(values), H, W)`` with label ``v`` in channel ``v - 1`` (zeros
    elsewhere), so :func:`overlay_probs` colours each label by its value, as ``predict``'s label map is
    coloured in the sample pictures."""
    out = np.zeros((max(values), *probs.shape[1:]), dtype=np.float32)
    out[[v - 1 for v in values]] = probs
    return out


@dataclass
class InContextSource:
    """An in-context model on one query with the contexts of its labels.

    Attributes:
        model: The :class:`~ncatool.models.incontext.InContextNCA` (eval mode, on its device; a
            shallow copy with other steps for ``--steps``).
        task: ``incontext``.
        query: ``(1, C, *S)`` normalised and resized to the run's size, on the model's device.
        contexts: One :class:`LabelContext` per label, in ``predict``'s order.
        amp: Autocast of the runs (``none`` or ``bf16``).
        view: Slices shown for 3D (``through`` is set from the final label map by :meth:`run`).
        hidden: Hidden channels shown (of the first label's run).
        overlay: ``mask`` or ``prob``.
        info: Facts for the summary (input files, context).
        pick_slices: 3D without ``--slice`` or ``--montage``: show the slices through the final label
            map's foreground (known once :meth:`run` has run every label, so no extra run).
    """

    model: Any
    task: str
    query: torch.Tensor
    contexts: list[LabelContext]
    amp: str = "none"
    view: VolumeView = field(default_factory=VolumeView)
    hidden: int = 0
    overlay: str = "mask"
    info: dict[str, Any] = field(default_factory=dict)
    pick_slices: bool = True

    def __post_init__(self) -> None:
        cfg = self.model.cfg
        self.steps = tuple(int(s) for s in cfg.steps)
        self.total_steps = self.steps[-1]  # only the last level's steps are shown
        self.dim = cfg.dim
        self.out = cfg.fixed_channels  # the output channel; the hidden ones follow it
        self.values = tuple(c.value for c in self.contexts)
        self.full_size = tuple(int(s) for s in self.query.shape[2:])
        self.gray = self.query[0, 0].float().cpu().numpy()
        self.lo, self.hi = window(self.gray)

    # ------------------------------------------------------------------ running
    def label_states(self, ctx: LabelContext) -> list[torch.Tensor]:
        """The last level's ``1 + steps`` states ``(1, channels, *S)`` of one label's run (no grad).

        ``segment`` returns the states after each step; the one the level starts from is the input of
        the level's NCA, taken with a pre-hook so the model runs exactly as in ``predict``.
        """
        start: list[torch.Tensor] = []
        hook = self.model.levels[-1].register_forward_pre_hook(lambda _m, args: start.append(args[0]))
        try:
            with torch.no_grad(), autocast(self.query.device, self.amp):
                _, _, states = self.model.segment(self.query, ctx.stats, return_states=True)
        finally:
            hook.remove()
        return [start[0], *states]

    def run(self, on_step: StepCallback) -> None:
        """Run every label (in ``predict``'s order, one random stream), then report each step's
        ``(1, L + hidden, *S)``: the labels' logits, then the first label's hidden channels."""
        per_label = []
        for i, ctx in enumerate(self.contexts):
            keep = 1 + (self.hidden if i == 0 else 0)  # the output (+ the hidden ones shown)
            per_label.append([s[:, self.out : self.out + keep].float().cpu() for s in self.label_states(ctx)])
        merged = [
            torch.cat([states[step][:, :1] for states in per_label] + [per_label[0][step][:, 1:]], dim=1)
            for step in range(self.total_steps + 1)
        ]
        if self.dim == 3 and self.pick_slices:
            final = label_map(self.probs(merged[-1]), self.values)
            self.view = replace(self.view, through=foreground_slices(final.numpy()))
        for step, state in enumerate(merged):
            on_step(step, state, len(self.steps) - 1)

    def probs(self, state: torch.Tensor) -> torch.Tensor:
        """``(L, *S)`` label probabilities of a reported state (clamped as ``predict`` clamps them)."""
        return torch.sigmoid(state[0, : len(self.contexts)]).clamp_(0.0, 1.0)

    # ------------------------------------------------------------------ drawing
    def _overlay(self, gray: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return overlay_probs(gray_to_rgb(gray, self.lo, self.hi), by_value(probs, self.values), self.overlay)

    def panel_names(self) -> list[str]:
        """3D: each panel's plane and slice number in the query's voxels (as ``--slice`` takes them)."""
        from ncatool.tasks.segmentation.animation import panel_names

        return panel_names(self.view, self.full_size, self.info)

    def label(self, step: int) -> str:
        text = f"step {step}/{self.total_steps}"
        if len(self.steps) > 1:
            text += f" | level {len(self.steps)}/{len(self.steps)}"
        return text

    def render(self, state: torch.Tensor, level: int, scale: int) -> np.ndarray:
        probs = self.probs(state).numpy()
        hidden = state[0, len(self.contexts) :].numpy() if self.hidden else None
        if self.dim == 2:
            tiles = [upscale(self._overlay(self.gray, probs), scale)]
            if hidden is not None:
                tiles += hidden_tiles(hidden, scale)
            return tile_grid(in_rows(tiles, TILES_PER_ROW_2D))
        panels = self.view.slices(self.full_size)
        tiles = [
            titled(upscale(self._overlay(take_slice(self.gray, a, i), take_slice(probs, a, i)), scale), name)
            for (a, i), name in zip(panels, self.panel_names(), strict=True)
        ]
        blocks = [tile_grid(in_rows(tiles, self.view.columns(len(tiles))))]
        if hidden is not None:  # one slice of each hidden channel, in rows below
            hid = take_slice(hidden, *self.view.hidden_slice(self.full_size))
            blocks.append(tile_grid(in_rows(hidden_tiles(hid, scale), HIDDEN_PER_ROW)))
        return tile_grid([[b] for b in blocks])

    def base_size(self) -> tuple[int, int]:
        if self.dim == 2:
            return max(self.full_size), min(1 + self.hidden, TILES_PER_ROW_2D) * self.full_size[1]
        panels = self.view.slices(self.full_size)
        shapes = [tuple(s for j, s in enumerate(self.full_size) if j != a) for a, _ in panels]
        return max(max(s) for s in shapes), self.view.columns(len(shapes)) * max(s[1] for s in shapes)

    def describe(self) -> dict[str, Any]:
        return {
            **self.info,
            "model_size": list(self.full_size),
            "steps_per_level": list(self.steps),
            "shown_level": len(self.steps),
            "overlay": self.overlay,
            "view": None if self.dim == 2 else {k: getattr(self.view, k) for k in ("mode", "axis", "index")},
            "panels": None if self.dim == 2 else self.panel_names(),
        }


def load_incontext_source(runner: InContextRunner, request: AnimateRequest) -> InContextSource:
    """An :class:`InContextSource` for the request's query and context.

    Every option and the query's header are checked before the context is encoded (the slow part).

    Raises:
        NcaError: Missing ``--context`` or ``--input``, a query or context that does not fit the model,
            bad steps, hidden channels or view options (one message, nothing written).
    """
    from ncatool.data.transforms import resize_image
    from ncatool.tasks.segmentation.animation import _check_index, _view, seg_record

    request.refuse(runner.task, "damage", "damage_at", "damage_center", "damage_radius")
    context, query_spec = request.context, request.input
    if context is None or query_spec is None:  # one message for both
        missing = [o for o, v in (("--context DATASET", context), ("--input QUERY", query_spec)) if v is None]
        raise NcaError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required to animate "
            f"{runner.task} checkpoints (the examples of what to segment, and the image to segment)"
        )
    if request.overlay not in OVERLAYS:
        raise NcaError(f"--overlay must be one of {', '.join(OVERLAYS)}, got {request.overlay!r}")
    record = seg_record(query_spec)
    runner.check_query(record)
    cfg = runner.model.cfg
    model = runner.model
    steps = parse_steps(request.steps, cfg.levels)
    if steps is not None:  # the same weights with other steps (segment reads them from cfg)
        model = copy.copy(model)
        model.cfg = replace(cfg, steps=steps)
    check_hidden(request.hidden, cfg.channels - cfg.fixed_channels - 1, runner.task)
    first = record.image_paths[0]
    view = VolumeView()
    if cfg.dim == 2:
        if request.axis is not None or request.slice_index is not None or request.montage:
            raise NcaError("--axis, --slice and --montage apply to volumes; the model is 2D", first)
    else:
        view = _view(request.axis, request.slice_index, request.montage)
    data = runner.load(record)  # one case: cheap next to the k context cases encoded below
    if view.mode == "slice" and view.index is not None:
        # the index is in the query's voxels: checked there, then mapped to the resized volume
        n_in, n_out = data.spatial_shape[view.axis], runner.size[view.axis]
        _check_index(view.index, n_in, view.axis, first)
        view = replace(view, index=min(n_out - 1, int(view.index * n_out / n_in)))
    k = request.context_size or int(runner.config.context_size)
    contexts = runner.prepare_context(context, k, request.seed, request.labels)
    query = resize_image(torch.from_numpy(data.image), runner.size)[None].to(runner.device)
    info = {
        "input": [str(p) for p in record.image_paths],
        "input_shape": list(data.spatial_shape),
        "context": str(context),
        "context_size": k,
        "context_cases": {c.name: c.cases for c in contexts},
        "labels": {str(c.value): c.name for c in contexts},
    }
    pick = cfg.dim == 3 and view.mode != "montage" and view.index is None
    return InContextSource(
        model, runner.task, query, contexts, runner.amp, view, request.hidden, request.overlay, info, pick
    )


__all__ = ["InContextSource", "by_value", "label_map", "load_incontext_source"]
