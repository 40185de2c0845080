"""Speed and memory of ncatool's NCA core against the naive reference (:mod:`ncatool.bench_reference`).

What is compared
    - *naive*: :mod:`ncatool.bench_reference`, plain PyTorch written the way the public ports write
      Growing NCA (and a two-level M3D-NCA counterpart), run in **its own subprocess** with PyTorch's
      defaults, as ports run it: none of ncatool's process-wide settings (allocator, environment)
      reach it; ``GLIBC_TUNABLES``/``THP_MEM_ALLOC_ENABLE``/``MALLOC_*`` are removed from its
      environment.
    - *naive-tuned*: the same reference in another subprocess given exactly ncatool's allocator
      tuning (:func:`ncatool.perf.tune_malloc`, ncatool's environment). ncatool against *naive* is
      what a user of a port gains by switching; against *naive-tuned* it is the step's own gain
      (glibc's defaults alone cost a plain PyTorch NCA 2-3x on CPU).
    - *ncatool*: :class:`ncatool.models.nca.NCA` / :class:`~ncatool.models.segmentation.SegmentationNCA`
      run **in this process** with ncatool's settings (:func:`ncatool.perf.tune_process`), in one or
      more *variants*: ``fp32``, ``bf16`` (autocast), ``+ckptN`` (gradient checkpointing every N steps).
    All get the same sizes, steps, thread count, seed and weights (copied from the ncatool model into
    the reference), so they compute the same trajectory in float32.

Speed
    Cell-updates/s = cells x steps / wall seconds of one run (3D: summed over levels). A training run
    is forward through all steps, loss, backward and an Adam step; an inference run is the forward
    under ``no_grad``. One warm-up run each is excluded; then naive, naive-tuned and the ncatool
    variants run in turn (interleaved) ``repeats`` times and the median is reported. CPU seconds are
    recorded too: on a shared machine ``cpu / wall`` well under the thread count shows the run was
    starved.

Roofline
    Before the timing, :func:`ncatool.roofline.measure_ceilings` measures this machine's float32 and
    bf16 matrix-product ceilings and its copy bandwidth (a few seconds; ``roofline=False`` skips it);
    every result then carries its multiply-adds and bytes per cell-update and the fraction of its
    roof it reached (see :mod:`ncatool.roofline` for the work model).

Memory
    Each (workload, implementation) runs once more in a **fresh** subprocess: setup, a tiny warm-up
    (so library code is paged in), then one run. Peak memory = ``ru_maxrss`` after the run minus the
    resident set just before it: the run's own working memory, including allocator fragmentation
    and caching (the naive process uses glibc's defaults, ncatool its tuned allocator; naive-tuned
    is timed only). On CUDA the timing phase already records ``torch.cuda.max_memory_allocated``
    over each run minus what was allocated before it (the largest over the repeats), and the memory
    phase, if run, replaces it with the same from a fresh process. A CUDA run that runs out of
    memory is reported as such (``error``) instead of ending the benchmark.
"""

from __future__ import annotations

import contextlib
import functools
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
from typing import Any, NamedTuple

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
#: The two baselines: the reference as ports run it, and the same given ncatool's allocator tuning.
NAIVE, NAIVE_TUNED = "naive", "naive-tuned"
BASELINES = (NAIVE, NAIVE_TUNED)


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

    def work(self) -> tuple[float, float]:
        """``(multiply-adds, bytes)`` per cell-update (:func:`ncatool.roofline.work_per_cell_update`)."""
        from ncatool.roofline import work_per_cell_update

        return work_per_cell_update(self.kind, self.size, self.batch, self.steps)

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
    gpu: bool = False,
) -> list[Workload]:
    """The issue's cases (or small ones with ``quick``, or GPU-sized ones), with optional overrides.

    Full: 2D 64x64, batch 8, 64 steps (inference, training); 3D two levels, 10+10 steps, batch 2:
    inference at the largest 3D size, training timed at the smallest and its memory at every size
    (32^3 and 64^3). ``gpu``: see :func:`gpu_workloads` (the overrides do not apply).
    """
    if gpu:
        return gpu_workloads()
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


