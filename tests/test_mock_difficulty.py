"""``mock-data --difficulty`` and its settings (contrast, texture, touching objects): seeded, tiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.data.io import read_image
from ncatool.data.mock import DIFFICULTIES, case_rng, generate_case, resolve_difficulty, texture_field
from ncatool.errors import NcaError

runner = CliRunner()
SMALL = ["--size-min", "20", "--size-max", "24"]


def touching_labels(mask: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different labels (> 0) that share a voxel face."""
    pairs = set()
    for axis in range(mask.ndim):
        a, b = np.moveaxis(mask, axis, 0)[:-1], np.moveaxis(mask, axis, 0)[1:]
        contact = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[contact].tolist(), b[contact].tolist(), strict=True)}
    return pairs


def test_hard_preset_settings() -> None:
    hard = DIFFICULTIES["hard"]
    assert hard.n_objects == 3 and hard.touching and hard.texture > 0 and hard.contrast is not None
    assert DIFFICULTIES["easy"].contrast is None and not DIFFICULTIES["easy"].touching
    assert resolve_difficulty("hard", n_objects=2, noise=None).n_objects == 2
    assert resolve_difficulty("hard", noise=None).noise == hard.noise
    with pytest.raises(NcaError, match="medium"):
        resolve_difficulty("medium")


@pytest.mark.parametrize("dim", [2, 3])
def test_contrast_is_one_step_per_label(dim: int) -> None:
    for index in range(4):
        image, mask, _ = generate_case(
            case_rng(5, index), dim=dim, size_min=24, size_max=24, n_objects=3, noise=0.0, bias=0.0,
            contrast=0.2,
        )  # fmt: skip
        assert set(np.unique(mask)) == {0, 1, 2, 3}
        means = [float(image[mask == k].mean()) for k in range(4)]
        steps = np.diff(means)
        # label k sits k steps of 0.2 above the background, each level jittered by at most 0.2 / 8
        assert np.all(steps >= 0.2 - 0.05 - 1e-6) and np.all(steps <= 0.2 + 0.05 + 1e-6), steps
        # the faintest label is far closer to the background than any easy object (>= 0.6 above it)
        assert means[1] - means[0] < 0.3


def test_touching_objects_share_faces() -> None:
    for index in range(6):
        _, mask, _ = generate_case(
            case_rng(2, index), dim=3, size_min=24, size_max=24, n_objects=3, contrast=0.2, touching=True
        )
        pairs = touching_labels(mask)
        # objects 2 and 3 were each placed against one already there: a connected cluster
        assert len(pairs) >= 2, (index, pairs)
        assert all(np.any(mask == k) for k in (1, 2, 3))


def test_texture_is_fine_grained_and_scaled() -> None:
    field = texture_field(np.random.default_rng(0), (40, 40, 40))
    assert abs(float(field.std()) - 1.0) < 1e-3 and abs(float(field.mean())) < 1e-3
    # neighbouring voxels share their deviation (white noise would give about 0)
    assert float(np.corrcoef(field[:, :, :-1].ravel(), field[:, :, 1:].ravel())[0, 1]) > 0.5

    kwargs = dict(dim=3, size_min=24, size_max=24, n_objects=1, noise=0.0, bias=0.0, contrast=0.3)
    clean, mask, _ = generate_case(case_rng(1, 0), **kwargs)
    textured, mask2, _ = generate_case(case_rng(1, 0), texture=0.5, **kwargs)
    assert np.array_equal(mask, mask2)
    residual = textured - clean
    assert (
        abs(float(residual.std()) - 0.5 * (float(clean[mask == 1].mean()) - float(clean[mask == 0].mean())))
        < 0.01
    )


def test_cli_hard_writes_three_touching_labels(tmp_path: Path) -> None:
    out = tmp_path / "hard"
    result = runner.invoke(
        app, ["-q", "mock-data", "--out", str(out), "--cases", "2", "--difficulty", "hard", *SMALL]
    )
    assert result.exit_code == 0, result.output
    for case in ("case_001", "case_002"):
        mask = read_image(out / f"{case}_gt.nii.gz").array
        assert set(np.unique(mask)) == {0, 1, 2, 3}
        assert touching_labels(mask)
    again = tmp_path / "again"
    runner.invoke(
        app, ["-q", "mock-data", "--out", str(again), "--cases", "2", "--difficulty", "hard", *SMALL]
    )
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in again.iterdir())


def test_cli_explicit_options_override_the_preset(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["-q", "mock-data", "--out", str(tmp_path), "--cases", "1", "--difficulty", "hard", "--multi", "2",
              "--apart", *SMALL],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert set(np.unique(read_image(tmp_path / "case_001_gt.nii.gz").array)) == {0, 1, 2}


def test_cli_easy_is_the_default(tmp_path: Path) -> None:
    for name, extra in (("default", []), ("easy", ["--difficulty", "easy"])):
        result = runner.invoke(
            app, ["-q", "mock-data", "--out", str(tmp_path / name), "--cases", "1", *SMALL, *extra]
        )
        assert result.exit_code == 0, result.output
    assert (tmp_path / "default" / "case_001_img.nii.gz").read_bytes() == (
        tmp_path / "easy" / "case_001_img.nii.gz"
    ).read_bytes()


@pytest.mark.parametrize("option", [["--contrast", "0"], ["--contrast", "-0.1"], ["--texture", "-1"]])
def test_cli_bad_settings_write_nothing(tmp_path: Path, option: list[str]) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["mock-data", "--out", str(out), "--cases", "1", *option, *SMALL])
    assert result.exit_code == 2
    assert "--contrast" in result.output or "--texture" in result.output
    assert not out.exists()
