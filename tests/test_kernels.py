"""The fused CPU kernels equal PyTorch's ops; without a compiler the NCA falls back to PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ncatool.models.kernels as kernels
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


def _grads_of_a_short_run() -> list[torch.Tensor]:
    torch.manual_seed(0)
    nca = NCA(NCAConfig(channels=8, hidden=16, filters=("sobel", "learned"), padding="reflect"))
    torch.nn.init.normal_(nca.rule.fc1.weight, std=0.2)
    x = torch.rand(2, 8, 9, 9, requires_grad=True)
    torch.manual_seed(1)
    nca(x, 4).square().sum().backward()
    return [x.grad, *(p.grad for p in nca.parameters())]


def test_nca_falls_back_to_pytorch_without_a_compiler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with_kernels = _grads_of_a_short_run()
    monkeypatch.setattr(kernels, "_LIB", None)
    monkeypatch.setenv("NCATOOL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert kernels.library() is None
    assert not list(tmp_path.glob("*.so"))  # nothing half-built left behind
    without = _grads_of_a_short_run()
    for a, b in zip(with_kernels, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_kernels_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_LIB", None)
    monkeypatch.setenv("NCATOOL_KERNELS", "0")
    assert kernels.library() is None


@needs_kernels
def test_build_goes_to_the_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kernels, "_LIB", None)
    monkeypatch.setenv("NCATOOL_CACHE_DIR", str(tmp_path / "cache"))
    assert kernels.library() is not None
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary files left


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
