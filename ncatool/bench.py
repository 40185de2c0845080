"""Speed and memory of ncatool's NCA core against the naive reference (:mod:`ncatool.bench_reference`).

What is compared
    - *naive*: :mod:`ncatool.bench_reference`, plain PyTorch written the way the public ports write
      Growing NCA (and a two-level M3D-NCA counterpart), run in **its own subprocess** with PyTorch's
      defaults: none of ncatool's process-wide settings (allocator, environment) reach it;
      ``GLIBC_TUNABLES``/``THP_MEM_ALLOC_ENABLE``/``MALLOC_*`` are removed from its environment.
    - *ncatool*: :class:`ncatool.models.nca.NCA` / :class:`~ncatool.models.segmentation.SegmentationNCA`
      run **in this process** with ncatool's settings (:func:`ncatool.perf.tune_process`), in one or
      more *variants*: ``fp32``, ``bf16`` (autocast), ``+ckptN`` (gradient checkpointing every N steps).
    Both get the same sizes, steps, thread count, seed and weights (copied from the ncatool model into
    the reference), so they compute the same trajectory in float32.

Speed
    Cell-updates/s = cells x steps / wall seconds of one run (3D: summed over levels). A training run
    is forward through all steps, loss, backward and an Adam step; an inference run is the forward
    under ``no_grad``. One warm-up run each is excluded; then the naive and the ncatool variants run
    in turn (alternating) ``repeats`` times and the median is reported. CPU seconds are recorded too:
    on a shared machine ``cpu / wall`` well under the thread count shows the run was starved.

Memory
    Each (workload, implementation) runs once more in a **fresh** subprocess: setup, a tiny warm-up
    (so library code is paged in), then one run. Peak memory = ``ru_maxrss`` after the run minus the
    resident set just before it: the run's own working memory, including allocator fragmentation
    and caching (the naive process uses glibc's defaults, ncatool its tuned allocator). On CUDA it is
    ``torch.cuda.max_memory_allocated`` over the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ncatool.errors import NcaError

#: Multiply-adds per cell per step: Growing NCA (Sobel perception 16*2*9 + MLP 48*128 + 128*16).
MACS_GROWING = 16 * 2 * 9 + 48 * 128 + 128 * 16
#: Targets from the performance issue: speed-up (fast / naive cell-updates/s) and memory ratio.
TARGETS = {"train2d": ("speedup", 4.0), "infer2d": ("speedup", 6.0), "train3d": ("memory", 0.25)}
#: The sizes the targets are defined for: (size, batch, steps) per kind.
TARGET_SIZES = {
    "train2d": [((64, 64), 8, (64,))],
    "infer2d": [((64, 64), 8, (64,))],
    "train3d": [((32, 32, 32), 2, (10, 10)), ((64, 64, 64), 2, (10, 10))],
}
_STRIP_ENV = ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD", "NCATOOL_MALLOPT")


@dataclass(frozen=True)
class Workload:
    """One benchmark case.

    Attributes:
        kind: ``infer2d``, ``train2d``, ``infer3d`` or ``train3d``.
        size: Spatial size (2D: Growing NCA state; 3D: the full-resolution volume).
        batch: Batch size.
        steps: Steps (2D) or steps per level (3D, coarse first; level 0 runs at half resolution).
        time: Include in the timing phase.
        memory: Include in the memory phase.
        variants: ncatool variants to run (``fp32``, ``bf16``, with optional ``+ckptN``).
    """

    kind: str
    size: tuple[int, ...]
    batch: int
    steps: tuple[int, ...]
    time: bool = True
    memory: bool = True
    variants: tuple[str, ...] = ("fp32", "bf16")

    @property
    def dim(self) -> int:
        return len(self.size)

    @property
    def mode(self) -> str:
        return "train" if self.kind.startswith("train") else "infer"

    @property
    def label(self) -> str:
        """E.g. ``train2d 64^2 b8 s64`` or ``train3d 32^3 b2 s10+10``."""
        steps = "+".join(str(s) for s in self.steps)
        if len(set(self.size)) == 1:
            size = f"{self.size[0]}^{self.dim}"
        else:
            size = "x".join(str(s) for s in self.size)
        return f"{self.kind} {size} b{self.batch} s{steps}"

    @property
    def cell_updates(self) -> int:
        """Cell-updates in one run (3D: level 0 at half resolution, level 1 at full)."""
        cells = self.batch
        for s in self.size:
            cells *= s
        if self.dim == 2:
            return cells * self.steps[0]
        coarse = self.batch
        for s in self.size:
            coarse *= s // 2
        return coarse * self.steps[0] + cells * self.steps[1]

    def spec(self, device: str, seed: int) -> dict[str, Any]:
        """The JSON spec both workers understand."""
        steps: Any = self.steps[0] if self.dim == 2 else list(self.steps)
        return {
            "dim": self.dim,
            "mode": self.mode,
            "size": list(self.size),
            "batch": self.batch,
            "steps": steps,
            "device": device,
            "seed": seed,
        }


def default_workloads(
    quick: bool = False,
    size2d: int | None = None,
    batch2d: int | None = None,
    steps2d: int | None = None,
    sizes3d: Sequence[int] | None = None,
    batch3d: int | None = None,
) -> list[Workload]:
    """The issue's cases (or small ones with ``quick``), with optional overrides.

    Full: 2D 64x64, batch 8, 64 steps (inference, training); 3D two levels, 10+10 steps, batch 2:
    inference at the largest 3D size, training timed at the smallest and its memory at every size
    (32^3 and 64^3).
    """
    s2 = size2d or (32 if quick else 64)
    b2 = batch2d or (4 if quick else 8)
    n2 = steps2d or (16 if quick else 64)
    s3 = list(sizes3d or ((16,) if quick else (32, 64)))
    b3 = batch3d or (1 if quick else 2)
    n3 = (4, 4) if quick else (10, 10)
    out = [
        Workload("infer2d", (s2, s2), b2, (n2,)),
        Workload("train2d", (s2, s2), b2, (n2,)),
        Workload("infer3d", (s3[-1],) * 3, b3, n3),
    ]
    ckpt = ("fp32", "bf16", "fp32+ckpt1") if quick else ("fp32", "bf16", "fp32+ckpt1", "bf16+ckpt1")
    for i, s in enumerate(s3):
        out.append(Workload("train3d", (s,) * 3, b3, n3, time=i == 0, variants=ckpt))
    return out


def fused_kernels_available() -> bool:
    """Whether the fast step runs on the compiled CPU kernels here (:mod:`ncatool.models.kernels`)."""
    from ncatool.models import kernels

    return kernels.library() is not None


def parse_variant(name: str) -> tuple[str, int]:
    """``"bf16+ckpt2"`` → ``("bf16", 2)``.

    Raises:
        NcaError: Unknown variant.
    """
    base, _, rest = name.partition("+")
    if base not in ("fp32", "bf16") or (rest and not (rest.startswith("ckpt") and rest[4:].isdigit())):
        raise NcaError(f"unknown variant {name!r}: use fp32 or bf16, optionally +ckptN")
    return base, int(rest[4:]) if rest else 0


# --------------------------------------------------------------------------------------------------
# the ncatool side


def growing_config() -> Any:
    """The Growing NCA of the reference on ncatool's core."""
    from ncatool.models.nca import NCAConfig

    return NCAConfig(
        channels=16,
        fixed_channels=0,
        hidden=128,
        filters=("sobel",),
        fire_rate=0.5,
        alive_channel=3,
        padding="zeros",
    )


