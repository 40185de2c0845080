"""Config files users already have (YAML, seed 001's train_config.yaml), ``ncatool config TASK`` and
the choices ``--help`` lists (issue 16, items 3 and 5)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.config import build_config, config_toml, field_comments, read_config_file
from ncatool.errors import NcaError
from ncatool.tasks import TASKS, config_class
from ncatool.tasks.growing import GrowConfig

runner = CliRunner()

#: Seed 001's src/train_config.yaml, as its users have it (plus damage).
SEED_001 = """\
target_path: ../data/chest.png
model_path: ../models/chest/L2/chest_sobel.pt
device: mps
iterations: 1000
learning_rate: 0.002
img_size: 28
padding: 0
n_channels: 16
batch_size: 8
pool_size: 1024
filter: sobel
loss: L2
damage: True
"""


# ---------------------------------------------------------------------------------------------- YAML
def test_yaml_config_flat_or_in_sections(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("task: seg2d\ntrain:\n  epochs: 7\n  lr: 1.0e-3\nsteps: [8, 8]\n")
    values = read_config_file(tmp_path / "a.yaml")
    assert values == {"task": "seg2d", "epochs": 7, "lr": 1e-3, "steps": [8, 8]}
    cfg = build_config(config_class("seg2d"), values)
    assert (cfg.epochs, cfg.lr, cfg.steps) == (7, 1e-3, (8, 8))


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yml").write_text("epochs: [1,\n")
    with pytest.raises(NcaError, match="cannot parse config") as err:
        read_config_file(tmp_path / "bad.yml")
    assert "bad.yml" in str(err.value)
    (tmp_path / "c.ini").write_text("x=1")
    with pytest.raises(NcaError, match=r"\.toml, \.json, \.yaml, \.yml"):
        read_config_file(tmp_path / "c.ini")


# ---------------------------------------------------------------------------------------------- seed 001
def test_seed_001_train_config_maps_onto_grow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train_config.yaml").write_text(SEED_001)
    cfg = build_config(GrowConfig, read_config_file(tmp_path / "train_config.yaml"), "train_config.yaml")
    assert cfg.data == "../data/chest.png" and cfg.channels == 16 and cfg.lr == 0.002
    assert cfg.filters == ("sobel",) and cfg.loss == "L2" and cfg.damage is True
    assert (cfg.img_size, cfg.padding, cfg.batch_size, cfg.pool_size) == (28, 0, 8, 1024)
    assert cfg.epochs * cfg.iters_per_epoch == 1000 and cfg.iters_per_epoch == 100
    assert cfg.device in ("mps", "auto")  # mps where this machine has it
    notes = " ".join(capsys.readouterr().err.split())
    for note in (
        "n_channels -> channels",
        "learning_rate -> lr",
        "target_path -> data",
        "filter -> filters",
        "iterations=1000 -> epochs=10 x iters_per_epoch=100",
        "model_path=../models/chest/L2/chest_sobel.pt ignored",
    ):
        assert note in notes


@pytest.mark.parametrize("available", [True, False])
def test_seed_001_device_is_honoured_where_available(
    available: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ncatool.tasks.growing.device_available", lambda name: available)
    cfg = build_config(GrowConfig, {"n_channels": 16, "device": "mps"})
    assert cfg.device == ("mps" if available else "auto")
    # an ncatool config keeps its device as written (select_device reports a missing one)
    assert build_config(GrowConfig, {"channels": 16, "device": "mps"}).device == "mps"


def test_seed_001_iterations_round_up_and_conflicts() -> None:
    cfg = build_config(GrowConfig, {"iterations": 250, "iters_per_epoch": 40})
    assert (cfg.epochs, cfg.iters_per_epoch) == (7, 40)
    assert build_config(GrowConfig, {"iterations": 30}).iters_per_epoch == 30
    with pytest.raises(NcaError, match="iterations or epochs"):
        build_config(GrowConfig, {"iterations": 30, "epochs": 2})
    with pytest.raises(NcaError, match="iterations must be >= 1"):
        build_config(GrowConfig, {"iterations": 0})


def test_unknown_keys_still_rejected_with_the_valid_ones(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(SEED_001 + "n_layers: 3\n")
    with pytest.raises(NcaError, match=r"unknown setting\(s\) \['n_layers'\]; valid: .*channels"):
        build_config(GrowConfig, read_config_file(tmp_path / "t.yaml"))


def test_train_grow_from_a_seed_001_file(tmp_path: Path) -> None:
    target = tmp_path / "data" / "target.png"
    target.parent.mkdir()
    from PIL import Image

    Image.new("RGBA", (12, 12), (200, 40, 40, 255)).save(target)
    text = SEED_001.replace("../data/chest.png", str(target)).replace("iterations: 1000", "iterations: 2")
    text = text.replace("img_size: 28", "img_size: 6").replace("pool_size: 1024", "pool_size: 8")
    (tmp_path / "train_config.yaml").write_text(text)
    result = runner.invoke(app, ["-q", "train", "--task", "grow", "--config", str(tmp_path / "train_config.yaml"),
                                 "--out", str(tmp_path / "run"), "--set", "train_steps=2,3", "--set", "hidden=8",
                                 "--set", "samples=0", "--set", "val_steps=2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["epochs"], saved["iters_per_epoch"], saved["data"]) == (1, 2, str(target))


# ---------------------------------------------------------------------------------------------- ncatool config
@pytest.mark.parametrize("task", sorted(TASKS))
def test_config_command_round_trips_through_train_config(task: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", task])
    assert result.exit_code == 0, result.output
    path = tmp_path / "c.toml"
    path.write_text(result.stdout)
    cls = config_class(task)
    assert build_config(cls, read_config_file(path), str(path)) == cls()
    shown = {line.split(" = ")[0] for line in result.stdout.splitlines() if " = " in line}
    assert shown == {f.name for f in dataclasses.fields(cls)}  # every setting


def test_config_shows_defaults_with_their_comments() -> None:
    text = config_toml(GrowConfig)
    assert 'filters = ["sobel"]  # perception: sobel | scharr' in text  # a field over several lines
    assert "lr = 0.002  # Growing NCA" in text  # the task's own default and comment
    assert "grad_clip = 1.0  # max global grad norm; 0 disables" in text  # the loop's
    seg3d = field_comments(config_class("seg3d"))
    assert seg3d["grad_checkpoint"].startswith("every step recomputed in backward")  # comment above
    assert "hidden" not in seg3d  # no comment anywhere: none invented
    assert "every case resized to this" in seg3d["target_size"]
    assert seg3d["channels"] == "state channels: image + outputs + hidden"  # from the base class


def test_config_output_option_and_train_reads_it(tmp_path: Path) -> None:
    out = tmp_path / "d.toml"
    assert runner.invoke(app, ["-q", "config", "digits", "-o", str(out)]).exit_code == 0
    values = read_config_file(out)
    assert values["task"] == "digits" and values["steps"] == 32


# ---------------------------------------------------------------------------------------------- --help
def test_help_lists_the_choices_and_has_no_stray_spaces() -> None:
    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert "seg2d|seg3d|grow|digits" in result.output
    assert "none|bf16|fp16" in result.output and "auto|cpu|cuda|cuda:N|mps" in result.output
    for command in ("train", "predict", "eval", "animate", "config"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert not re.search(r"\w \.(?![.\w])", text), command  # "Run folder ." of [default: ...] markup


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--task", "segment"], "'segment' is not one of"),
        (["train", "--task", "grow", "--amp", "fp8"], "'fp8' is not one of"),
        (["train", "--task", "grow", "--device", "gpu"], "'gpu' is not one of auto, cpu"),
        (["predict", "-c", "x.pt", "-o", "o", "--device", "cuda:x"], "is not one of auto"),
    ],
)
def test_bad_choices_are_usage_errors(args: list[str], message: str) -> None:
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def test_config_help_does_not_import_torch() -> None:
    import subprocess

    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom ncatool.cli import app\n"
        "CliRunner().invoke(app, ['config', '--help'])\nprint('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
