"""The NCA core: filters, fire rate, zero-initialised rule, alive masking, checkpointing."""

from __future__ import annotations

import pytest
import torch

from ncatool.models.filters import FIXED_FILTERS, filter_bank
from ncatool.models.nca import NCA, NCAConfig, alive_mask, fire_mask
from ncatool.models.segmentation import SegmentationNCA, SegModelConfig, probs_to_labels


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("name", FIXED_FILTERS)
def test_filter_shapes_and_sums(name: str, dim: int) -> None:
    bank = filter_bank([name], dim)
    n = dim if name in ("sobel", "scharr") else 1
    assert bank.shape == (n, *([3] * dim))
    expected = 1.0 if name in ("gaussian", "mean") else 0.0
    torch.testing.assert_close(bank.flatten(1).sum(1), torch.full((n,), expected))


@pytest.mark.parametrize("dim", [2, 3])
def test_sobel_differentiates_along_its_axis(dim: int) -> None:
    # A ramp along the last axis: only the last kernel responds, with slope 1 per voxel.
    size = 6
    ramp = torch.arange(size, dtype=torch.float32).expand(*([size] * dim)).clone()
    bank = filter_bank(["sobel"], dim)
    conv = torch.nn.functional.conv2d if dim == 2 else torch.nn.functional.conv3d
    out = conv(ramp[None, None], bank[:, None])
    inner = out[0]
    torch.testing.assert_close(inner[-1], torch.ones_like(inner[-1]))
    for k in range(dim - 1):
        torch.testing.assert_close(inner[k], torch.zeros_like(inner[k]))


def test_fire_rate_is_probability_of_update() -> None:
    torch.manual_seed(0)
    m = fire_mask((4, 1, 64, 64), 0.25, torch.device("cpu"), torch.float32)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(m.mean().item() - 0.25) < 0.01
    assert fire_mask((1, 1, 4, 4), 1.0, torch.device("cpu"), torch.float32).min() == 1.0


def _nca(dim: int = 2, **kw: object) -> NCA:
    kw.setdefault("fixed_channels", 1)
    cfg = NCAConfig(channels=8, hidden=16, dim=dim, **kw)  # type: ignore[arg-type]
    return NCA(cfg)


@pytest.mark.parametrize("dim", [2, 3])
def test_zero_initialised_rule_leaves_state_unchanged(dim: int) -> None:
    nca = _nca(dim, filters=("sobel", "learned"))
    x = torch.randn(2, 8, *([6] * dim))
    torch.testing.assert_close(nca(x, steps=3), x)


def test_fire_rate_controls_which_cells_change() -> None:
    torch.manual_seed(1)
    nca = _nca(2, filters=("sobel",), fire_rate=0.5)
    torch.nn.init.normal_(nca.rule.fc1.weight)
    x = torch.randn(1, 8, 32, 32)
    y = nca.step(x)
    changed = (y != x).any(dim=1).float()
    assert 0.4 < changed.mean().item() < 0.6
    # the fixed (image) channel never changes
    torch.testing.assert_close(y[:, :1], x[:, :1])
    full = _nca(2, filters=("sobel",), fire_rate=1.0)
    full.load_state_dict(nca.state_dict())
    assert (full.step(x) != x)[:, 1:].any(dim=1).all()


def test_alive_masking_kills_isolated_dead_cells() -> None:
    x = torch.zeros(1, 8, 9, 9)
    x[0, 3, 4, 4] = 1.0  # one live cell (alpha channel 3)
    alive = alive_mask(x, 3, 0.1)
    assert alive[0, 0].sum() == 9  # the cell and its 3x3 neighbourhood
    nca = _nca(2, filters=("sobel",), fire_rate=1.0, alive_channel=3, fixed_channels=0)
    torch.nn.init.normal_(nca.rule.fc1.weight)
    y = nca.step(x)
    outside = torch.ones(9, 9, dtype=torch.bool)
    outside[3:6, 3:6] = False
    assert (y[0][:, outside] == 0).all()


def test_conditioning_changes_output() -> None:
    nca = NCA(
        NCAConfig(channels=8, fixed_channels=0, hidden=16, filters=("sobel",), cond_channels=4, fire_rate=1.0)
    )
    torch.nn.init.normal_(nca.rule.fc1.weight)
    x = torch.randn(2, 8, 8, 8)
    cond = torch.stack([torch.zeros(4), torch.ones(4)])
    y = nca(torch.cat([x[:1], x[:1]]), 2, cond=cond)
    assert not torch.allclose(y[0], y[1])
    with pytest.raises(ValueError, match="conditional"):
        nca(x, 1)


@pytest.mark.parametrize("dim", [2, 3])
def test_gradient_checkpointing_gives_same_gradients(dim: int) -> None:
    torch.manual_seed(0)
    nca = _nca(dim, filters=("learned",), fire_rate=0.5)
    torch.nn.init.normal_(nca.rule.fc1.weight, std=0.1)
    x = torch.randn(2, 8, *([6] * dim))

    def grads(every: int) -> list[torch.Tensor]:
        nca.zero_grad()
        torch.manual_seed(3)
        nca(x, steps=6, checkpoint_every=every).square().mean().backward()
        return [p.grad.clone() for p in nca.parameters()]

    for a, b in zip(grads(0), grads(2), strict=True):
        torch.testing.assert_close(a, b)


def test_return_states_gives_every_step() -> None:
    nca = _nca(2)
    out, states = nca(torch.randn(1, 8, 5, 5), steps=4, return_states=True)
    assert len(states) == 4 and torch.equal(states[-1], out)


@pytest.mark.parametrize(("dim", "size"), [(2, (40, 36)), (3, (16, 20, 12))])
def test_segmentation_nca_shapes_whole_and_patch(dim: int, size: tuple[int, ...]) -> None:
    cfg = SegModelConfig(
        dim=dim,
        in_channels=1,
        n_out=2,
        channels=8,
        hidden=16,
        scale=2,
        steps=(3, 3),
        kernels=(3, 3),
        patch=(0, 8),
    )
    model = SegmentationNCA(cfg)
    img = torch.randn(2, 1, *size)
    whole = model(img)
    assert whole.logits.shape == (2, 2, *size)
    assert whole.window == tuple((0, s) for s in size)
    part = model(img, patch=cfg.patch, generator=torch.Generator().manual_seed(0))
    assert part.logits.shape == (2, 2, *([8] * dim))
    for (a, b), s in zip(part.window, size, strict=True):
        assert 0 <= a < b <= s and b - a == 8


def test_probs_to_labels() -> None:
    probs = torch.tensor([[[0.9, 0.2, 0.6]], [[0.1, 0.3, 0.8]]])[None]  # (1, 2, 1, 3)
    assert probs_to_labels(probs).tolist() == [[[1, 0, 2]]]