def seg3d_config(steps: Sequence[int] = (10, 10)) -> Any:
    """The two-level 3D segmentation NCA of the reference (ncatool's ``seg3d`` defaults)."""
    from ncatool.models.segmentation import SegModelConfig

    return SegModelConfig(
        dim=3,
        in_channels=1,
        n_out=1,
        channels=16,
        hidden=64,
        levels=2,
        scale=2,
        steps=tuple(int(s) for s in steps),
        kernels=(7, 3),
        filters=("learned",),
        fire_rate=0.5,
        padding="reflect",
        patch=(0, 0),
    )


def reference_state_dict(model: Any) -> dict[str, Any]:
    """The ncatool model's weights in the naive reference's layout (same function, same numbers).

    2D: ncatool's features are ``[x | (c0: d/dy, d/dx), (c1: ...) ...]``, the reference's
    ``[x | d/dx (all c) | d/dy (all c)]``. 3D: the same features, renamed.
    """
    from ncatool.models.nca import NCA

    if isinstance(model, NCA):
        c = model.cfg.channels
        order = list(range(c)) + [c + 2 * i + 1 for i in range(c)] + [c + 2 * i for i in range(c)]
        ref = model.state_dict()
        ref_w = ref["rule.fc0.weight"][:, order]
        out = {
            "fc0.weight": ref_w.clone(),
            "fc0.bias": ref["rule.fc0.bias"].clone(),
            "fc1.weight": ref["rule.fc1.weight"].clone(),
        }
        fixed = ref["perception.fixed_weight"]  # (2C, 1, 3, 3): per channel d/dy, d/dx
        out["sobel_x"] = fixed[1::2].clone()
        out["sobel_y"] = fixed[0::2].clone()
        return out
    out = {}
    for name, value in model.state_dict().items():
        new = name.replace("perception.learned.", "convs.").replace("rule.", "")
        if "fixed_weight" in new:
            continue
        out[new] = value.clone()
    return out