def gpu_workloads() -> list[Workload]:
    """GPU-sized cases: 2D 256x256, batch 32 (inference 64 steps; training 32 steps: the naive
    reference keeps ~0.9 KB per cell-step for its backward, 58 GB at 32 steps, 115 GB at 64); 3D two
    levels, 10+10 steps: 128^3 batch 2 inference and training, and a 256^3 M3D-NCA inference."""
    train = ("fp32", "bf16", "fp32+ckpt1", "bf16+ckpt1")
    return [
        Workload("infer2d", (256, 256), 32, (64,)),
        Workload("train2d", (256, 256), 32, (32,), variants=train),
        Workload("infer3d", (128,) * 3, 2, (10, 10)),
        Workload("train3d", (128,) * 3, 2, (10, 10), variants=train),
        Workload("infer3d", (256,) * 3, 1, (10, 10)),
    ]


def fused_kernels_available() -> bool:
    """Whether the fast step runs on the compiled CPU kernels here (:mod:`ncatool.models.kernels`)."""
    from ncatool.models import kernels

    return kernels.library() is not None


class Variant(NamedTuple):
    """An ncatool variant: ``amp`` (``fp32`` or ``bf16``), checkpointing ``every`` N steps (0: off),
    ``compiled`` (the ``"compiled"`` backend, :mod:`ncatool.models.compiled_step`)."""

    amp: str
    every: int
    compiled: bool


def parse_variant(name: str) -> Variant:
    """``"bf16+ckpt2"`` → ``Variant("bf16", 2, False)``; ``"bf16+compile"`` → ``("bf16", 0, True)``.

    Raises:
        NcaError: Unknown variant.
    """
    base, *parts = name.split("+")
    every, compiled = 0, False
    ok = base in ("fp32", "bf16") and len(parts) == len(set(p[:4] for p in parts))
    for part in parts:
        if part == "compile":
            compiled = True
        elif part.startswith("ckpt") and part[4:].isdigit():
            every = int(part[4:])
        else:
            ok = False
    if not ok:
        raise NcaError(f"unknown variant {name!r}: use fp32 or bf16, optionally +ckptN and/or +compile")
    return Variant(base, every, compiled)


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

    amp, every, compiled = parse_variant(variant)
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
    if compiled:
        from ncatool.models.nca import set_backend

        set_backend(model, "compiled")
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
    """Wall and CPU seconds of one ``run()``; on CUDA also ``cuda_peak``, the most memory allocated
    during the run beyond what was allocated before it.

    Raises:
        _OutOfMemory: The run ran out of GPU memory (the cache is emptied first).
    """
    import torch

    cuda = device.startswith("cuda")
    before = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        run()
        if cuda:
            torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        raise _OutOfMemory(f"out of memory: {str(err)[:300]}") from err
    out = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    if cuda:
        out["cuda_peak"] = float(torch.cuda.max_memory_allocated() - before)
        # Up to three processes share the GPU (naive, naive-tuned, this one), each with its own
        # caching allocator: a process whose cache holds over a quarter of the GPU gives it back
        # after the run (outside the timed region; the same rule in the reference's worker).
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if torch.cuda.memory_reserved() > 0.25 * total:
            torch.cuda.empty_cache()
    return out


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
            import gc

            gc.collect()
            reply["peak_reset"] = ref._reset_peak()
            before = ref._rss_bytes()
            try:
                reply.update(_timed(run, spec.get("device", "cpu")))
                reply.update(rss_before=before, maxrss=ref._maxrss_bytes())
            except _OutOfMemory as err:
                reply = {"ok": False, "oom": True, "error": str(err)}
        elif cmd == "quit":
            print(json.dumps(reply), flush=True)
            return
        print(json.dumps(reply), flush=True)


def serve_tuned_reference() -> None:
    """The naive reference's worker given ncatool's allocator tuning (``naive-tuned``): the tuning
    first (before ``import torch``, as ncatool's commands do), then the reference's own worker."""
    from ncatool.perf import tune_malloc

    tuned = tune_malloc()
    _import_reference().serve(extra={"malloc_tuned": tuned})


# --------------------------------------------------------------------------------------------------
# subprocess workers


class _OutOfMemory(NcaError):
    """A benchmark run ran out of (GPU) memory: reported for that implementation, not fatal."""


