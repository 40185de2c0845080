"""The naive reference NCAs that ``ncatool bench`` compares against.

Written the way the public PyTorch ports of Growing NCA write it (plain eager PyTorch, NCHW, one
depthwise ``conv2d`` per Sobel kernel, ``torch.cat``, a 1x1-convolution MLP, ``torch.rand`` fire
mask, max-pool alive mask), with no tuning of any kind. Do not optimise this file: it is the
yardstick. It imports nothing from ``ncatool`` so that it runs in a plain PyTorch process (the
worker starts as ``python -m ncatool.bench_reference``, which loads only the package's light
``__init__``). It is part of the package so that ``ncatool bench`` runs wherever ncatool is installed.

- :class:`NaiveGrowingNCA`: 16 channels, identity + Sobel x/y perception (48 features), MLP
  48 -> 128 -> 16 (last layer zero-initialised, no bias), fire rate 0.5, alive mask on channel 3.
  Work per cell-step: 16*2*9 (Sobel) + 48*128 + 128*16 = 8,480 multiply-adds.
- :class:`NaiveSeg3D`: a two-level M3D-NCA counterpart of ``ncatool``'s ``seg3d`` model (level 0 on
  the volume downscaled by ``scale``, level 1 at full resolution on the upsampled hidden state
  concatenated with the image; identity + ``n_learned`` learned depthwise ``conv3d`` per level,
  reflect padding, MLP -> ``hidden`` -> channels - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
SOBEL_Y = SOBEL_X.t().contiguous()


class NaiveGrowingNCA(nn.Module):
    """Growing NCA (Mordvintsev et al. 2020) as a straightforward PyTorch port.

    Args:
        channels: State channels.
        hidden: MLP width.
        fire_rate: Probability that a cell updates in a step.
        alive_channel: Channel whose 3x3 max-pool > 0.1 marks living cells (None: no alive mask).
    """

    def __init__(
        self, channels: int = 16, hidden: int = 128, fire_rate: float = 0.5, alive_channel: int | None = 3
    ) -> None:
        super().__init__()
        self.channels = channels
        self.fire_rate = fire_rate
        self.alive_channel = alive_channel
        self.fc0 = nn.Conv2d(channels * 3, hidden, 1)
        self.fc1 = nn.Conv2d(hidden, channels, 1, bias=False)
        nn.init.zeros_(self.fc1.weight)
        self.register_buffer("sobel_x", SOBEL_X.repeat(channels, 1, 1, 1))
        self.register_buffer("sobel_y", SOBEL_Y.repeat(channels, 1, 1, 1))

    def perceive(self, x: torch.Tensor) -> torch.Tensor:
        gx = F.conv2d(x, self.sobel_x, padding=1, groups=self.channels)
        gy = F.conv2d(x, self.sobel_y, padding=1, groups=self.channels)
        return torch.cat([x, gx, gy], dim=1)

    def alive(self, x: torch.Tensor) -> torch.Tensor:
        a = x[:, self.alive_channel : self.alive_channel + 1]
        return F.max_pool2d(a, kernel_size=3, stride=1, padding=1) > 0.1

    def step(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One step; ``mask`` (B, 1, H, W) overrides the random fire mask (for comparisons)."""
        if self.alive_channel is not None:
            pre = self.alive(x)
        dx = self.fc1(F.relu(self.fc0(self.perceive(x))))
        if mask is None:
            mask = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < self.fire_rate).float()
        x = x + dx * mask
        if self.alive_channel is not None:
            post = self.alive(x)
            x = x * (pre & post).float()
        return x

    def forward(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        for _ in range(steps):
            x = self.step(x)
        return x


class NaiveNCA3D(nn.Module):
    """One level of the 3D segmentation NCA: the first channel (image) is never updated."""

    def __init__(self, channels: int, hidden: int, kernel: int, n_learned: int, fire_rate: float) -> None:
        super().__init__()
        self.fire_rate = fire_rate
        self.pad = kernel // 2
        self.convs = nn.ModuleList(
            nn.Conv3d(channels, channels, kernel, groups=channels) for _ in range(n_learned)
        )
        self.fc0 = nn.Conv3d(channels * (1 + n_learned), hidden, 1)
        self.fc1 = nn.Conv3d(hidden, channels - 1, 1, bias=False)
        nn.init.zeros_(self.fc1.weight)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        xp = F.pad(x, [self.pad] * 6, mode="reflect")
        p = torch.cat([x, *(conv(xp) for conv in self.convs)], dim=1)
        dx = self.fc1(F.relu(self.fc0(p)))
        mask = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < self.fire_rate).float()
        return torch.cat([x[:, :1], x[:, 1:] + dx * mask], dim=1)

    def forward(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        for _ in range(steps):
            x = self.step(x)
        return x


class NaiveSeg3D(nn.Module):
    """Two-level M3D-NCA on a one-channel volume, whole volume at both levels.

    Args:
        channels: State channels per level (image + outputs + hidden).
        hidden: MLP width.
        kernels: Learned kernel per level (coarse first).
        n_learned: Learned depthwise filters per level.
        scale: Resolution factor between the levels.
        fire_rate: Probability that a cell updates.
    """

    def __init__(
        self,
        channels: int = 16,
        hidden: int = 64,
        kernels: tuple[int, int] = (7, 3),
        n_learned: int = 2,
        scale: int = 2,
        fire_rate: float = 0.5,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.channels = channels
        self.levels = nn.ModuleList(NaiveNCA3D(channels, hidden, k, n_learned, fire_rate) for k in kernels)

    def forward(self, image: torch.Tensor, steps: tuple[int, int] = (10, 10)) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> logits ``(B, 1, D, H, W)``."""
        small = F.interpolate(image, scale_factor=1 / self.scale, mode="area")
        zeros = small.new_zeros(small.shape[0], self.channels - 1, *small.shape[2:])
        x = self.levels[0](torch.cat([small, zeros], dim=1), steps[0])
        hidden = F.interpolate(x[:, 1:], size=image.shape[2:], mode="nearest")
        x = self.levels[1](torch.cat([image, hidden], dim=1), steps[1])
        return x[:, 1:2]


# ---------------------------------------------------------------------------------------------------
# Benchmark worker: ``python -m ncatool.bench_reference --worker`` answers JSON lines on stdin/stdout
# (the protocol of ``ncatool.bench``). It runs with PyTorch's defaults: nothing here tunes the process.


def build_workload(spec: dict, weights: str | None = None) -> tuple[nn.Module, object]:
    """The naive model and a ``run()`` closure for one benchmark workload ``spec``."""
    device = torch.device(spec.get("device", "cpu"))
    torch.manual_seed(int(spec.get("seed", 0)))
    batch, size, steps = int(spec["batch"]), [int(s) for s in spec["size"]], spec["steps"]
    if spec["dim"] == 2:
        model: nn.Module = NaiveGrowingNCA()
        x0 = torch.rand(batch, 16, *size)
        target = torch.rand(batch, 4, *size)
    else:
        model = NaiveSeg3D()
        x0 = torch.rand(batch, 1, *size)
        target = torch.rand(batch, 1, *size)
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.to(device)
    x0, target = x0.to(device), target.to(device)
    train = spec["mode"] == "train"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3) if train else None

    def forward() -> torch.Tensor:
        if spec["dim"] == 2:
            return model(x0, int(steps))[:, :4]
        return model(x0, tuple(int(s) for s in steps))

    def run() -> torch.Tensor:
        if not train:
            with torch.no_grad():
                return forward()
        opt.zero_grad()
        out = forward()
        loss = (out - target).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    return model, run


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            import os

            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: ``5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    """Peak RSS since the last :func:`_reset_peak` (``VmHWM``), else the lifetime ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def serve(extra: dict | None = None) -> None:
    """Answer benchmark requests, one JSON object per line, until ``{"cmd": "quit"}``; ``extra`` is
    added to every reply (what the process that started the worker set up)."""
    import json
    import sys
    import time

    run = None
    spec: dict = {}
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        reply: dict = {"ok": True, **(extra or {})}
        if cmd == "setup":
            spec = req["spec"]
            torch.set_num_threads(int(req["threads"]))
            _, run = build_workload(spec, req.get("weights"))
            reply["threads"] = torch.get_num_threads()
        elif cmd == "warmup":
            # the workload's own ops on a tiny input, so library code is paged in before a memory run
            tiny = dict(spec, size=[8] * len(spec["size"]), batch=1)
            _, tiny_run = build_workload(tiny, None)
            tiny_run()
        elif cmd == "run":
            cuda = spec.get("device", "cpu").startswith("cuda")
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                reply["cuda_before"] = torch.cuda.memory_allocated()
            import gc

            gc.collect()
            reply["peak_reset"] = _reset_peak()
            before = _rss_bytes()
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                run()
                if cuda:
                    torch.cuda.synchronize()
            except torch.cuda.OutOfMemoryError as err:
                reply = {"ok": False, "oom": True, "error": f"out of memory: {str(err)[:300]}"}
            else:
                reply.update(wall=time.perf_counter() - t0, cpu=time.process_time() - c0)
                reply.update(rss_before=before, maxrss=_maxrss_bytes())
            if cuda:
                if reply["ok"]:
                    reply["cuda_peak"] = torch.cuda.max_memory_allocated()
                # the other benchmark processes share this GPU: give large caches back (the same
                # rule as ncatool.bench._timed)
                total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
                if not reply["ok"] or torch.cuda.memory_reserved() > 0.25 * total:
                    torch.cuda.empty_cache()
        elif cmd == "quit":
            print(json.dumps(reply), flush=True)
            return
        else:
            reply = {"ok": False, "error": f"unknown command {cmd!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    import sys

    if "--worker" in sys.argv:
        serve()
    else:
        print("usage: python -m ncatool.bench_reference --worker  (driven by `ncatool bench`)")
