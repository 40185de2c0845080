"""Distributed training and inference on gloo (CPU): many processes, one run.

Every test starts real processes through ``torchrun`` (torch.distributed.run) on loopback, with small
sizes and one thread per rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ncatool.runtime import read_checkpoint

TINY_SEG = ["--set", "target_size=16,16", "--set", "steps=4,4", "--set", "hidden=16", "--set", "channels=8",
            "--set", "patch=0,8", "--set", "samples=0", "--set", "iters_per_epoch=3"]  # fmt: skip
TINY_GROW = ["--set", "img_size=8", "--set", "padding=2", "--set", "pool_size=16", "--set", "train_steps=3,5",
             "--set", "hidden=16", "--set", "iters_per_epoch=3", "--set", "val_steps=4", "--set", "samples=0",
             "--set", "damage=true"]  # fmt: skip
ENV = {**os.environ, "NCATOOL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
#: 2 ranks vs 1 process, same global batch: the weights agree up to float reduction order (the
#: gradient of the whole batch summed in two halves, then averaged); measured ~1e-6 after 6 Adam steps.
TOLERANCE = 1e-4


def _ncatool(*args: str) -> list[str]:
    return [sys.executable, "-m", "ncatool", "-q", *args]


def _torchrun(nproc: int, *args: str, extra: tuple[str, ...] = ("--standalone",)) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *extra, f"--nproc_per_node={nproc}", "-m", "ncatool",
            "-q", *args]  # fmt: skip


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["seg2d", "grow"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(
    task: str, toy_dataset: Callable[..., Path], tmp_path: Path
) -> None:
    """The global batch is split, not repeated: 2 ranks end where 1 process ends (fire masks, the
    grow sample pool and damage included); each epoch is logged once, by rank 0."""
    if task == "seg2d":
        args = ["train", "--task", task, "--data", str(toy_dataset(2, size=16)), *TINY_SEG]
    else:
        args = ["train", "--task", task, *TINY_GROW]
    args += ["--epochs", "2", "--seed", "4", "--batch-size", "4"]
    one = _run(_ncatool(*args, "--out", str(tmp_path / "one")))
    assert one.returncode == 0, one.stderr
    two = _run(_torchrun(2, *args, "--out", str(tmp_path / "two")))
    assert two.returncode == 0, two.stderr
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < TOLERANCE
    assert _epochs(tmp_path / "two") == [1, 2]


def test_an_odd_global_batch_is_refused(toy_dataset: Callable[..., Path], tmp_path: Path) -> None:
    data = toy_dataset(2, size=16)
    args = ["train", "--task", "seg2d", "--data", str(data), *TINY_SEG, "--epochs", "1", "--batch-size", "3"]
    proc = _run(_torchrun(2, *args, "--out", str(tmp_path / "odd")))
    assert proc.returncode != 0
    assert "batch_size 3 cannot be split evenly over 2 ranks" in proc.stderr
    assert not (tmp_path / "odd" / "checkpoints").exists()


def test_killed_distributed_run_resumes_bit_identical(
    toy_dataset: Callable[..., Path], tmp_path: Path
) -> None:
    """SIGKILL every rank mid-run, ``torchrun ... --resume``: the same weights as the uninterrupted
    distributed run (same world size)."""
    data = toy_dataset(2, size=16)
    args = ["train", "--task", "seg2d", "--data", str(data), *TINY_SEG, "--epochs", "4", "--seed", "2",
            "--batch-size", "2", "--set", "iters_per_epoch=12"]  # fmt: skip
    full = _run(_torchrun(2, *args, "--out", str(tmp_path / "full")))
    assert full.returncode == 0, full.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _torchrun(2, *args, "--out", str(run)), env=ENV, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((run / "metrics.jsonl").is_file() and _epochs(run)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    done = read_checkpoint(run / "checkpoints" / "last.pt")["run_state"]["epoch"]
    assert 1 <= done < 4, "the run finished before it could be killed"
    resumed = _run(_torchrun(2, "train", "--resume", str(run)))
    assert resumed.returncode == 0, resumed.stderr
    assert _max_diff(_weights(tmp_path / "full"), _weights(run)) == 0.0
    assert _epochs(run) == [1, 2, 3, 4]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_nodes_on_loopback_train_one_run(toy_dataset: Callable[..., Path], tmp_path: Path) -> None:
    """``torchrun --nnodes 2 --node_rank 0|1 --master_addr 127.0.0.1`` started twice: one run, the same
    weights as ``--nproc 2`` on one node."""
    data = toy_dataset(2, size=16)
    args = ["train", "--task", "seg2d", "--data", str(data), *TINY_SEG, "--epochs", "2", "--batch-size", "2"]
    port = str(_free_port())
    nodes = []
    for rank in (0, 1):
        node = ("--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}")
        cmd = _torchrun(1, *args, "--out", str(tmp_path / "multi"), extra=node)
        nodes.append(subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True))
    for node in nodes:
        _, err = node.communicate(timeout=240)
        assert node.returncode == 0, err
    local = _run(_ncatool(*args, "--nproc", "2", "--out", str(tmp_path / "local")))
    assert local.returncode == 0, local.stderr
    assert _max_diff(_weights(tmp_path / "multi"), _weights(tmp_path / "local")) == 0.0
    assert _epochs(tmp_path / "multi") == [1, 2]


def test_a_folder_in_use_is_refused_and_a_killed_run_leaves_no_lock(
    toy_dataset: Callable[..., Path], tmp_path: Path
) -> None:
    data = toy_dataset(2, size=16)
    run = tmp_path / "run"
    args = ["train", "--task", "seg2d", "--data", str(data), *TINY_SEG, "--epochs", "50", "--out", str(run)]
    first = subprocess.Popen(_ncatool(*args), env=ENV, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (run / ".lock").is_file():
        time.sleep(0.05)
    time.sleep(0.5)
    second = _run(_ncatool(*args))
    assert second.returncode == 2 and "in use by another ncatool train" in second.stderr, second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = _run(_ncatool("train", "--resume", str(run), "--epochs", "1"))
    assert "in use" not in resumed.stderr, resumed.stderr


def test_predict_and_eval_share_the_cases_among_ranks(
    toy_dataset: Callable[..., Path], tmp_path: Path
) -> None:
    """Each case written exactly once; rank 0 reports; the scores equal a single process's."""
    data = toy_dataset(2, cases=5, size=16)
    run = tmp_path / "run"
    trained = _run(_ncatool("train", "--task", "seg2d", "--data", str(data), *TINY_SEG, "--epochs", "1",
                            "--out", str(run)))  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    ckpt = str(run / "checkpoints" / "last.pt")
    pred = _run(_torchrun(2, "predict", "-c", ckpt, "-i", str(data), "-o", str(tmp_path / "pred"), "--json"))
    assert pred.returncode == 0, pred.stderr
    summary = json.loads(pred.stdout)  # one JSON document: rank 0's
    assert [c["case"] for c in summary["cases"]] == [f"toy_{i:03d}" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [f"toy_{i:03d}.nii.gz" for i in range(5)]
    one = _run(_ncatool("eval", "-c", ckpt, "--data", str(data), "--split", "all", "--json"))
    two = _run(_torchrun(2, "eval", "-c", ckpt, "--data", str(data), "--split", "all", "--json"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert json.loads(one.stdout)["foreground_mean"] == json.loads(two.stdout)["foreground_mean"]