def _import_reference() -> Any:
    """The naive reference module (:mod:`ncatool.bench_reference`, part of the package)."""
    from ncatool import bench_reference

    return bench_reference


def build_fast(spec: dict[str, Any], variant: str) -> tuple[Any, Callable[[], Any]]:
    """ncatool's model for ``spec`` and a ``run()`` closure, as ``bench_reference.build_workload``."""
    import torch

    amp, every = parse_variant(variant)
    device = torch.device(spec.get("device", "cpu"))
    torch.manual_seed(int(spec.get("seed", 0)))
    batch, size, steps = int(spec["batch"]), [int(s) for s in spec["size"]], spec["steps"]
    model: Any
    if spec["dim"] == 2:
        from ncatool.models.nca import NCA

        model = NCA(growing_config())
        x0 = torch.rand(batch, 16, *size)
        target = torch.rand(batch, 4, *size)
    else:
        from ncatool.models.segmentation import SegmentationNCA

        model = SegmentationNCA(seg3d_config(steps))
        x0 = torch.rand(batch, 1, *size)
        target = torch.rand(batch, 1, *size)
    # The zero-initialised last layer would make every run trivial: give it small weights (the
    # reference gets the same through reference_state_dict).
    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)) + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("fc1.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.to(device)
    x0, target = x0.to(device), target.to(device)
    train = spec["mode"] == "train"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3) if train else None
    dtype = torch.bfloat16 if amp == "bf16" else None

    def forward() -> Any:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if spec["dim"] == 2:
                out = model(x0, int(steps), checkpoint_every=every)[:, :4]
            else:
                out = model(x0, checkpoint_every=every).logits
        return out.float()

    def run() -> Any:
        if not train:
            with torch.no_grad():
                return forward()
        assert opt is not None
        opt.zero_grad()
        loss = (forward() - target).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    return model, run


def _timed(run: Callable[[], Any], device: str) -> dict[str, float]:
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    if cuda:
        torch.cuda.synchronize()
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}


def serve() -> None:
    """The ncatool-side worker for fresh-process memory runs (same protocol as the reference's)."""
    from ncatool.perf import tune_process

    threads = None
    tuned = tune_process(threads)
    import torch

    ref = _import_reference()
    run: Callable[[], Any] | None = None
    spec: dict[str, Any] = {}
    variant = "fp32"
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        reply: dict[str, Any] = {"ok": True, "malloc_tuned": tuned["malloc_tuned"]}
        if cmd == "setup":
            spec, variant = req["spec"], req.get("variant", "fp32")
            torch.set_num_threads(int(req["threads"]))
            _, run = build_fast(spec, variant)
            reply["threads"] = torch.get_num_threads()
        elif cmd == "warmup":
            tiny = dict(spec, size=[8] * len(spec["size"]), batch=1)
            _, tiny_run = build_fast(tiny, variant)
            tiny_run()
        elif cmd == "run":
            assert run is not None
            cuda = spec.get("device", "cpu").startswith("cuda")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            import gc

            gc.collect()
            reply["peak_reset"] = ref._reset_peak()
            before = ref._rss_bytes()
            reply.update(_timed(run, spec.get("device", "cpu")))
            reply.update(rss_before=before, maxrss=ref._maxrss_bytes())
            if cuda:
                reply["cuda_peak"] = torch.cuda.max_memory_allocated()
        elif cmd == "quit":
            print(json.dumps(reply), flush=True)
            return
        print(json.dumps(reply), flush=True)


# --------------------------------------------------------------------------------------------------
# subprocess workers


