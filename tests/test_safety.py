"""Failing machines: a full disk during training, preemption by SIGTERM / SIGINT."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ncatool.errors import NcaError
from ncatool.runtime import read_checkpoint, write_checkpoint


def _train_cmd(data: Path, out: Path, epochs: int) -> list[str]:
    return [
        sys.executable, "-m", "ncatool", "-q", "train", "--task", "seg2d", "--data", str(data),
        "--epochs", str(epochs), "--seed", "3", "--out", str(out),
        "--set", "target_size=16,16", "--set", "steps=4,4", "--set", "hidden=16", "--set", "channels=8",
        "--set", "patch=0,8", "--set", "samples=0", "--set", "iters_per_epoch=12", "--batch-size", "2",
    ]  # fmt: skip


def test_disk_full_while_writing_a_checkpoint_keeps_the_last_good_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed write (ENOSPC injected at the write) names the checkpoint, leaves no temporary file
    and keeps the previous checkpoint readable."""
    path = tmp_path / "checkpoints" / "last.pt"
    write_checkpoint({"task": "seg2d", "model": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()

    def full(self: object, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("ncatool.runtime._WriteRecorder.write", full)
    with pytest.raises(NcaError, match=r"last\.pt: cannot write.*No space left on device"):
        write_checkpoint({"task": "seg2d", "model": {"w": torch.zeros(1000)}}, path)
    assert path.read_bytes() == good
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def _small_tmpfs(where: Path) -> Path | None:
    """A 64 kB tmpfs at ``where`` when this machine lets the test mount one (root on Linux)."""
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        return None
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True
    )
    return where if proc.returncode == 0 else None


def test_training_on_a_full_disk_exits_2_naming_the_file(
    toy_dataset: Callable[..., Path], tmp_path: Path
) -> None:
    small = _small_tmpfs(tmp_path / "small")
    if small is None:
        pytest.skip("cannot mount a small tmpfs here (the injected-error test above covers the write)")
    try:
        proc = subprocess.run(
            _train_cmd(toy_dataset(2, cases=4, size=16), small / "run", 2),
            capture_output=True, text=True, env={**os.environ, "NCATOOL_NO_PROGRESS": "1"},
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "No space left on device" in proc.stderr
        assert str(small / "run") in proc.stderr
        assert not [p for p in (small / "run").rglob(".*tmp*")]  # no temporary file left behind
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_at_a_safe_point_and_resumes_exactly(
    sig: signal.Signals, toy_dataset: Callable[..., Path], tmp_path: Path
) -> None:
    """SIGTERM/SIGINT mid-epoch: exit 128 + signal, one line saying how to resume, ``last.pt`` the
    last completed epoch; ``--resume`` then ends bit-identical to an uninterrupted run."""
    data = toy_dataset(2, cases=4, size=16)
    env = {**os.environ, "NCATOOL_NO_PROGRESS": "1"}
    epochs = 3
    full = tmp_path / "full"
    subprocess.run(_train_cmd(data, full, epochs), check=True, env=env, capture_output=True)
    run = tmp_path / "stopped"
    proc = subprocess.Popen(_train_cmd(data, run, epochs), env=env, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.02)
    time.sleep(0.05)  # into the next epoch
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and f"ncatool train --resume {run}" in stderr
    done = read_checkpoint(run / "checkpoints" / "last.pt")["run_state"]["epoch"]
    assert 1 <= done < epochs
    assert len(metrics.read_text().splitlines()) == done
    subprocess.run(
        [sys.executable, "-m", "ncatool", "-q", "train", "--resume", str(run)], check=True, env=env
    )
    a = read_checkpoint(full / "checkpoints" / "last.pt")["model"]
    b = read_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == list(range(1, epochs + 1))


def _fill(folder: Path, leave: int) -> None:
    """Fill ``folder``'s filesystem up to ``leave`` free bytes."""
    free = shutil.disk_usage(folder).free
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_every_writer_on_a_full_disk_exits_2_naming_its_output(tmp_path: Path) -> None:
    """mock-data, prepare, predict and animate writing into a full filesystem: one message naming the
    output and the reason, exit 2, no traceback, no temporary file left."""
    small = _small_tmpfs(tmp_path / "small")
    if small is None:
        pytest.skip("cannot mount a small tmpfs here (the injected-error test above covers the write)")
    env = {**os.environ, "NCATOOL_NO_PROGRESS": "1"}

    def ncatool(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ncatool", *args], capture_output=True, text=True, env=env
        )

    fixture = Path(__file__).parent / "fixtures" / "main_2f367d7"
    big = ["--cases", "4", "--size-min", "40", "--size-max", "40"]
    raw = tmp_path / "raw"
    assert ncatool("mock-data", "--out", str(raw), *big).returncode == 0
    try:
        for args in (
            ["mock-data", "--out", str(small / "mock"), *big],
            ["prepare", str(raw), "--out", str(small / "nn"), "--dataset-id", "5", "--name", "F"],
            ["predict", "-c", str(fixture / "seg3d" / "last.pt"), "-i", str(raw), "-o", str(small / "pred")],
            [
                "animate",
                "-c",
                str(fixture / "grow" / "last.pt"),
                "-o",
                str(small / "grow.gif"),
                "--steps",
                "40",
            ],
        ):
            _fill(small, leave=2048)
            proc = ncatool(*args)
            assert proc.returncode == 2, (args[0], proc.stderr)
            assert "Traceback" not in proc.stderr and "No space left on device" in proc.stderr, proc.stderr
            assert str(small) in proc.stderr, proc.stderr
            assert not [p for p in small.rglob("*") if ".tmp" in p.name], args[0]
            for p in small.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
