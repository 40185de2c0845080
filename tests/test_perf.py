"""The fast NCA step equals the naive reference; bench report keys; process tuning helpers.

No timing asserts here: speed is measured by ``ncatool bench`` (benchmarks/README.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ncatool import bench, perf, roofline
from ncatool.bench import (
    MACS_GROWING,
    Workload,
    _import_reference,
    growing_config,
    parse_variant,
    reference_state_dict,
    run_benchmarks,
    seg3d_config,
)
from ncatool.errors import NcaError
from ncatool.models.fast_step import FastOptions, bucket
from ncatool.models.nca import NCA, NCAConfig, alive_mask
from ncatool.models.segmentation import SegmentationNCA

ref = _import_reference()


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Tiny tensors: one thread avoids OpenMP barrier waits on a busy machine (and is as fast)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _growing_pair(fire_rate: float = 0.5, std: float = 0.05) -> tuple[NCA, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = growing_config()
    if fire_rate != cfg.fire_rate:
        from dataclasses import replace

        cfg = replace(cfg, fire_rate=fire_rate)
    nca = NCA(cfg)
    torch.nn.init.normal_(nca.rule.fc1.weight, std=std)
    naive = ref.NaiveGrowingNCA(fire_rate=fire_rate)
    naive.load_state_dict(reference_state_dict(nca))
    return nca, naive


def _grads_growing(nca: NCA, naive: torch.nn.Module, x: torch.Tensor, steps: int, every: int = 0) -> None:
    """Both models' parameter gradients of the same loss, naive mapped into ncatool's layout."""
    target = torch.rand_like(x[:, :4])
    torch.manual_seed(5)
    a = naive(x, steps)
    ((a[:, :4] - target) ** 2).mean().backward()
    torch.manual_seed(5)
    b = nca(x, steps, checkpoint_every=every)
    ((b[:, :4] - target) ** 2).mean().backward()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    c = nca.cfg.channels
    order = list(range(c)) + [c + 2 * i + 1 for i in range(c)] + [c + 2 * i for i in range(c)]
    g_naive = naive.fc0.weight.grad
    assert g_naive is not None and nca.rule.fc0.weight.grad is not None
    torch.testing.assert_close(nca.rule.fc0.weight.grad[:, order], g_naive, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(nca.rule.fc0.bias.grad, naive.fc0.bias.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(nca.rule.fc1.weight.grad, naive.fc1.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fire_rate", [0.5, 1.0])
def test_fast_path_matches_naive_reference_float32(fire_rate: float) -> None:
    # Same weights, and the same RNG draws (both take torch.rand(B, 1, H, W) < fire_rate per step).
    nca, naive = _growing_pair(fire_rate)
    x = torch.rand(2, 16, 20, 20)
    with torch.no_grad():
        torch.manual_seed(3)
        a = naive(x, 8)
        torch.manual_seed(3)
        b = nca(x, 8)
    assert not torch.allclose(a, x)  # the steps did something
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("every", [0, 1, 3])
def test_fast_path_gradients_match_naive_reference(every: int) -> None:
    nca, naive = _growing_pair(0.5)
    _grads_growing(nca, naive, torch.rand(2, 16, 12, 12), steps=5, every=every)


def test_fast_path_bf16_within_its_tolerance() -> None:
    nca, naive = _growing_pair(0.5)
    x = torch.rand(2, 16, 24, 24)
    torch.manual_seed(3)
    a = naive(x, 4).detach()
    torch.manual_seed(3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        b = nca(x, 4)
    assert b.dtype == torch.float32  # the state stays float32; only the products run in bf16
    diff = (a - b).abs()
    assert diff.norm() / a.norm() < 1e-2  # measured ~1e-3
    assert diff.max() < 0.05  # measured ~4e-3


def test_seg3d_matches_naive_reference() -> None:
    torch.manual_seed(0)
    model = SegmentationNCA(seg3d_config((3, 3)))
    for level in model.levels:
        torch.nn.init.normal_(level.rule.fc1.weight, std=0.05)
    naive = ref.NaiveSeg3D()
    naive.load_state_dict(reference_state_dict(model))
    img = torch.rand(1, 1, 12, 12, 12)
    torch.manual_seed(4)
    a = naive(img, (3, 3))
    a.square().mean().backward()
    torch.manual_seed(4)
    b = model(img, checkpoint_every=1).logits
    b.square().mean().backward()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for lv, nv in zip(model.levels, naive.levels, strict=True):
        torch.testing.assert_close(lv.rule.fc0.weight.grad, nv.fc0.weight.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(
            lv.perception.learned[1].weight.grad, nv.convs[1].weight.grad, rtol=1e-4, atol=1e-7
        )


CONFIGS = [
    {"filters": ("learned",), "fixed_channels": 1},
    {"filters": ("sobel", "learned"), "fixed_channels": 2, "learned_kernel": 5, "padding": "reflect"},
    {"filters": ("laplacian", "gaussian"), "fixed_channels": 0, "cond_channels": 3, "padding": "circular"},
    {
        "filters": ("scharr",),
        "fixed_channels": 0,
        "alive_channel": 2,
        "padding": "replicate",
        "fire_rate": 1.0,
    },
    {"dim": 3, "filters": ("learned",), "fixed_channels": 1, "learned_kernel": 5, "hidden": 24},
    {"dim": 3, "filters": ("sobel", "mean"), "fixed_channels": 0, "padding": "zeros", "alive_channel": 0},
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("every", [0, 1, 2])
@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_fast_step_matches_straightforward_step(kw: dict, every: int, gather: bool, fused: bool) -> None:
    # fused=False: PyTorch ops instead of the compiled kernels; gather=False: the masked (GPU)
    # variant of the update, run on the CPU; 40-row chunks exercise the chunked recomputing backward
    options = FastOptions(kernels=fused, gather=gather, chunk_rows=40)
    torch.manual_seed(0)
    nca = NCA(NCAConfig(channels=8, hidden=kw.pop("hidden", 16), **kw), backend="fast", fast_options=options)
    torch.nn.init.normal_(nca.rule.fc1.weight, std=0.2)
    for layer in nca.perception.learned:
        torch.nn.init.normal_(layer.bias, std=0.1)
    x = torch.rand(2, 8, *([7] * nca.cfg.dim))
    cond = torch.randn(2, 3, requires_grad=True) if nca.cfg.cond_channels else None

    def run(fast: bool) -> list[torch.Tensor]:
        nca.zero_grad()
        if cond is not None:
            cond.grad = None
        xx = x.clone().requires_grad_()
        torch.manual_seed(1)
        if fast:
            y = nca(xx, 3, cond=cond, checkpoint_every=every)
        else:
            y = xx
            for _ in range(3):
                y = nca.reference_step(y, cond)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        extra = [cond.grad] if cond is not None else []
        return [y, xx.grad, *(p.grad for p in nca.parameters()), *extra]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim", [2, 3])
def test_alive_mask_equals_max_pool(dim: int) -> None:
    x = torch.rand(2, 5, *([9] * dim)) * 0.13
    pool = F.max_pool2d if dim == 2 else F.max_pool3d
    expected = pool(x[:, 2:3], kernel_size=3, stride=1, padding=1) > 0.1
    assert torch.equal(alive_mask(x, 2, 0.1), expected)
    fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
    assert torch.equal(alive_mask(x.contiguous(memory_format=fmt), 2, 0.1), expected)


def test_forward_returns_contiguous_and_keeps_input() -> None:
    nca, _ = _growing_pair()
    x = torch.rand(1, 16, 9, 9)
    before = x.clone()
    y = nca(x, 2)
    assert y.is_contiguous() and torch.equal(x, before)
    out, states = nca(x, 2, return_states=True)
    assert all(s.is_contiguous() for s in states) and torch.equal(states[-1], out)


def test_bucket_rounds_up_a_little() -> None:
    for n in (0, 1, 63, 64, 65, 1000, 16411, 262_000):
        b = bucket(n)
        assert b >= n and b - n <= max(64, n // 64)


def test_parse_variant() -> None:
    assert parse_variant("fp32") == ("fp32", 0, False)
    assert parse_variant("bf16+ckpt2") == ("bf16", 2, False)
    assert parse_variant("bf16+compile+ckpt1") == ("bf16", 1, True)
    for bad in ("fp8", "fp32+ckpt", "fp32+compile+compile", "fp32+fast"):
        with pytest.raises(NcaError):
            parse_variant(bad)


def test_bench_report_has_expected_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # both baselines interleaved, the roofline columns (ceilings fixed here: measure_ceilings has
    # its own test), and a variant that runs out of GPU memory reported instead of ending the run
    ceilings = {"fp32_flops": 100e9, "bf16_flops": 400e9, "bandwidth": 10e9, "seconds": 0.0}
    monkeypatch.setattr(roofline, "measure_ceilings", lambda device: ceilings)
    real_build = bench.build_fast

    def build(spec: dict, variant: str) -> tuple:
        model, run = real_build(spec, variant)
        if variant == "bf16":

            def run() -> None:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        return model, run

    monkeypatch.setattr(bench, "build_fast", build)
    work = [
        Workload("train2d", (8, 8), 1, (2,), variants=("fp32",)),
        Workload("infer3d", (8, 8, 8), 1, (1, 1), memory=False, variants=("fp32", "bf16")),
    ]
    report = run_benchmarks(work, repeats=1, threads=1, settle=0.0)
    assert {"machine", "config", "roofline", "results", "ratios", "targets"} <= set(report)
    assert {"threads", "load_before", "load_after", "malloc_tuned", "device"} <= set(report["machine"])
    if perf._glibc() is not None:
        assert report["machine"]["naive_tuned_malloc"] is True
    rows = {(r["workload"], r["variant"]): r for r in report["results"]}
    train = rows[("train2d 8^2 b1 s2", "fp32")]
    assert train["cell_updates_per_s"] > 0 and train["peak_bytes"] is not None
    assert rows[("train2d 8^2 b1 s2", "naive")]["peak_bytes"] is not None
    assert rows[("infer3d 8^3 b1 s1+1", "naive")]["cell_updates_per_s"] > 0
    assert rows[("infer3d 8^3 b1 s1+1", "naive-tuned")]["cell_updates_per_s"] > 0
    assert rows[("train2d 8^2 b1 s2", "naive-tuned")]["impl"] == "naive"
    oom = rows[("infer3d 8^3 b1 s1+1", "bf16")]
    assert "out of memory" in oom["error"] and oom["cell_updates_per_s"] is None
    # roofline: 2D training 3 x 0.5 x 8,480 MACs and 5 x 16 x 4 bytes per cell-update; the roof is
    # min(100e9 / (2 x 12,720), 10e9 / 320) = 3.93 M cell-updates/s, compute-bound
    assert train["macs_per_cell_update"] == 3 * 0.5 * MACS_GROWING and train["bytes_per_cell_update"] == 320
    assert train["roof_bound"] == "compute"
    assert train["roofline_fraction"] == pytest.approx(train["cell_updates_per_s"] / (100e9 / (2 * 12_720)))
    ratio = {(r["workload"], r["variant"]): r for r in report["ratios"]}
    r = ratio[("train2d 8^2 b1 s2", "fp32")]
    assert r["speedup"] > 0 and r["speedup_tuned"] > 0
    assert "memory_ratio" in r  # None when a peak rounds to 0
    naive, tuned = rows[("train2d 8^2 b1 s2", "naive")], rows[("train2d 8^2 b1 s2", "naive-tuned")]
    # the two ratios answer two questions about the same ncatool run
    expected = r["speedup"] * tuned["median_wall_s"] / naive["median_wall_s"]
    assert r["speedup_tuned"] == pytest.approx(expected)
    assert ratio[("train2d 8^2 b1 s2", "naive-tuned")]["speedup"] > 0
    assert ratio[("infer3d 8^3 b1 s1+1", "bf16")]["speedup"] is None
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(bench.format_report(report))
    text = console.export_text()
    assert "naive-tuned" in text and "OOM" in text and "vs tuned" in text


def test_work_per_cell_update_counts_fired_cells_and_perception() -> None:
    macs, nbytes = roofline.work_per_cell_update("infer2d", (64, 64), 8, (64,))
    assert macs == 0.5 * (16 * 2 * 9 + 48 * 128 + 128 * 16) and nbytes == 2 * 16 * 4
    # 3D: level 0 (7^3 filters) on 32^3 x 10 steps, level 1 (3^3) on 64^3 x 10 steps
    macs, nbytes = roofline.work_per_cell_update("train3d", (64, 64, 64), 2, (10, 10))
    mlp = 48 * 64 + 64 * 15
    coarse, fine = 2 * 32**3 * 10, 2 * 64**3 * 10
    level = (coarse * (16 * 2 * 343 + mlp) + fine * (16 * 2 * 27 + mlp)) / (coarse + fine)
    assert macs == pytest.approx(3 * 0.5 * level) and nbytes == 5 * 16 * 4
    assert roofline.roof(1000, 100, 2e12, 1e9) == (1e7, "memory")
    assert roofline.roof(1000, 100, 2e9, 1e12) == (1e6, "compute")


def test_measure_ceilings_small() -> None:
    got = roofline.measure_ceilings("cpu", runs=2, mm_size=64, copy_numel=4096)
    assert got["fp32_flops"] > 0 and got["bf16_flops"] > 0 and got["bandwidth"] > 0
    assert got["mm_size"] == 64 and got["threads"] == 1


def test_tune_malloc_is_a_noop_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(perf, "_glibc", lambda: None)
    assert perf.tune_malloc(force=True) is False
    assert perf.glibc_version() is None


def test_tune_malloc_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCATOOL_MALLOPT", "0")
    assert perf.tune_malloc(force=True) is False


def test_tune_malloc_on_glibc() -> None:
    if perf._glibc() is None:
        pytest.skip("not glibc")
    assert perf.tune_malloc(force=True) is True
    assert perf.tune_malloc() is True  # idempotent
    settings = perf.tune_process()
    assert settings["malloc_tuned"] is True and settings["threads"] >= 1
