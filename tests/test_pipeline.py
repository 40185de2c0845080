"""mock-data → prepare → verify as a user chains them, geometry kept end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.data.io import read_image

runner = CliRunner()


@pytest.mark.parametrize(("dim", "spacing"), [(3, "0.8,0.7,2.5"), (2, "0.5,0.25")])
def test_mock_prepare_verify_keeps_geometry(tmp_path: Path, dim: int, spacing: str) -> None:
    raw, nn = tmp_path / "raw", tmp_path / "nn"
    args = ["mock-data", "--out", str(raw), "--cases", "3", "--dim", str(dim), "--size-min", "12"]
    args += ["--size-max", "16", "--spacing", spacing, "--seed", "4"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(
        app, ["prepare", str(raw), "--out", str(nn), "--dataset-id", "9", "--name", "M", "--json"]
    )
    assert result.exit_code == 0, result.output
    ds = Path(json.loads(result.stdout)["dataset"])
    assert runner.invoke(app, ["verify", str(ds)]).exit_code == 0
    want = tuple(float(s) for s in spacing.split(","))
    for case in ("case_001", "case_002", "case_003"):
        src = read_image(raw / f"{case}_img.nii.gz")
        img = read_image(ds / "imagesTr" / f"{case}_0000.nii.gz")
        lab = read_image(ds / "labelsTr" / f"{case}.nii.gz")
        np.testing.assert_allclose(img.spacing, want, rtol=1e-6)
        for other in (img, lab):
            np.testing.assert_allclose(other.spacing, src.spacing, rtol=1e-6)
            np.testing.assert_allclose(other.origin, src.origin)
            np.testing.assert_allclose(other.direction, src.direction)
        np.testing.assert_array_equal(img.array, src.array)
        assert img.ndim == dim