class _Worker:
    """A benchmark worker subprocess speaking JSON lines.

    ``impl``: ``naive`` (the reference, glibc's defaults, ncatool's tuning stripped from the
    environment), ``naive-tuned`` (the reference in ncatool's environment with its allocator
    tuning) or ``ncatool``.
    """

    def __init__(self, impl: str) -> None:
        env = dict(os.environ)
        if impl == NAIVE:
            for key in list(env):
                if key in _STRIP_ENV or key.startswith("MALLOC_"):
                    env.pop(key)
            # the reference imports nothing from ncatool: the worker runs on PyTorch's defaults
            args = [sys.executable, "-m", "ncatool.bench_reference", "--worker"]
        elif impl == NAIVE_TUNED:
            args = [sys.executable, "-m", "ncatool.bench", "--tuned-reference"]
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
        if reply.get("oom"):
            raise _OutOfMemory(str(reply.get("error")))
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
    variant: str  # naive | naive-tuned | fp32 | bf16 | ...
    cell_updates: int
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    error: str | None = None  # e.g. out of GPU memory: no (further) runs

    @property
    def median_wall(self) -> float | None:
        return statistics.median(self.wall_s) if self.wall_s else None

    def record(self, got: dict[str, Any]) -> None:
        """Add one timed run (``wall``, ``cpu``, on CUDA ``cuda_peak``: the largest is kept)."""
        self.wall_s.append(float(got["wall"]))
        self.cpu_s.append(float(got["cpu"]))
        if "cuda_peak" in got:
            peak = int(got["cuda_peak"]) - int(got.get("cuda_before", 0))
            self.peak_bytes = max(self.peak_bytes or 0, peak)

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


def _roofline_columns(row: dict[str, Any], w: Workload, ceilings: dict[str, Any]) -> None:
    """Add the work model and the fraction of the roof reached to a result ``row``."""
    from ncatool.roofline import roof

    macs, nbytes = w.work()
    bf16 = row["variant"].startswith("bf16")
    flops = ceilings["bf16_flops" if bf16 else "fp32_flops"]
    top, bound = roof(macs, nbytes, flops, ceilings["bandwidth"])
    rate = row["cell_updates_per_s"]
    row.update(
        macs_per_cell_update=macs,
        bytes_per_cell_update=nbytes,
        roof_cell_updates_per_s=top,
        roof_bound=bound,
        roofline_fraction=rate / top if rate else None,
    )


