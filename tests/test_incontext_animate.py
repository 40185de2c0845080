"""``ncatool animate`` of in-context checkpoints: the last frame is predict's label map (2D and 3D,
two labels), the frames and summary of the command, and bad input (exit 2, one message, nothing
written). One tiny 2D and one tiny 3D run are trained once for the module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from typer.testing import CliRunner

from ncatool.animate import frame_steps, load_source
from ncatool.cli import app
from ncatool.data.io import Image, read_image, write_image
from ncatool.runtime import AnimateRequest, PredictRequest, load
from ncatool.tasks.incontext.animation import label_map

runner = CliRunner()
ENV = {"NCATOOL_NO_PROGRESS": "1"}
#: Training sizes equal to the images', so predict's mask is the animation's last map, unresized.
TINY = {
    "steps": "3,3", "hidden": "16", "channels": "8", "clusters": "16", "encoder_hidden": "8",
    "code_dim": "4", "iters_per_epoch": "2", "batch_size": "2", "val_episodes": "2", "samples": "0",
    "device": "cpu",
}  # fmt: skip
SIZES = {2: ({"target_size": "16,16"}, 16), 3: ({"target_size": "8,8,8", "scales": "1,2"}, 8)}
SEG2D = Path(__file__).parent / "fixtures" / "main_2f367d7" / "seg2d" / "last.pt"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def write_dataset(root: Path, name: str, dim: int, size: int, seed: int, cases: int = 4) -> Path:
    """An nnU-Net dataset of ``cases`` cases: label 1 a bright ball, label 2 a dimmer box."""
    ds = root / name
    rng = np.random.default_rng(seed)
    for i in range(cases):
        grids = np.ogrid[tuple(slice(0, size) for _ in range(dim))]
        centre = rng.uniform(size * 0.3, size * 0.45, dim)
        mask = (sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) < (size / 5) ** 2).astype(
            np.uint8
        )
        lo = rng.integers(size * 6 // 10, size * 7 // 10, dim)
        mask[tuple(slice(a, a + size // 4) for a in lo)] = 2
        image = np.choose(mask, [0.1, 1.0, 0.55]) + rng.normal(0, 0.05, mask.shape)
        write_image(Image.from_array(image.astype(np.float32)), ds / "imagesTr" / f"c{i:03d}_0000.nii.gz")
        write_image(Image.from_array(mask), ds / "labelsTr" / f"c{i:03d}.nii.gz")
    meta = {"channel_names": {"0": "ch0"}, "labels": {"background": 0, "ball": 1, "box": 2},
            "numTraining": cases, "file_ending": ".nii.gz"}  # fmt: skip
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["-q", *args], env=ENV)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Path]]:
    """Per dimension: a checkpoint trained one epoch, a context dataset and a query from another."""
    root = tmp_path_factory.mktemp("ic_anim")
    out = {}
    for dim, (sizes, size) in SIZES.items():
        train = write_dataset(root, f"Dataset101_T{dim}", dim, size, seed=1)
        context = write_dataset(root, f"Dataset200_C{dim}", dim, size, seed=2)
        overrides = [a for k, v in {**TINY, **sizes}.items() for a in ("--set", f"{k}={v}")]
        run = root / f"run{dim}"
        r = invoke("train", "--task", "incontext", "--data", str(train), "--epochs", "1", *overrides,
                   "--out", str(run))  # fmt: skip
        assert r.exit_code == 0, r.output
        query = train / "imagesTr" / "c000_0000.nii.gz"
        out[dim] = {"ckpt": run / "checkpoints" / "last.pt", "context": context, "query": query}
    return out


@pytest.mark.parametrize("dim", [2, 3])
def test_last_frame_is_predicts_label_map(runs: dict[int, dict[str, Path]], dim: int, tmp_path: Path) -> None:
    """Seeded right before the run (as ``animate`` seeds), the last state's label map is the mask
    ``predict`` writes for the same seed and context, both labels included."""
    r = runs[dim]
    request = AnimateRequest(input=r["query"], context=r["context"], context_size=2, seed=3)
    source = load_source(r["ckpt"], request, device="cpu")
    torch.manual_seed(3)
    states: list[torch.Tensor] = []
    source.run(lambda step, state, level: states.append(state))
    assert len(states) == 1 + source.total_steps == 4  # the finest level's 3 steps and its start
    animated = label_map(source.probs(states[-1]), source.values).numpy()
    result = load(r["ckpt"], device="cpu").predict(
        PredictRequest(
            output=tmp_path / "pred", input=r["query"], context=r["context"], context_size=2, seed=3
        )
    )
    predicted = read_image(result["cases"][0]["mask"]).array
    assert source.describe()["context_cases"] == result["context_cases"]  # the same context
    assert animated.shape == predicted.shape == (SIZES[dim][1],) * dim
    assert np.array_equal(animated, predicted)
    assert len(np.unique(predicted)) >= 2  # a label in it: not trivially equal
    assert not torch.equal(states[0], states[-1])  # the frames show the NCA at work


def test_cli_writes_a_frame_per_step_and_names_the_context(
    runs: dict[int, dict[str, Path]], tmp_path: Path
) -> None:
    r = runs[3]
    out = tmp_path / "ic.gif"
    res = invoke("animate", "-c", str(r["ckpt"]), "--context", str(r["context"]), "--context-size", "2",
                 "--labels", "2", "-i", str(r["query"]), "-o", str(out), "--every", "2", "--hidden", "1",
                 "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["task"] == "incontext" and summary["labels"] == {"2": "box"}
    assert summary["frames"] == len(frame_steps(3, 2)) == 3 and summary["frame_steps"] == [0, 2, 3]
    assert len(summary["context_cases"]["box"]) == 2 and summary["panels"][0].startswith("axial")
    with PILImage.open(out) as im:
        assert im.n_frames == 3 and list(im.size) == summary["size"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["-i", "Q"], "--context DATASET is required to animate incontext checkpoints"),
        ([], "--context DATASET and --input QUERY are required"),
        (["-i", "Q", "--context", "C", "--labels", "7"], "label 7 is not in the context dataset"),
        (["-i", "Q", "--context", "C", "--damage"], "--damage does not apply to incontext"),
        (["-i", "Q", "--context", "C", "--montage"], "apply to volumes"),
    ],
)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(
    runs: dict[int, dict[str, Path]], tmp_path: Path, extra: list[str], needle: str
) -> None:
    r = runs[2]
    names = {"Q": str(r["query"]), "C": str(r["context"])}
    out = tmp_path / "x.gif"
    res = invoke("animate", "-c", str(r["ckpt"]), "-o", str(out), *(names.get(a, a) for a in extra))
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.output and not out.exists()


def test_other_checkpoints_refuse_the_context_options(
    runs: dict[int, dict[str, Path]], tmp_path: Path
) -> None:
    image = write_image(Image.from_array(np.zeros((16, 16), np.float32)), tmp_path / "img.nii.gz")
    out = tmp_path / "x.gif"
    for extra, needle in (
        (["--context", str(runs[2]["context"])], "--context does not apply to seg2d checkpoints"),
        (["--context-size", "2"], "--context-size does not apply to seg2d checkpoints"),
    ):
        res = invoke("animate", "-c", str(SEG2D), "-i", str(image), "-o", str(out), *extra)
        assert res.exit_code == 2 and needle in res.stderr, res.output
        assert not out.exists()
