"""The fused CPU operators equal PyTorch's ops, refuse wrong arguments, give the same bits on any
thread count; without a compiler the NCA falls back to PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ncatool.models.kernels as kernels
from ncatool.models.fast_step import FastOptions
from ncatool.models.nca import NCA, NCAConfig

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: kernels unavailable")


def reference_rows(
    x: torch.Tensor,
    filters: list[tuple[torch.Tensor, torch.Tensor | None]],
    padding: str,
    idx: torch.Tensor | None,
) -> torch.Tensor:
    """``[x | filter_1(x) | ...]`` at the cells ``idx`` with PyTorch's depthwise convolutions."""
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    feats = [x]
    for weight, bias in filters:
        r = weight.shape[-1] // 2
        pads = [r] * (2 * (x.dim() - 2))
        xp = F.pad(x, pads) if padding == "zeros" else F.pad(x, pads, mode=padding)
        feats.append(conv(xp, weight, bias, groups=x.shape[1]))
    p = torch.cat(feats, 1)
    rows = p.permute(0, *range(2, x.dim()), 1).reshape(-1, p.shape[1])
    return rows if idx is None else rows[idx]


CASES = [
    # dims, channels, kernel sizes, bias, padding, batch
    ((9, 11), 8, (3, 3), False, "zeros", 3),
    ((7, 6), 20, (5, 3), True, "reflect", 2),
    ((5, 6, 7), 16, (3,), True, "replicate", 1),
    ((4, 5, 6), 3, (3, 5), True, "circular", 2),
    ((6, 6, 6), 17, (7,), True, "reflect", 2),
]


@needs_kernels
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("gather", [True, False])
def test_perceive_rows_and_backward_equal_pytorch(case: tuple, gather: bool) -> None:
    spatial, c, sizes, with_bias, padding, batch = case
    gen = torch.Generator().manual_seed(len(spatial) * 100 + c)
    fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
    x = torch.randn(batch, c, *spatial, generator=gen).contiguous(memory_format=fmt)
    filters = [
        (
            torch.randn(c, 1, *([k] * len(spatial)), generator=gen).requires_grad_(),
            torch.randn(c, generator=gen).requires_grad_() if with_bias else None,
        )
        for k in sizes
    ]
    cells = x.numel() // c
    idx = (torch.rand(cells, generator=gen) < 0.6).nonzero().squeeze(1) if gather else None
    xr = x.detach().requires_grad_()
    ref = reference_rows(xr, filters, padding, idx)
    rows = kernels.perceive_rows(x, filters, padding, idx, torch.float32)
    torch.testing.assert_close(rows, ref.detach(), rtol=1e-4, atol=1e-4)  # sums of up to 343 taps
    # bfloat16 rows are the float32 rows rounded as Tensor.to rounds them
    assert torch.equal(
        kernels.perceive_rows(x, filters, padding, idx, torch.bfloat16), rows.to(torch.bfloat16)
    )

    g = torch.randn(ref.shape, generator=gen)
    ref.backward(g)
    gx = torch.zeros(cells, c)
    got = kernels.perceive_rows_backward(x, filters, padding, idx, g, gx, [(True, True)] * len(filters))
    assert xr.grad is not None
    torch.testing.assert_close(
        gx, xr.grad.permute(0, *range(2, x.dim()), 1).reshape(-1, c), rtol=1e-4, atol=1e-4
    )
    for (weight, bias), (gw, gb) in zip(filters, got, strict=True):
        torch.testing.assert_close(gw, weight.grad, rtol=1e-4, atol=1e-4)
        if bias is not None:
            torch.testing.assert_close(gb, bias.grad, rtol=1e-4, atol=1e-4)
        else:
            assert gb is None