def run_benchmarks(
    workloads: Sequence[Workload],
    repeats: int = 3,
    threads: int | None = None,
    device: str = "cpu",
    memory: bool = True,
    timing: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    settle: float | None = None,
    roofline: bool = True,
) -> dict[str, Any]:
    """Measure every workload for both baselines (naive, naive-tuned) and ncatool's variants.

    Args:
        workloads: Cases (see :func:`default_workloads`).
        repeats: Timed runs per implementation (median reported), after one warm-up.
        threads: Intra-op threads for every side (None: this process's current count).
        device: ``cpu`` or ``cuda[:N]``.
        memory: Run the fresh-process memory phase.
        timing: Run the interleaved timing phase.
        seed: Seed for weights and inputs.
        progress: Called with a short line before each step.
        settle: Seconds to wait before each timed run (None: 1 on CPU, 0.2 on CUDA). The OpenMP
            threads of the process that just ran keep spinning for a while; without the pause they
            take a core from the next run (measured: 64x64x8 inference 10 s instead of 0.2 s right
            after the other process).
        roofline: Measure the machine's ceilings first and report each result's roofline fraction.

    Returns:
        A JSON-ready dict: ``machine``, ``config``, ``roofline`` (the ceilings, or None),
        ``results`` (one per workload and implementation), ``ratios`` (every ncatool variant and
        naive-tuned against naive: ``speedup``; ncatool against naive-tuned: ``speedup_tuned``)
        and ``targets``.
    """
    from ncatool.perf import tune_process

    settings = tune_process(threads)
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NcaError("--device cuda: CUDA is not available here")
    threads = torch.get_num_threads()
    cuda = device.startswith("cuda")
    if settle is None:
        settle = 0.2 if cuda else 1.0
    say = progress or (lambda _msg: None)
    load_before = _load()
    ceilings = None
    if roofline:
        from ncatool.roofline import measure_ceilings

        say("roofline: matrix-product ceilings and copy bandwidth")
        ceilings = measure_ceilings(device)
    results: dict[tuple[str, str], Measurement] = {}
    tuned_reference: bool | None = None

    def entry(w: Workload, variant: str) -> Measurement:
        key = (w.label, variant)
        if key not in results:
            impl = "naive" if variant in BASELINES else "ncatool"
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
            naive = {b: _Worker(b) for b in BASELINES}
            try:
                for w in (w for w in workloads if w.time):
                    spec = w.spec(device, seed)
                    say(f"timing {w.label}: setup")
                    for b, worker in naive.items():
                        got = worker.request(
                            cmd="setup", spec=spec, threads=threads, weights=weights[w.label]
                        )
                        if b == NAIVE_TUNED:
                            tuned_reference = bool(got.get("malloc_tuned"))
                    fast = {v: build_fast(spec, v)[1] for v in w.variants}
                    sides: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                        (b, functools.partial(worker.request, cmd="run")) for b, worker in naive.items()
                    ]
                    sides += [(v, functools.partial(_timed, run, device)) for v, run in fast.items()]
                    for r in range(repeats + 1):  # the first round is the warm-up
                        say(f"timing {w.label}: " + ("warm-up" if r == 0 else f"repeat {r}/{repeats}"))
                        for name, timed in sides:
                            m = entry(w, name)
                            if m.error:
                                continue
                            if r:
                                time.sleep(settle)
                            try:
                                got = timed()
                            except _OutOfMemory as err:
                                m.error = str(err)
                                say(f"timing {w.label}: {name} {m.error[:80]}")
                                continue
                            if r:
                                m.record(got)
                    del fast, sides
                    if cuda:
                        torch.cuda.empty_cache()
            finally:
                for worker in naive.values():
                    worker.close()

        if memory:
            for w in (w for w in workloads if w.memory):
                spec = w.spec(device, seed)
                for v in (NAIVE, *w.variants):
                    say(f"memory {w.label}: {v}")
                    worker = _Worker(NAIVE if v == NAIVE else "ncatool")
                    m = entry(w, v)
                    try:
                        worker.request(
                            cmd="setup", spec=spec, threads=threads, weights=weights[w.label], variant=v
                        )
                        worker.request(cmd="warmup")
                        got = worker.request(cmd="run")
                    except _OutOfMemory as err:
                        m.error = m.error or str(err)
                        continue
                    finally:
                        worker.close()
                    if "cuda_peak" in got:
                        m.peak_bytes = int(got["cuda_peak"]) - int(got.get("cuda_before", 0))
                    else:
                        m.peak_bytes = max(0, int(got["maxrss"]) - int(got["rss_before"]))
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()

    by_label = {w.label: w for w in workloads}
    rows = []
    for m in results.values():
        row = m.summary()
        if ceilings is not None:
            _roofline_columns(row, by_label[m.workload], ceilings)
        rows.append(row)
    ratios = []
    for w in workloads:
        base, tuned = results.get((w.label, NAIVE)), results.get((w.label, NAIVE_TUNED))
        if base is None:
            continue

        def speed(ref: Measurement | None, m: Measurement) -> float | None:
            if ref is None or not ref.median_wall or not m.median_wall:
                return None
            return ref.median_wall / m.median_wall

        for v in (NAIVE_TUNED, *w.variants):
            m = results.get((w.label, v))
            if m is None:
                continue
            mem = m.peak_bytes / base.peak_bytes if m.peak_bytes and base.peak_bytes else None
            ratio = {"workload": w.label, "kind": w.kind, "variant": v, "speedup": speed(base, m)}
            if v != NAIVE_TUNED:
                ratio["speedup_tuned"] = speed(tuned, m)
            ratio["memory_ratio"] = mem
            ratios.append(ratio)
    targets = []
    at_size = {
        w.label for w in workloads if (tuple(w.size), w.batch, tuple(w.steps)) in TARGET_SIZES.get(w.kind, [])
    }
    for kind, (what, bound) in TARGETS.items():
        cands = [
            r
            for r in ratios
            if r["kind"] == kind and r["workload"] in at_size and r["variant"] != NAIVE_TUNED
        ]
        key = "speedup" if what == "speedup" else "memory_ratio"
        for r in cands:
            value = r[key]
            if value is None:
                continue
            met = value >= bound if what == "speedup" else value <= bound
            target = {
                "workload": r["workload"],
                "variant": r["variant"],
                what: value,
                "bound": bound,
                "met": met,
            }
            if what == "speedup":
                target["speedup_tuned"] = r.get("speedup_tuned")
            targets.append(target)
    machine = {
        "device": device,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": threads,
        "malloc_tuned": settings["malloc_tuned"],
        "naive_tuned_malloc": tuned_reference,
        "fused_kernels": fused_kernels_available() if not cuda else None,  # CPU kernels only
        "glibc": settings["glibc"],
        "load_before": load_before,
        "load_after": _load(),
        "python": sys.version.split()[0],
    }
    if cuda:
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
        machine["cuda"] = torch.version.cuda
        # cuDNN's default lets the naive reference's convolutions (its 1x1 MLP too) run in TF32
        machine["tf32"] = {
            "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn": bool(torch.backends.cudnn.allow_tf32),
        }
    return {
        "machine": machine,
        "config": {
            "repeats": repeats,
            "seed": seed,
            "settle_s": settle,
            "workloads": [asdict(w) for w in workloads],
        },
        "macs_per_cell_step_2d": MACS_GROWING,
        "roofline": ceilings,
        "results": rows,
        "ratios": ratios,
        "targets": targets,
    }


