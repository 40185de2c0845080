"""ncatool installed from its wheel works outside the source tree (issue 16, item 1).

The wheel is built from a copy of the package, installed with ``--no-deps`` into a fresh virtual
environment, and run from an empty folder with the project's own environment on ``PYTHONPATH`` for
the dependencies only: the defaults that need data (the grow target, the digits) and ``ncatool bench``
(the naive reference) must come from the installed package, never from the checkout.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _build_and_install(tmp: Path) -> Path:
    """The wheel of a copy of the package, installed into ``tmp/venv``; returns its bin folder."""
    src = tmp / "src"
    shutil.copytree(ROOT / "ncatool", src / "ncatool", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    build = [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)]
    subprocess.run(build, check=True, capture_output=True, text=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
    wheels = sorted((tmp / "dist").glob("ncatool-*.whl"))
    assert len(wheels) == 1, wheels
    install = [*pip, "--python", str(tmp / "venv" / "bin" / "python"), "install", "-q", "--no-deps"]
    subprocess.run([*install, str(wheels[0])], check=True, capture_output=True, text=True)
    return tmp / "venv" / "bin"


@pytest.mark.slow
def test_wheel_runs_grow_digits_and_bench_outside_the_checkout(tmp_path: Path) -> None:
    bin_dir = _build_and_install(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=sysconfig.get_paths()["purelib"],  # the dependencies, not the source
        NCATOOL_NO_PROGRESS="1",
        OMP_NUM_THREADS="1",
    )
    ncatool = str(bin_dir / "ncatool")

    def start(command: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [ncatool, *shlex.split(command)],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import ncatool.resources as r; print(r.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv"), where.stdout
    # three processes at once: most of each is importing torch
    runs = {
        "grow": start(
            "-q train --task grow --epochs 1 --out g --json --set iters_per_epoch=1 --set img_size=8 "
            "--set padding=2 --set train_steps=2,3 --set pool_size=8 --set hidden=16 --set val_steps=2 "
            "--set samples=0"
        ),
        "digits": start(
            "-q train --task digits --epochs 1 --out d --json --set iters_per_epoch=1 --set img_size=8 "
            "--set steps=4 --set hidden=16 --set channels=6 --set embed_dim=4 --set batch_size=4 "
            "--set max_items=60 --set val_max=20 --set samples=0"
        ),
        "bench": start(
            "-q bench --quick --only infer2d --no-memory -r 1 --size2d 8 --steps2d 2 --batch2d 1 "
            "--variant fp32 --threads 1 --json"
        ),
    }
    outputs = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"
        outputs[name] = json.loads(out)
    assert outputs["grow"]["task"] == "grow" and (work / "g" / "checkpoints" / "last.pt").is_file()
    assert outputs["digits"]["task"] == "digits" and (work / "d" / "checkpoints" / "last.pt").is_file()
    impls = {row["impl"] for row in outputs["bench"]["results"]}
    assert impls == {"naive", "ncatool"}, outputs["bench"]
    assert not (work / "data").exists() and not (work / "benchmarks").exists()
