"""An in-context segmentation NCA: segment a structure it was never trained on, from k examples.

Given k context pairs (image, binary mask) of a task and a query image, the model segments the same
structure in the query. Nothing about the task is in the weights; everything comes from the context,
through sums over the pairs, so any k works and memory does not grow with k::

    f      = softmax(encoder(filters(image)) + bins(image))  # per cell: soft assignment to K clusters
    S      = sum over pairs of  [sum f·m, sum f·(1-m), sum m, sum (1-m), m]     (ContextStats)
    p_fg   = S.fg / S.fg_n,  p_bg = S.bg / S.bg_n     # cluster histograms of the structure and the rest
    priors = [ log <f_q, p_fg> - log <f_q, p_bg> + log(pi / (1 - pi)),           # naive Bayes logit
               log <f_q, p_fg>,                                                   # fg likelihood
               2 * mean context mask - 1 ]                                        # where it usually is
    code   = Linear([p_fg, p_bg, log pi])              # the task, fed to every cell's rule (GoalNCA)
    state  = [query | priors (| f_q)  (fixed) | output (starts at the Bayes logit) | hidden]
    logits = NCA levels (coarse, then fine, as Med-NCA), each step conditioned on ``code``

* ``filters`` are fixed multi-scale filters (intensity, gradient magnitude and Laplacian of the image
  area-downscaled by each of ``scales``); the per-cell encoder on top is learned end to end. ``bins``
  adds a fixed soft binning of the intensity (weight learned), so the clusters start as intensity
  bins of any contrast instead of a uniform assignment.
* Because ``f`` sums to 1 per cell, ``p_fg`` is a histogram over clusters, and ``<f_q, p_fg>`` is the
  likelihood of a query cell's appearance under the structure: a background made of several kinds of
  tissue stays several modes, which a single mean-feature prototype would blur into one.
* The output channel starts at the Bayes logit, and the update rule's last layer starts at zero
  (:class:`ncatool.models.nca.UpdateRule`), so an untrained model already outputs the prior; the NCA
  learns to correct it with shape and neighbourhood. A finer level starts from the coarser level's
  output plus the detail of the prior the coarser level could not see, so thin structures survive.
* Context in chunks (as Neuroverse3D): :meth:`InContextNCA.context_stats` encodes the pairs ``chunk``
  at a time and only the last ``chunk`` pairs keep gradients, so training memory is bounded by the
  chunk, not by k. At inference the stats of each case are computed once and summed.

Layouts: images ``(B, C, *S)``, context ``(B, k, C, *S)`` and ``(B, k, 1, *S)``, ``*S`` = ``(H, W)``
or ``(D, H, W)``; every image of an episode has the same size (the task resizes them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ncatool.models.filters import filter_bank
from ncatool.models.nca import NCA, NCAConfig, pad
from ncatool.models.segmentation import check_level_size, image_pyramid

#: Dense prior channels the model can compute for the query (``InContextModelConfig.priors``).
PRIORS: tuple[str, ...] = ("bayes", "likelihood", "mean_mask")
#: Keeps logarithms of likelihoods finite.
EPS = 1e-4


@dataclass(frozen=True)
class InContextModelConfig:
    """Shape of an :class:`InContextNCA`.

    Attributes:
        dim: 2 or 3.
        in_channels: Image channels C.
        clusters: K, the soft feature clusters (bins of the context histograms).
        encoder_hidden: Width of the per-cell encoder.
        scales: Downscaling factors of the fixed filters (1 = full resolution).
        priors: Dense prior channels (subset of :data:`PRIORS`).
        features: Also give the NCA the query's K cluster channels (fixed); costs width.
        code_dim: Width of the task code fed to the rule (0: no code).
        channels: NCA state channels, fixed ones included (C + priors + K + output + hidden).
        hidden: Width of the rule's MLP.
        levels: Resolution levels (coarse first), ``scale`` apart.
        scale: Factor between levels.
        steps: Steps per level.
        kernels: Learned perception kernel per level.
        filters: Perception filters of the NCA.
        fire_rate: Probability that a cell updates in a step.
        padding: Border mode of the perception.
    """

    dim: int = 2
    in_channels: int = 1
    clusters: int = 16
    encoder_hidden: int = 32
    scales: tuple[int, ...] = (1, 2, 4)
    priors: tuple[str, ...] = PRIORS
    features: bool = False
    code_dim: int = 16
    channels: int = 16
    hidden: int = 64
    levels: int = 2
    scale: int = 2
    steps: tuple[int, ...] = (16, 16)
    kernels: tuple[int, ...] = (3, 3)
    filters: tuple[str, ...] = ("learned",)
    fire_rate: float = 0.5
    padding: str = "reflect"

    @property
    def fixed_channels(self) -> int:
        """Channels the rule never changes: the image, the priors (and the query's clusters)."""
        return self.in_channels + len(self.priors) + (self.clusters if self.features else 0)


def check_model_config(cfg: InContextModelConfig) -> None:
    """Raise ``ValueError`` for an inconsistent shape."""
    if cfg.dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {cfg.dim}")
    unknown = [p for p in cfg.priors if p not in PRIORS]
    if unknown:
        raise ValueError(f"unknown prior(s) {unknown}; choose from {list(PRIORS)}")
    for name in ("steps", "kernels"):
        if len(getattr(cfg, name)) != cfg.levels:
            raise ValueError(f"{name} needs one value per level ({cfg.levels}), got {getattr(cfg, name)}")
    if cfg.channels < cfg.fixed_channels + 2:
        raise ValueError(
            f"channels ({cfg.channels}) must hold the image and priors (and clusters): {cfg.fixed_channels}, "
            "plus the output and at least one hidden channel"
        )
    if cfg.clusters < 2 or cfg.encoder_hidden < 1 or cfg.code_dim < 0:
        raise ValueError("clusters must be >= 2, encoder_hidden >= 1, code_dim >= 0")
    if not cfg.scales or any(s < 1 for s in cfg.scales):
        raise ValueError(f"scales must be positive integers, got {cfg.scales}")


@dataclass
class ContextStats:
    """What the model keeps of a context: sums over its pairs (so stats of two contexts add up).

    Attributes:
        fg: ``(B, K)`` cluster sums inside the masks.
        bg: ``(B, K)`` cluster sums outside the masks.
        fg_n: ``(B,)`` voxels inside the masks.
        bg_n: ``(B,)`` voxels outside.
        mask_sum: ``(B, 1, *S)`` the masks summed over pairs.
        count: ``(B,)`` pairs.
    """

    fg: torch.Tensor
    bg: torch.Tensor
    fg_n: torch.Tensor
    bg_n: torch.Tensor
    mask_sum: torch.Tensor
    count: torch.Tensor

    def __add__(self, other: ContextStats) -> ContextStats:
        return ContextStats(
            self.fg + other.fg,
            self.bg + other.bg,
            self.fg_n + other.fg_n,
            self.bg_n + other.bg_n,
            self.mask_sum + other.mask_sum,
            self.count + other.count,
        )

    def detach(self) -> ContextStats:
        """The same sums without their graph."""
        return ContextStats(*(t.detach() for t in self._tensors()))

    def index(self, idx: torch.Tensor | list[int]) -> ContextStats:
        """The stats of batch entries ``idx`` (repeats allowed)."""
        return ContextStats(*(t[idx] for t in self._tensors()))

    @staticmethod
    def stack(items: list[ContextStats]) -> ContextStats:
        """Batch entries of several ``B = 1`` stats into one batch."""
        return ContextStats(*(torch.cat(ts) for ts in zip(*(s._tensors() for s in items), strict=True)))

    @staticmethod
    def total(items: list[ContextStats]) -> ContextStats:
        """The sum of several stats (a context made of their pairs)."""
        out = items[0]
        for s in items[1:]:
            out = out + s
        return out

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.fg, self.bg, self.fg_n, self.bg_n, self.mask_sum, self.count)

    def empty_pairs(self) -> bool:
        """Whether the masks hold no foreground voxel at all (for some batch entry)."""
        return bool((self.fg_n <= 0).any())