@needs_kernels
def test_backward_skips_what_is_not_needed() -> None:
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(4, 1, 3, 3), torch.randn(4)
    g = torch.randn(50, 8)
    got = kernels.perceive_rows_backward(x, [(weight, bias)], "zeros", None, g, None, [(False, True)])
    assert got[0][0] is None and got[0][1] is not None
    torch.testing.assert_close(got[0][1], g[:, 4:].sum(0), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_backward_and_mask_indices_equal_pytorch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(300, 7, generator=gen).relu().to(dtype)
    grad = torch.randn(300, 7, generator=gen).to(dtype)
    expected = torch.ops.aten.threshold_backward(grad, h, 0)
    assert torch.equal(kernels.relu_backward_(grad.clone(), h), expected)
    mask = torch.rand(1001, generator=gen) < 0.3
    assert torch.equal(kernels.mask_indices(mask), mask.nonzero().squeeze(1))


def _grads_of_a_short_run(options: FastOptions | None = None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    cfg = NCAConfig(channels=8, hidden=16, filters=("sobel", "learned"), padding="reflect")
    nca = NCA(cfg, backend="fast", fast_options=options)
    torch.nn.init.normal_(nca.rule.fc1.weight, std=0.2)
    x = torch.rand(2, 8, 9, 9, requires_grad=True)
    torch.manual_seed(1)
    nca(x, 4).square().sum().backward()
    return [x.grad, *(p.grad for p in nca.parameters())]


def test_no_compiler_builds_nothing_and_the_nca_runs_on_pytorch(tmp_path: Path) -> None:
    assert kernels.build(cc="false", cxx="false", cache=tmp_path) is None  # "compilers" that always fail
    assert not list(tmp_path.iterdir())  # nothing half-built left behind
    assert kernels.build(cc="no-such-compiler", cache=tmp_path) is None
    with_kernels = _grads_of_a_short_run()
    without = _grads_of_a_short_run(FastOptions(kernels=False))
    for a, b in zip(with_kernels, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_kernels_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCATOOL_KERNELS", "0")
    assert kernels.probe() == "disabled by NCATOOL_KERNELS=0"


@needs_kernels
def test_build_goes_to_the_cache_dir(tmp_path: Path) -> None:
    path = kernels.build(cache=tmp_path / "cache")
    assert path is not None and path == kernels.library_path(tmp_path / "cache")
    built = list((tmp_path / "cache").iterdir())
    assert built == [path] and path.suffix == ".so"  # no temporary files left
    assert kernels.build(cache=tmp_path / "cache") == path  # the second time from the cache


@needs_kernels
def test_probe_leaves_the_global_rng_alone() -> None:
    # the self-check runs in whichever process first uses the kernels; fire masks draw from this RNG
    torch.manual_seed(7)
    before = torch.get_rng_state()
    assert kernels.probe() is None
    assert torch.equal(torch.get_rng_state(), before)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_perceive_backward_has_the_same_bits_on_any_thread_count(threads: int) -> None:
    # d weight was summed per thread, over whichever batch items a thread took under the dynamic
    # schedule: a late second thread changed the rounding (resume after SIGKILL was 1e-7 off)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 10, 10, 10, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    filters = [(torch.randn(16, 1, 3, 3, 3, generator=gen), torch.randn(16, generator=gen)) for _ in range(2)]
    idx = (torch.rand(x.numel() // 16, generator=gen) < 0.5).nonzero().squeeze(1)
    g = torch.randn(idx.numel(), 48, generator=gen)
    before = torch.get_num_threads()

    def run(n: int) -> list[torch.Tensor]:
        torch.set_num_threads(n)
        gx = torch.zeros(x.numel() // 16, 16)
        got = kernels.perceive_rows_backward(x, filters, "reflect", idx, g, gx, [(True, True)] * 2)
        return [gx, *(t for pair in got for t in pair if t is not None)]

    try:
        one, many = run(1), run(threads)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


def _op_args() -> dict[str, tuple]:
    """Valid arguments for each operator (small 2D state, 2 batch items, 4 channels)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    taps, bias = torch.randn(2, 3, 3, 4, generator=gen), torch.randn(2, 4, generator=gen)
    idx = torch.tensor([0, 3, 7, 31, 59])
    grad = torch.randn(5, 12, generator=gen)
    return {
        "perceive_rows": (x, [taps], [bias], "reflect", idx, torch.float32),
        "perceive_rows_backward": (x, [taps], "reflect", idx, grad, torch.zeros(60, 4), [True], [True]),
        "update_rows": (x, torch.randn(5, 3, generator=gen), idx, 5, 1, 0, 0.1),
        "update_rows_backward": (x, torch.ones(60, dtype=torch.bool), idx, 5, 8, 1, torch.bfloat16),
        "relu_backward_": (torch.randn(7, 3, generator=gen), torch.randn(7, 3, generator=gen).relu()),
        "mask_indices": (torch.rand(60, generator=gen) < 0.5,),
    }


@needs_kernels
@pytest.mark.parametrize("name", list(_op_args()))
def test_operators_pass_opcheck(name: str) -> None:
    # schema (what each operator mutates) and the fake implementations torch.compile traces
    op = getattr(torch.ops.ncatool, name)
    torch.library.opcheck(op, _op_args()[name], test_utils=("test_schema", "test_faketensor"))


@needs_kernels
@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("perceive_rows", {0: lambda x: x.double()}, "must be float32"),
        ("perceive_rows", {0: lambda x: x.contiguous()}, "channels-last"),
        ("perceive_rows", {1: lambda t: [t[0][..., :3].contiguous()]}, "C=4"),
        ("perceive_rows", {1: lambda t: [t[0][:, :2, :2].contiguous()]}, "odd"),
        ("perceive_rows", {4: lambda i: i + 100}, "is not a cell"),
        ("perceive_rows", {3: lambda p: "mirror"}, "padding must be"),
        ("perceive_rows", {5: lambda d: torch.float16}, "float32 or bfloat16"),
        ("perceive_rows_backward", {3: lambda i: i.flip(0)}, "strictly increasing"),
        ("perceive_rows_backward", {4: lambda g: g[:, :11].contiguous()}, "grad must be"),
        ("perceive_rows_backward", {5: lambda g: g[:30]}, "grad_x must be"),
        ("update_rows", {1: lambda d: d[:, :2].contiguous()}, "dx must be"),
        ("update_rows", {3: lambda f: 6}, "fired must be"),
        ("update_rows", {5: lambda c: 4}, "alive_channel"),
        ("update_rows_backward", {1: lambda life: life[:10]}, "life must be"),
        ("relu_backward_", {1: lambda h: h.double()}, "one dtype"),
        ("mask_indices", {0: lambda m: m.long()}, "bool"),
    ],
)
def test_a_wrong_call_raises_instead_of_corrupting_memory(name: str, change: dict, message: str) -> None:
    args = list(_op_args()[name])
    for i, f in change.items():
        args[i] = f(args[i])
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.ncatool, name)(*args)


@needs_kernels
@pytest.mark.parametrize(
    ("spatial", "fixed", "alive", "dtype"),
    [
        ((6, 7), 0, (3, 0.1), torch.float32),
        ((6, 7), 2, None, torch.bfloat16),
        ((4, 5, 3), 1, (0, 0.3), torch.bfloat16),
        ((1, 5, 3), 0, (1, 0.2), torch.float32),
    ],
)
@pytest.mark.parametrize("gather", [True, False])
def test_update_rows_and_backward_equal_pytorch(
    spatial: tuple[int, ...], fixed: int, alive: tuple[int, float] | None, dtype: torch.dtype, gather: bool
) -> None:
    from ncatool.models.nca import alive_mask

    gen = torch.Generator().manual_seed(5)
    b, c = 2, 6
    fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
    x = torch.rand(b, c, *spatial, generator=gen).contiguous(memory_format=fmt)
    cells = x.numel() // c
    idx = (torch.rand(cells, generator=gen) < 0.5).nonzero().squeeze(1) if gather else None
    fired = idx.numel() if idx is not None else cells
    rows = fired + 3 if gather else fired  # padded rows are ignored
    dx = (torch.randn(rows, c - fixed, generator=gen) * 0.3).to(dtype)
    new, life = kernels.update_rows(x, dx, idx, fired, fixed, alive)

    full = torch.zeros(cells, c)
    where = idx if idx is not None else torch.arange(cells)
    full[where, fixed:] = dx[:fired].float()
    expected = x + full.view(b, *spatial, c).permute(0, -1, *range(1, len(spatial) + 1))
    mask = None
    if alive is not None:
        mask = alive_mask(x, *alive) & alive_mask(expected, *alive)
        expected = expected * mask
        assert life is not None
        assert torch.equal(life, mask.permute(0, *range(2, x.dim()), 1).reshape(-1))
    torch.testing.assert_close(new, expected, rtol=1e-6, atol=1e-6)

    grad = torch.randn(x.shape, generator=gen).contiguous(memory_format=fmt)
    g_x, g_dx = kernels.update_rows_backward(grad, life, idx, fired, rows, fixed, dtype)
    g_eff = grad * mask if mask is not None else grad
    g_rows = g_eff.permute(0, *range(2, x.dim()), 1).reshape(-1, c)
    torch.testing.assert_close(g_x, g_rows)
    assert torch.equal(g_dx[:fired], g_rows[where, fixed:].to(dtype))
    assert not g_dx[fired:].any()
