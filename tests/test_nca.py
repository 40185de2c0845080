"""The NCA core: filters, fire rate, zero-initialised rule, alive masking, checkpointing, the
backend setting, states step by step, low-memory slabs, old checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ncatool.models import slabs
from ncatool.models.fast_step import FastOptions
from ncatool.models.filters import FIXED_FILTERS, filter_bank
from ncatool.models.growing import ConditionalNCA
from ncatool.models.nca import NCA, NCAConfig, alive_mask, fire_mask, set_backend
from ncatool.models.segmentation import SegmentationNCA, SegModelConfig, probs_to_labels

FIXTURES = Path(__file__).parent / "fixtures" / "main_2f367d7"


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


def _nca(dim: int = 2, backend: str = "auto", **kw: object) -> NCA:
    kw.setdefault("fixed_channels", 1)
    cfg = NCAConfig(channels=8, hidden=16, dim=dim, **kw)  # type: ignore[arg-type]
    return NCA(cfg, backend=backend)


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


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _fixture_model(task: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a checkpoint written by ncatool at 2f367d7, built from its saved settings."""
    payload = torch.load(FIXTURES / task / "last.pt", map_location="cpu", weights_only=False)
    shape = _tuples(dict(payload["task_state"]["model"]))
    model: torch.nn.Module
    if task in ("seg2d", "seg3d"):
        model = SegmentationNCA(SegModelConfig(**shape))
    elif task == "digits":
        embed_dim = shape.pop("embed_dim")
        model = ConditionalNCA(NCAConfig(**shape), 10, embed_dim)
    else:
        model = NCA(NCAConfig(**shape))
    return model, payload


@pytest.mark.parametrize("task", ["seg2d", "seg3d", "grow", "digits"])
def test_old_checkpoints_load_and_both_backends_agree(task: str) -> None:
    model, payload = _fixture_model(task)
    model.load_state_dict(payload["model"])  # strict: the same keys and shapes as at 2f367d7
    assert list(model.state_dict()) == list(payload["model"])
    model.eval()

    def run(backend: str) -> torch.Tensor:
        set_backend(model, backend)
        torch.manual_seed(0)
        with torch.no_grad():
            if isinstance(model, SegmentationNCA):
                return model(torch.randn(1, 1, *([16] * model.cfg.dim))).logits
            x = torch.rand(2, model.cfg.channels, 12, 12)
            if isinstance(model, ConditionalNCA):
                return model(x, 4, torch.tensor([0, 7]))
            return model(x, 4)

    torch.testing.assert_close(run("fast"), run("reference"), rtol=1e-4, atol=1e-5)