def feature_stats(feats: torch.Tensor, masks: torch.Tensor) -> ContextStats:
    """Stats of ``n`` encoded pairs per batch entry: clusters ``(B, n, K, *S)``, masks ``(B, n, 1, *S)``.

    At inference a case is encoded once and this gives its stats for every label.
    """
    b, n = feats.shape[:2]
    m = masks.to(feats.dtype)
    space = tuple(range(3, feats.dim()))
    fg = (feats * m).sum(dim=space).sum(1)
    total = feats.sum(dim=space).sum(1)
    fg_n = m.flatten(1).sum(1)
    cells = n * float(torch.tensor(feats.shape[3:]).prod())
    return ContextStats(
        fg=fg,
        bg=total - fg,
        fg_n=fg_n,
        bg_n=cells - fg_n,
        mask_sum=m.sum(1),
        count=torch.full((b,), float(n), device=feats.device),
    )


class MultiScaleFilters(nn.Module):
    """Fixed features of an image at several scales: the image area-downscaled by ``s``, its gradient
    magnitude (Sobel) and its Laplacian, each upsampled back; rotation-invariant on purpose, so that
    flipped or rotated queries look alike.

    Shapes: ``(N, C, *S)`` → ``(N, 3 * C * len(scales), *S)``.
    """

    def __init__(self, in_channels: int, dim: int, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.dim, self.channels, self.scales = dim, in_channels, tuple(scales)
        bank = filter_bank(("sobel", "laplacian"), dim)  # dim gradient kernels, then the Laplacian
        self.n_kernels = int(bank.shape[0])
        self.register_buffer("weight", bank.repeat(in_channels, *([1] * dim)).unsqueeze(1))

    @property
    def out_channels(self) -> int:
        """Features per cell."""
        return 3 * self.channels * len(self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d if self.dim == 2 else F.conv3d
        mode = "bilinear" if self.dim == 2 else "trilinear"
        size = x.shape[2:]
        feats = []
        for s in self.scales:
            g = x if s == 1 else F.interpolate(x, size=[max(1, n // s) for n in size], mode="area")
            d = conv(pad(g, 1, "replicate"), self.weight.to(g.dtype), groups=self.channels)
            d = d.view(g.shape[0], self.channels, self.n_kernels, *g.shape[2:])
            grad = (d[:, :, : self.dim].pow(2).sum(2) + 1e-6).sqrt() * 2.0  # Sobel/8: back to ~unit scale
            f = torch.cat([g, grad, d[:, :, self.dim]], dim=1)
            if s != 1:
                f = F.interpolate(f, size=size, mode=mode, align_corners=False)
            feats.append(f)
        return torch.cat(feats, dim=1)


class InContextNCA(nn.Module):
    """The in-context segmentation NCA (see the module docstring).

    Args:
        cfg: Its :class:`InContextModelConfig`.
    """

    def __init__(self, cfg: InContextModelConfig) -> None:
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        conv = nn.Conv2d if cfg.dim == 2 else nn.Conv3d
        self.filters = MultiScaleFilters(cfg.in_channels, cfg.dim, cfg.scales)
        self.encoder = nn.Sequential(
            conv(self.filters.out_channels, cfg.encoder_hidden, 1),
            nn.ReLU(),
            conv(cfg.encoder_hidden, cfg.encoder_hidden, 1),
            nn.ReLU(),
            conv(cfg.encoder_hidden, cfg.clusters, 1),
        )
        # the fixed intensity bins of encode(): levels in z-score units, and their learned weight
        self.register_buffer("levels_buffer", torch.linspace(-2.5, 2.5, cfg.clusters))
        self.bins = nn.Parameter(torch.tensor(1.0))
        self.code = nn.Linear(2 * cfg.clusters + 1, cfg.code_dim) if cfg.code_dim else None
        base = NCAConfig(
            channels=cfg.channels,
            fixed_channels=cfg.fixed_channels,
            hidden=cfg.hidden,
            dim=cfg.dim,
            filters=cfg.filters,
            fire_rate=cfg.fire_rate,
            cond_channels=cfg.code_dim,
            padding=cfg.padding,
        )
        self.levels = nn.ModuleList(NCA(replace(base, learned_kernel=k)) for k in cfg.kernels)

    # ------------------------------------------------------------------ context
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Soft cluster assignment of every cell: ``(N, C, *S)`` → ``(N, K, *S)``, summing to 1.

        The logits are the learned encoder's plus ``bins`` × a fixed soft binning of the mean
        intensity (Gaussian bumps on evenly spaced levels of the z-scored image), so that an untrained
        model already pools intensity histograms of any contrast, and training refines them.
        """
        logits = self.encoder(self.filters(image)).float()
        x = image.float().mean(dim=1, keepdim=True)
        view = (1, -1, *([1] * (image.dim() - 2)))
        levels = self.levels_buffer.view(view)
        width = float(self.levels_buffer[1] - self.levels_buffer[0])
        return torch.softmax(logits - self.bins * (x - levels).pow(2) / (2 * width**2), dim=1)

    def pair_stats(self, images: torch.Tensor, masks: torch.Tensor) -> ContextStats:
        """Stats of ``n`` pairs per batch entry: images ``(B, n, C, *S)``, masks ``(B, n, 1, *S)`` in [0, 1]."""
        b, n = images.shape[:2]
        feats = self.encode(images.flatten(0, 1)).view(b, n, self.cfg.clusters, *images.shape[3:])
        return feature_stats(feats, masks)

    def context_stats(self, images: torch.Tensor, masks: torch.Tensor, chunk: int = 0) -> ContextStats:
        """Stats of the k pairs of each batch entry, ``chunk`` pairs at a time.

        With ``chunk > 0`` only the last ``chunk`` pairs keep gradients; the others are encoded
        without a graph, one chunk after the other, so memory does not grow with k (Neuroverse3D).
        The context order is random in training, so which pairs teach the encoder is random too.

        Args:
            images: ``(B, k, C, *S)``.
            masks: ``(B, k, 1, *S)``.
            chunk: Pairs per chunk (0: all at once, all with gradients).
        """
        k = images.shape[1]
        if chunk <= 0 or k <= chunk:
            return self.pair_stats(images, masks)
        split = k - chunk
        parts = []
        with torch.no_grad():
            for start in range(0, split, chunk):
                stop = min(start + chunk, split)
                parts.append(self.pair_stats(images[:, start:stop], masks[:, start:stop]))
        return ContextStats.total(parts).detach() + self.pair_stats(images[:, split:], masks[:, split:])

    # ------------------------------------------------------------------ query
    def priors(self, feats: torch.Tensor, stats: ContextStats) -> dict[str, torch.Tensor]:
        """Every prior of :data:`PRIORS` for query clusters ``feats (B, K, *S)``, each ``(B, 1, *S)``."""
        view = (feats.shape[0], -1, *([1] * (feats.dim() - 2)))
        p_fg = (stats.fg / stats.fg_n.clamp(min=1.0)[:, None]).view(view)
        p_bg = (stats.bg / stats.bg_n.clamp(min=1.0)[:, None]).view(view)
        lik_fg = ((feats * p_fg).sum(1, keepdim=True) + EPS).log()
        lik_bg = ((feats * p_bg).sum(1, keepdim=True) + EPS).log()
        share = (stats.fg_n + 1.0) / (stats.fg_n + stats.bg_n + 2.0)
        odds = (share / (1.0 - share)).log().view(view)
        mean_mask = stats.mask_sum / stats.count.clamp(min=1.0).view(view)
        return {"bayes": lik_fg - lik_bg + odds, "likelihood": lik_fg, "mean_mask": 2.0 * mean_mask - 1.0}

    def task_code(self, stats: ContextStats) -> torch.Tensor | None:
        """``(B, code_dim)``: the pooled histograms and the structure's share through a linear layer."""
        if self.code is None:
            return None
        p_fg = stats.fg / stats.fg_n.clamp(min=1.0)[:, None]
        p_bg = stats.bg / stats.bg_n.clamp(min=1.0)[:, None]
        share = ((stats.fg_n + 1.0) / (stats.fg_n + stats.bg_n + 2.0)).log()[:, None]
        return self.code(torch.cat([p_fg, p_bg, share], dim=1))

    def segment(
        self, query: torch.Tensor, stats: ContextStats, checkpoint_every: int = 0, return_states: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Segment ``query (B, C, *S)`` given context ``stats`` (batch entries paired).

        Returns:
            ``(logits, bayes)``: the NCA's logits ``(B, 1, *S)`` and the naive Bayes prior logit
            ``(B, 1, *S)`` (a baseline in itself; training puts an auxiliary loss on it). With
            ``return_states`` also every state of the last level (animation, tests).
        """
        cfg = self.cfg
        feats = self.encode(query)
        priors = self.priors(feats, stats)
        dense = [query.to(feats.dtype), *(priors[p] for p in cfg.priors), *([feats] if cfg.features else [])]
        fixed = torch.cat(dense, dim=1)
        code = self.task_code(stats)
        pyramid = image_pyramid(fixed, cfg.levels, cfg.scale)
        nfix = cfg.fixed_channels
        bayes = cfg.in_channels + cfg.priors.index("bayes") if "bayes" in cfg.priors else None
        state = fixed.new_zeros(0)
        states: list[torch.Tensor] = []
        for level, nca in enumerate(self.levels):
            fix = pyramid[level]
            if level == 0:
                rest = fix.new_zeros((fix.shape[0], cfg.channels - nfix, *fix.shape[2:]))
                if bayes is not None:  # the output starts as the prior (an untrained model outputs it)
                    rest[:, 0] = fix[:, bayes]
            else:
                rest = F.interpolate(state[:, nfix:], size=fix.shape[2:], mode="nearest")
                if bayes is not None:  # the prior's detail the coarser level could not see (thin parts)
                    coarse = F.interpolate(pyramid[level - 1][:, bayes : bayes + 1], size=fix.shape[2:])
                    rest[:, :1] += fix[:, bayes : bayes + 1] - coarse
            state = torch.cat([fix, rest], dim=1)
            check_level_size(state.shape[2:], cfg.kernels[level], cfg.padding, level)
            if return_states and level == len(self.levels) - 1:
                state, states = nca(state, cfg.steps[level], cond=code, return_states=True)
            else:
                state = nca(state, cfg.steps[level], cond=code, checkpoint_every=checkpoint_every)
        logits = state[:, nfix : nfix + 1]
        if return_states:
            return logits, priors["bayes"], states
        return logits, priors["bayes"]

    def forward(
        self,
        query: torch.Tensor,
        context: torch.Tensor,
        context_masks: torch.Tensor,
        chunk: int = 0,
        checkpoint_every: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of episodes: ``query (B, C, *S)``, ``context (B, k, C, *S)``, masks
        ``(B, k, 1, *S)`` → ``(logits, bayes)`` as :meth:`segment`."""
        stats = self.context_stats(context, context_masks, chunk)
        out = self.segment(query, stats, checkpoint_every)
        return out[0], out[1]

    @torch.no_grad()
    def predict_proba(self, query: torch.Tensor, stats: ContextStats) -> torch.Tensor:
        """Foreground probabilities ``(B, 1, *S)``."""
        return torch.sigmoid(self.segment(query, stats)[0].float())


def saved_bytes(model: InContextNCA, k: int, chunk: int, size: tuple[int, ...], batch: int = 8) -> int:
    """Bytes autograd keeps for backward in one training forward of ``batch`` seeded random queries
    of ``size`` with ``k`` context pairs each, context chunks of ``chunk`` pairs (0 = none): what the
    chunking bounds (tests and ``benchmarks/incontext``)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    torch.manual_seed(0)
    q, ctx = torch.randn(batch, 1, *size), torch.randn(batch, k, 1, *size)
    masks = (torch.rand(batch, k, 1, *size) > 0.5).float()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(q, ctx, masks, chunk=chunk)
    return total