class _Worker:
    """A benchmark worker subprocess speaking JSON lines."""

    def __init__(self, impl: str) -> None:
        env = dict(os.environ)
        if impl == "naive":
            for key in list(env):
                if key in _STRIP_ENV or key.startswith("MALLOC_"):
                    env.pop(key)
            # the reference imports nothing from ncatool: the worker runs on PyTorch's defaults
            args = [sys.executable, "-m", "ncatool.bench_reference", "--worker"]
        else:
            args = [sys.executable, "-m", "ncatool.bench", "--worker"]
        # stderr to a file, not a pipe: a chatty worker must not block on a full pipe
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
        )

    def request(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.proc.wait(timeout=30)
            self.log.seek(0)
            raise NcaError(f"benchmark worker died: {self.log.read().strip()[-2000:]}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise NcaError(f"benchmark worker: {reply.get('error')}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(NcaError):
                self.request(cmd="quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# --------------------------------------------------------------------------------------------------
# the driver


@dataclass
class Measurement:
    """One (workload, implementation) line of the report."""

    workload: str
    kind: str
    impl: str  # naive | ncatool
    variant: str  # naive | fp32 | bf16 | ...
    cell_updates: int
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None

    @property
    def median_wall(self) -> float | None:
        return statistics.median(self.wall_s) if self.wall_s else None

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        med = self.median_wall
        out["median_wall_s"] = med
        out["cell_updates_per_s"] = self.cell_updates / med if med else None
        out["median_cpu_s"] = statistics.median(self.cpu_s) if self.cpu_s else None
        return out


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_benchmarks(
    workloads: Sequence[Workload],
    repeats: int = 3,
    threads: int | None = None,
    device: str = "cpu",
    memory: bool = True,
    timing: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    settle: float = 1.0,
) -> dict[str, Any]:
    """Measure every workload for the naive reference and ncatool's variants.

    Args:
        workloads: Cases (see :func:`default_workloads`).
        repeats: Timed runs per implementation (median reported), after one warm-up.
        threads: Intra-op threads for both sides (None: this process's current count).
        device: ``cpu`` or ``cuda[:N]``.
        memory: Run the fresh-process memory phase.
        timing: Run the alternating timing phase.
        seed: Seed for weights and inputs.
        progress: Called with a short line before each step.
        settle: Seconds to wait before each timed run. The OpenMP threads of the process that just
            ran keep spinning for a while; without the pause they take a core from the next run
            (measured: 64x64x8 inference 10 s instead of 0.2 s right after the other process).

    Returns:
        A JSON-ready dict: ``machine``, ``config``, ``results`` (one per workload and
        implementation), ``ratios`` (ncatool variant vs naive) and ``targets``.
    """
    from ncatool.perf import tune_process

    settings = tune_process(threads)
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NcaError("--device cuda: CUDA is not available here")
    threads = torch.get_num_threads()
    say = progress or (lambda _msg: None)
    load_before = _load()
    results: dict[tuple[str, str], Measurement] = {}

    def entry(w: Workload, variant: str) -> Measurement:
        key = (w.label, variant)
        if key not in results:
            impl = "naive" if variant == "naive" else "ncatool"
            results[key] = Measurement(w.label, w.kind, impl, variant, w.cell_updates)
        return results[key]

    tmp = Path(tempfile.mkdtemp(prefix="ncatool-bench-"))
    try:
        weights: dict[str, str] = {}
        for i, w in enumerate(workloads):
            model, _ = build_fast(w.spec("cpu", seed), "fp32")
            path = tmp / f"ref_{i}.pt"
            torch.save(reference_state_dict(model), path)
            weights[w.label] = str(path)

        if timing:
            naive = _Worker("naive")
            try:
                for w in (w for w in workloads if w.time):
                    spec = w.spec(device, seed)
                    say(f"timing {w.label}: setup")
                    naive.request(cmd="setup", spec=spec, threads=threads, weights=weights[w.label])
                    fast = {v: build_fast(spec, v)[1] for v in w.variants}
                    naive.request(cmd="run")  # warm-up
                    for run in fast.values():
                        _timed(run, device)
                    for r in range(repeats):
                        say(f"timing {w.label}: repeat {r + 1}/{repeats}")
                        time.sleep(settle)
                        got = naive.request(cmd="run")
                        m = entry(w, "naive")
                        m.wall_s.append(got["wall"])
                        m.cpu_s.append(got["cpu"])
                        for v, run in fast.items():
                            time.sleep(settle)
                            t = _timed(run, device)
                            m = entry(w, v)
                            m.wall_s.append(t["wall"])
                            m.cpu_s.append(t["cpu"])
                    del fast
            finally:
                naive.close()

        if memory:
            for w in (w for w in workloads if w.memory):
                spec = w.spec(device, seed)
                for v in ("naive", *w.variants):
                    say(f"memory {w.label}: {v}")
                    worker = _Worker("naive" if v == "naive" else "ncatool")
                    try:
                        worker.request(
                            cmd="setup", spec=spec, threads=threads, weights=weights[w.label], variant=v
                        )
                        worker.request(cmd="warmup")
                        got = worker.request(cmd="run")
                    finally:
                        worker.close()
                    m = entry(w, v)
                    if "cuda_peak" in got:
                        m.peak_bytes = int(got["cuda_peak"])
                    else:
                        m.peak_bytes = max(0, int(got["maxrss"]) - int(got["rss_before"]))
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()

    rows = [m.summary() for m in results.values()]
    ratios = []
    for w in workloads:
        base = results.get((w.label, "naive"))
        if base is None:
            continue
        for v in w.variants:
            m = results.get((w.label, v))
            if m is None:
                continue
            speed = base.median_wall / m.median_wall if base.median_wall and m.median_wall else None
            mem = m.peak_bytes / base.peak_bytes if m.peak_bytes and base.peak_bytes else None
            ratios.append(
                {"workload": w.label, "kind": w.kind, "variant": v, "speedup": speed, "memory_ratio": mem}
            )
    targets = []
    at_size = {
        w.label for w in workloads if (tuple(w.size), w.batch, tuple(w.steps)) in TARGET_SIZES.get(w.kind, [])
    }
    for kind, (what, bound) in TARGETS.items():
        cands = [r for r in ratios if r["kind"] == kind and r["workload"] in at_size]
        key = "speedup" if what == "speedup" else "memory_ratio"
        for r in cands:
            value = r[key]
            if value is None:
                continue
            met = value >= bound if what == "speedup" else value <= bound
            targets.append(
                {"workload": r["workload"], "variant": r["variant"], what: value, "bound": bound, "met": met}
            )
    return {
        "machine": {
            "device": device,
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(),
            "threads": threads,
            "malloc_tuned": settings["malloc_tuned"],
            "fused_kernels": fused_kernels_available(),
            "glibc": settings["glibc"],
            "load_before": load_before,
            "load_after": _load(),
            "python": sys.version.split()[0],
        },
        "config": {
            "repeats": repeats,
            "seed": seed,
            "settle_s": settle,
            "workloads": [asdict(w) for w in workloads],
        },
        "macs_per_cell_step_2d": MACS_GROWING,
        "results": rows,
        "ratios": ratios,
        "targets": targets,
    }


def format_report(report: dict[str, Any]) -> Any:
    """A Rich table of the report (one row per workload and implementation)."""
    from rich.table import Table

    mach = report["machine"]
    title = (
        f"ncatool bench: {mach['device']}, {mach['threads']} threads, torch {mach['torch']}, "
        f"load {mach['load_before']} -> {mach['load_after']} ({mach['cores']} cores)"
    )
    table = Table(title=title)
    for col in (
        "workload",
        "impl",
        "M cell-upd/s",
        "median s",
        "cpu/wall",
        "peak MB",
        "speed-up",
        "mem ratio",
    ):
        table.add_column(col, justify="left" if col in ("workload", "impl") else "right")
    ratio = {(r["workload"], r["variant"]): r for r in report["ratios"]}
    for row in report["results"]:
        rate = row["cell_updates_per_s"]
        med = row["median_wall_s"]
        cpu = row["median_cpu_s"]
        r = ratio.get((row["workload"], row["variant"]), {})
        util = f"{cpu / med:.2f}" if cpu and med else ""
        table.add_row(
            row["workload"],
            row["variant"] if row["impl"] == "ncatool" else "naive",
            f"{rate / 1e6:.2f}" if rate else "",
            f"{med:.3f}" if med else "",
            util,
            f"{row['peak_bytes'] / 2**20:.0f}" if row["peak_bytes"] is not None else "",
            f"{r['speedup']:.2f}x" if r.get("speedup") else "",
            f"{r['memory_ratio']:.2f}" if r.get("memory_ratio") else "",
        )
    return table


if __name__ == "__main__":
    if "--worker" in sys.argv:
        serve()