def test_backend_setting_and_set_backend() -> None:
    model = SegmentationNCA(SegModelConfig(dim=2, channels=8, hidden=16, steps=(2, 2), kernels=(3, 3)))
    assert all(nca.backend == "auto" and nca.runs_fast(torch.zeros(1)) for nca in model.levels)
    options = FastOptions(kernels=False)
    assert set_backend(model, "reference") == 2
    assert not any(nca.runs_fast(torch.zeros(1)) for nca in model.levels)
    assert set_backend(model, "fast", options) == 2
    assert all(nca.fast_options is options for nca in model.levels)
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend(model, "gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        NCA(NCAConfig(), backend="quick")


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_a_given_fire_mask_is_the_one_used(backend: str) -> None:
    torch.manual_seed(0)
    nca = _nca(2, filters=("sobel", "learned"), fire_rate=0.5, backend=backend)
    torch.nn.init.normal_(nca.rule.fc1.weight, std=0.2)
    x = torch.rand(2, 8, 9, 9)
    fire = torch.rand(2, 1, 9, 9) < 0.3
    y = nca.step(x, fire=fire)
    changed = (y != x)[:, 1:].any(dim=1, keepdim=True)
    assert torch.equal(changed, fire)
    torch.testing.assert_close(y, nca.reference_step(x, fire=fire), rtol=1e-5, atol=1e-6)
    torch.manual_seed(3)  # None draws the mask, as fire_mask draws it
    drawn = fire_mask((2, 1, 9, 9), 0.5, x.device, torch.bool)
    torch.manual_seed(3)
    torch.testing.assert_close(nca.step(x), nca.reference_step(x, fire=drawn), rtol=1e-5, atol=1e-6)


def test_rollout_yields_every_state_of_forward() -> None:
    torch.manual_seed(0)
    nca = _nca(2, filters=("sobel", "learned"))
    torch.nn.init.normal_(nca.rule.fc1.weight, std=0.2)
    x = torch.rand(2, 8, 7, 7)
    torch.manual_seed(1)
    out, states = nca(x, 5, return_states=True)
    torch.manual_seed(1)
    rolled = list(nca.rollout(x, 5))
    assert len(rolled) == 5
    for a, b in zip(rolled, states, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rolled[-1], out)


def test_segmentation_states_end_at_forward() -> None:
    torch.manual_seed(0)
    cfg = SegModelConfig(dim=2, channels=8, hidden=16, scale=2, steps=(3, 2), kernels=(3, 3))
    model = SegmentationNCA(cfg)
    for level in model.levels:
        torch.nn.init.normal_(level.rule.fc1.weight, std=0.2)
    img = torch.randn(1, 1, 16, 12)
    with torch.no_grad():
        torch.manual_seed(2)
        logits = model(img).logits
        torch.manual_seed(2)
        seen = list(model.states(img))
    assert [(level, step) for level, step, _ in seen] == [(0, s) for s in range(4)] + [
        (1, s) for s in range(3)
    ]
    assert seen[0][2].shape == (1, 8, 8, 6) and seen[-1][2].shape == (1, 8, 16, 12)
    assert torch.equal(seen[-1][2][:, 1:2], logits)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_step_budget_equals_the_whole_forward(backend: str) -> None:
    # M3D-NCA shape: a 7-wide kernel at the coarse level; the budget cuts both levels into slabs
    torch.manual_seed(0)
    cfg = SegModelConfig(dim=3, channels=8, hidden=16, scale=2, steps=(3, 3), kernels=(7, 3))
    model = SegmentationNCA(cfg)
    set_backend(model, backend)
    for level in model.levels:
        torch.nn.init.normal_(level.rule.fc1.weight, std=0.2)
    img = torch.randn(1, 1, 24, 20, 20)
    plane = 20 * 20 * slabs.step_bytes_per_cell(model.levels[1])
    budget = 2 * plane  # level 1 in slabs of 2 planes, level 0 (4x smaller planes) of 8
    for level, size in ((0, (12, 10, 10)), (1, (24, 20, 20))):
        assert slabs.slab_depth(model.levels[level], torch.empty(1, 8, *size), budget) < size[0]
    with torch.no_grad():
        torch.manual_seed(5)
        whole = model(img).logits
        torch.manual_seed(5)
        sliced = model(img, step_budget=budget).logits
    assert not torch.allclose(whole, torch.zeros_like(whole))
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="inference"):
        model(img, step_budget=budget)  # gradients on


def test_step_budget_with_alive_masking_and_fixed_filters() -> None:
    # the halo covers the perception and the alive mask of the new state
    torch.manual_seed(0)
    nca = NCA(NCAConfig(channels=8, fixed_channels=0, hidden=16, filters=("sobel",), alive_channel=3))
    torch.nn.init.normal_(nca.rule.fc1.weight, std=0.3)
    x = torch.rand(2, 8, 30, 9) * 0.2
    budget = 2 * 9 * 2 * slabs.step_bytes_per_cell(nca)  # 2 planes of 2 x 9 cells
    assert slabs.halo(nca) == 2 and slabs.slab_depth(nca, x, budget) == 2
    with torch.no_grad():
        torch.manual_seed(1)
        whole = nca(x, 6)
        torch.manual_seed(1)
        sliced = nca(x, 6, step_budget=budget)
    assert (whole == 0).any() and (whole != 0).any()
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)
