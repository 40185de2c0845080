"""The Python API (issue 16, item 4): the README's example runs as written; the package's names load
lazily and stay the API functions; the CLI goes through the same functions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ncatool
from ncatool.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def readme_api_example() -> tuple[str, list[list[str]]]:
    """The ``python`` block of README's "Python API" section, and the commands that make its data."""
    section = (
        (ROOT / "README.md").read_text(encoding="utf-8").split("## Python API", 1)[1].split("\n## ", 1)[0]
    )
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "README's Python API section has no python block"
    commands = [c.split()[1:] for c in re.findall(r"`(ncatool (?:mock-data|prepare) [^`]*)`", section)]
    return code.group(1), commands


def test_readme_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, commands = readme_api_example()
    assert [c[0] for c in commands] == ["mock-data", "prepare"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NCATOOL_NO_PROGRESS", "1")
    for command in commands:
        result = runner.invoke(app, ["-q", *command])
        assert result.exit_code == 0, result.output
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    assert (tmp_path / "runs" / "grow" / "checkpoints" / "best.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir())  # masks written
    assert 0.0 <= namespace["scores"]["foreground_mean"]["Dice"] <= 1.0  # type: ignore[index]
    assert isinstance(namespace["nca"], ncatool.NCA)


def test_import_is_light_and_names_stay_the_api() -> None:
    code = (
        "import sys, ncatool\n"
        "light = not any(m in sys.modules for m in ('torch', 'numpy', 'typer'))\n"
        "import ncatool.train, ncatool.predict, ncatool.evaluate  # the modules of the same names\n"
        "from ncatool.train import Trainer\n"
        "print(light, ncatool.train.__module__, ncatool.predict.__module__, ncatool.evaluate.__module__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", "ncatool.api", "ncatool.predict", "ncatool.evaluate"]


def test_public_names() -> None:
    from ncatool.models.nca import NCA
    from ncatool.runtime import load

    assert set(ncatool.__all__) == {"__version__", *ncatool._API}
    assert ncatool.NCA is NCA and ncatool.load is load and set(ncatool.__all__) <= set(dir(ncatool))
    with pytest.raises(AttributeError):
        ncatool.nope  # noqa: B018
    for name in ("train", "predict", "evaluate", "load"):
        assert getattr(ncatool, name).__doc__ and getattr(ncatool, name).__annotations__


def test_cli_train_and_api_train_are_one_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The API and ``ncatool train`` resolve settings through the same function: same run, same result."""
    monkeypatch.setenv("NCATOOL_NO_PROGRESS", "1")
    tiny = {"img_size": 6, "padding": 2, "pool_size": 8, "train_steps": "2,3", "hidden": 8, "val_steps": 2}
    api = ncatool.train(
        "grow", epochs=1, iters_per_epoch=2, samples=0, out=tmp_path / "a", device="cpu", **tiny
    )
    sets = [x for k, v in tiny.items() for x in ("--set", f"{k}={v}")]
    cli = runner.invoke(app, ["-q", "train", "--task", "grow", "--epochs", "1", "--device", "cpu", "--out",
                              str(tmp_path / "b"), "--set", "iters_per_epoch=2", "--set", "samples=0", *sets,
                              "--json"])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["best_psnr"] == api["best_psnr"]
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert a == b


def test_evaluate_api_refuses_mixed_forms(tmp_path: Path) -> None:
    with pytest.raises(ncatool.NcaError, match="not both"):
        ncatool.evaluate(pred=tmp_path, gt=tmp_path, checkpoint=tmp_path / "x.pt")
    with pytest.raises(ncatool.NcaError, match="nothing to evaluate"):
        ncatool.evaluate()