def format_report(report: dict[str, Any]) -> Any:
    """A Rich table of the report (one row per workload and implementation).

    ``vs naive``: speed-up against the naive reference as ports run it (glibc's defaults); ``vs
    tuned``: against the same reference given ncatool's allocator tuning (the step's own gain); the
    naive-tuned row's ``vs naive`` is what the tuning alone gives the reference. ``roofline``: the
    fraction of the roof reached, ``c`` compute-bound or ``m`` bandwidth-bound (:mod:`ncatool.roofline`).
    """
    from rich.table import Table

    mach = report["machine"]
    where = mach.get("gpu") or mach["device"]
    title = (
        f"ncatool bench: {where}, {mach['threads']} threads, torch {mach['torch']}, "
        f"load {mach['load_before']} -> {mach['load_after']} ({mach['cores']} cores)"
    )
    ceil = report.get("roofline")
    caption = None
    if ceil:
        caption = (
            f"roofline: float32 products {ceil['fp32_flops'] / 1e9:,.0f} GFLOP/s, bf16 "
            f"{ceil['bf16_flops'] / 1e9:,.0f} GFLOP/s, copy {ceil['bandwidth'] / 1e9:,.1f} GB/s "
            f"(measured in {ceil['seconds']:.1f} s); roofline = achieved / min(compute, bandwidth x "
            "intensity), c/m: compute- or memory-bound"
        )
    table = Table(title=title, caption=caption)
    for col in (
        "workload",
        "impl",
        "M upd/s",
        "median s",
        "cpu/wall",
        "peak MB",
        "vs naive",
        "vs tuned",
        "mem ratio",
        "roofline",
    ):
        left = col in ("workload", "impl")
        table.add_column(col, justify="left" if left else "right", no_wrap=left)
    ratio = {(r["workload"], r["variant"]): r for r in report["ratios"]}
    for row in report["results"]:
        rate = row["cell_updates_per_s"]
        med = row["median_wall_s"]
        cpu = row["median_cpu_s"]
        r = ratio.get((row["workload"], row["variant"]), {})
        util = f"{cpu / med:.2f}" if cpu and med else ""
        frac = row.get("roofline_fraction")
        table.add_row(
            row["workload"],
            row["variant"],
            f"{rate / 1e6:.2f}" if rate else ("OOM" if row.get("error") else ""),
            f"{med:.3f}" if med else "",
            util,
            f"{row['peak_bytes'] / 2**20:.0f}" if row["peak_bytes"] is not None else "",
            f"{r['speedup']:.2f}x" if r.get("speedup") else "",
            f"{r['speedup_tuned']:.2f}x" if r.get("speedup_tuned") else "",
            f"{r['memory_ratio']:.2f}" if r.get("memory_ratio") else "",
            f"{frac:.0%} {row['roof_bound'][0]}" if frac else "",
        )
    return table


if __name__ == "__main__":
    if "--worker" in sys.argv:
        serve()
    elif "--tuned-reference" in sys.argv:
        serve_tuned_reference()
