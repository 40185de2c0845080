"""``incontext``: the model's context sums and chunks, episodes, the four commands in 2D and 3D, bad
inputs, a learning smoke test, and the label-map synthesiser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ncatool.cli import app
from ncatool.config import build_config
from ncatool.data.io import Image, read_image, write_image
from ncatool.models.incontext import ContextStats, InContextModelConfig, InContextNCA, saved_bytes
from ncatool.tasks.incontext import InContextConfig, InContextTask

runner = CliRunner()
ENV = {"NCATOOL_NO_PROGRESS": "1"}
TINY = {
    "target_size": "16,16",
    "steps": "4,4",
    "hidden": "16",
    "channels": "8",
    "clusters": "4",
    "encoder_hidden": "8",
    "code_dim": "4",
    "iters_per_epoch": "2",
    "batch_size": "2",
    "val_episodes": "4",
    "samples": "0",
    "device": "cpu",
}
TINY_3D = {**TINY, "target_size": "8,8,8", "steps": "3,3", "scales": "1,2"}
SPACING_2D, ORIGIN_2D = (0.8, 1.3), (5.0, -2.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def write_dataset(
    root: Path,
    ident: int,
    dim: int = 2,
    cases: int = 5,
    size: int = 20,
    channels: int = 1,
    seed: int = 0,
    empty_label_2: tuple[int, ...] = (),
) -> Path:
    """A small nnU-Net dataset: label 1 a bright ball, label 2 a dimmer box, on a dark noisy field.

    ``empty_label_2``: cases without the box (their label-2 mask is empty).
    """
    ds = root / f"Dataset{ident:03d}_S{ident}"
    rng = np.random.default_rng(seed)
    for i in range(cases):
        shape = (size,) * dim
        grids = np.ogrid[tuple(slice(0, s) for s in shape)]
        centre = rng.uniform(size * 0.3, size * 0.45, dim)
        ball = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) < rng.uniform(3, 4.5) ** 2
        mask = ball.astype(np.uint8)
        if i not in empty_label_2:
            lo = rng.integers(size * 6 // 10, size * 7 // 10, dim)
            box = np.zeros(shape, dtype=bool)
            box[tuple(slice(a, a + 4) for a in lo)] = True
            mask[box & ~ball] = 2
        image = np.choose(mask, [0.1, 1.0, 0.55]) + rng.normal(0, 0.05, shape)
        for c in range(channels):
            img = Image.from_array(
                image.astype(np.float32) * (c + 1), spacing=SPACING_2D if dim == 2 else None
            )
            write_image(img, ds / "imagesTr" / f"c{i:03d}_{c:04d}.nii.gz")
        write_image(
            Image.from_array(mask, spacing=SPACING_2D if dim == 2 else None),
            ds / "labelsTr" / f"c{i:03d}.nii.gz",
        )
    meta = {
        "channel_names": {str(c): f"ch{c}" for c in range(channels)},
        "labels": {"background": 0, "ball": 1, "box": 2},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


def _set(values: dict[str, str]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _invoke(*args: str) -> object:
    return runner.invoke(app, ["-q", *args], env=ENV)


# ---------------------------------------------------------------------------------------------- the model
def _model(**kw: object) -> InContextNCA:
    values = {"clusters": 4, "encoder_hidden": 8, "code_dim": 4, "hidden": 16, "channels": 8, "steps": (3, 3)}
    cfg = InContextModelConfig(**{**values, **kw})  # type: ignore[arg-type]
    return InContextNCA(cfg)


def test_context_stats_are_sums_over_pairs_and_chunks_change_nothing_but_gradients() -> None:
    torch.manual_seed(0)
    model = _model()
    images, masks = torch.randn(2, 5, 1, 12, 12), (torch.rand(2, 5, 1, 12, 12) > 0.6).float()
    whole = model.context_stats(images, masks)
    parts = ContextStats.total(
        [model.pair_stats(images[:, i : i + 1], masks[:, i : i + 1]) for i in range(5)]
    )
    chunked = model.context_stats(images, masks, chunk=2)
    for a, b, c in zip(whole._tensors(), parts._tensors(), chunked._tensors(), strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    assert whole.count.tolist() == [5.0, 5.0]
    # only the last chunk carries gradients: the encoder sees exactly those pairs in backward
    images.requires_grad_(True)
    model.context_stats(images, masks, chunk=2).fg.sum().backward()
    touched = images.grad.flatten(2).abs().sum(2)[0] > 0  # type: ignore[union-attr]
    assert touched.tolist() == [False, False, False, True, True]


def test_training_memory_does_not_grow_with_k_when_chunked() -> None:
    model = _model()
    small, large = saved_bytes(model, 2, 2, (16, 16), 2), saved_bytes(model, 16, 2, (16, 16), 2)
    assert large <= 1.3 * small, (small, large)
    assert saved_bytes(model, 16, 0, (16, 16), 2) > 2 * small  # without chunks it grows: the test can fail


def test_an_untrained_model_outputs_its_prior_and_any_k_runs() -> None:
    torch.manual_seed(0)
    for model in (_model(levels=1, steps=(3,), kernels=(3,)), _model()):  # one level, two levels
        q = torch.randn(3, 1, 12, 12)
        for k in (1, 7):
            masks = (torch.rand(3, k, 1, 12, 12) > 0.5).float()
            logits, bayes = model.eval().segment(q, model.context_stats(torch.randn(3, k, 1, 12, 12), masks))  # type: ignore[misc]
            torch.testing.assert_close(logits, bayes)  # the rule's last layer starts at zero


# ---------------------------------------------------------------------------------------------- episodes
def test_episodes_never_use_held_out_labels_and_never_put_the_query_in_its_context(tmp_path: Path) -> None:
    ds = write_dataset(tmp_path, 11, cases=5)
    cfg = build_config(
        InContextConfig, {**TINY, "data": str(ds), "holdout_labels": "box", "union_prob": "0.5"}
    )
    task = InContextTask(cfg, torch.device("cpu"))
    rng = np.random.default_rng(0)
    for _ in range(40):
        ep = task.sampler.draw(rng, 3)
        assert ep.task.labels == (1,) and ep.query not in ep.context
    assert {e.task.labels for e in task.holdout_episodes} == {(2,)}
    assert all(e.task.labels == (1,) for e in task.val_episodes)


def test_stage_2_runs_at_a_fifth_of_the_learning_rate_unless_set() -> None:
    assert build_config(InContextConfig, {"stage": "2"}).lr == pytest.approx(0.2 * InContextConfig.lr)
    assert build_config(InContextConfig, {"stage": "2", "lr": "0.01"}).lr == 0.01
    assert build_config(InContextConfig, {"data": ["a", "b"]}).data == ("a", "b")


# ---------------------------------------------------------------------------------------------- the commands
@pytest.mark.parametrize("dim", [2, 3])
def test_the_four_commands(tmp_path: Path, dim: int) -> None:
    size = 20 if dim == 2 else 12
    a = write_dataset(tmp_path, 101, dim, cases=4, size=size, seed=1)
    b = write_dataset(tmp_path, 102, dim, cases=4, size=size, seed=2)
    new = write_dataset(tmp_path, 200, dim, cases=5, size=size, seed=3)
    tiny = _set({**(TINY if dim == 2 else TINY_3D), "samples": "1"})
    run1, run2 = tmp_path / "ic1", tmp_path / "ic2"
    r = _invoke("train", "--task", "incontext", "--data", str(a), "--data", str(b), "--set", "stage=1",
                "--epochs", "1", *tiny, "--out", str(run1))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((run1 / "config.json").read_text())["data"] == [str(a), str(b)]
    assert (run1 / "samples" / "epoch_001.png").is_file()
    r = _invoke("train", "--task", "incontext", "--data", str(a), "--data", str(b), "--set", "stage=2",
                "--init", str(run1 / "checkpoints" / "best.pt"), "--epochs", "1", *tiny, "--out", str(run2))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((run2 / "config.json").read_text())["lr"] == pytest.approx(0.2 * InContextConfig.lr)
    ckpt = run2 / "checkpoints" / "last.pt"
    pred = tmp_path / "pred"
    r = _invoke("predict", "-c", str(ckpt), "--context", str(new), "--context-size", "4", "-i", str(a / "imagesTr"),
                "-o", str(pred), "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    masks = sorted(pred.glob("*.nii.gz"))
    assert len(masks) == 4
    source = read_image(a / "imagesTr" / "c000_0000.nii.gz")
    out = read_image(pred / "c000.nii.gz")
    assert (
        out.array.shape == source.array.shape
        and out.spacing == source.spacing
        and out.origin == source.origin
    )
    assert set(np.unique(out.array)) <= {0, 1, 2}
    r = _invoke("eval", "-c", str(ckpt), "--data", str(new), "--context-size", "1,2,4", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert set(summary["context_size"]) == {"1", "2", "4"}
    assert set(summary["context_size"]["2"]["labels"]) == {"1", "2"}
    assert summary["context_size"]["1"]["labels"]["1"]["n"] == 5 * 5  # queries x draws
    assert 0.0 <= summary["metrics"]["dice_k4"] <= 1.0


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ic")
    ds = write_dataset(root, 101, cases=4)
    run = root / "run"
    r = _invoke(
        "train", "--task", "incontext", "--data", str(ds), "--epochs", "1", *_set(TINY), "--out", str(run)
    )
    assert r.exit_code == 0, r.output
    return {"ds": ds, "ckpt": run / "checkpoints" / "last.pt", "root": root}


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("channels", "channel"),
        ("query_3d", "is 3D"),
        ("label", "label 7"),
        ("k", "larger than"),
        ("empty", "'box'"),
        ("no_context", "--context"),
    ],
)
def test_bad_inputs_exit_2_naming_the_problem_and_write_nothing(
    trained: dict[str, Path], tmp_path: Path, case: str, needle: str
) -> None:
    root = tmp_path
    context, query, extra = trained["ds"], trained["ds"] / "imagesTr", ["--context-size", "2"]
    if case == "channels":
        context = write_dataset(root, 150, channels=2)
    elif case == "query_3d":
        query = write_dataset(root, 151, dim=3, size=8) / "imagesTr"
    elif case == "label":
        extra += ["--labels", "7"]
    elif case == "k":
        extra = ["--context-size", "9"]
    elif case == "empty":
        context = write_dataset(root, 152, cases=4, empty_label_2=(0, 1, 2))
    out = root / "out"
    args = ["predict", "-c", str(trained["ckpt"]), "-i", str(query), "-o", str(out), *extra]
    if case != "no_context":
        args += ["--context", str(context)]
    r = _invoke(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert not out.exists()


def test_eval_refuses_k_larger_than_the_cases_holding_a_label(trained: dict[str, Path]) -> None:
    r = _invoke("eval", "-c", str(trained["ckpt"]), "--data", str(trained["ds"]), "--context-size", "4")
    assert r.exit_code == 2 and "k at most 3" in r.output, r.output


def test_other_tasks_refuse_the_context_options_and_one_dataset_tasks_refuse_two(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    seg = Path(__file__).parent / "fixtures" / "main_2f367d7" / "seg2d" / "last.pt"
    r = _invoke("predict", "-c", str(seg), "-i", str(trained["ds"]), "-o", str(tmp_path / "o"),
                "--context", str(trained["ds"]))  # fmt: skip
    assert r.exit_code == 2 and "--context does not apply" in r.output, r.output
    r = _invoke("eval", "-c", str(seg), "--data", str(trained["ds"]), "--context-size", "2")
    assert r.exit_code == 2 and "--context-size does not apply" in r.output, r.output
    r = _invoke("train", "--task", "seg2d", "--data", str(trained["ds"]), "--data", str(trained["ds"]))
    assert r.exit_code == 2 and "data takes one value, got 2" in r.output, r.output


def test_init_loads_weights_only_and_refuses_another_task(trained: dict[str, Path], tmp_path: Path) -> None:
    seg = Path(__file__).parent / "fixtures" / "main_2f367d7" / "seg2d" / "last.pt"
    r = _invoke("train", "--task", "incontext", "--data", str(trained["ds"]), "--init", str(seg), *_set(TINY),
                "--out", str(tmp_path / "x"))  # fmt: skip
    assert r.exit_code == 2 and "not incontext" in r.output, r.output
    r = _invoke("train", "--resume", str(tmp_path / "x"), "--init", str(trained["ckpt"]))
    assert r.exit_code == 2 and "exclude each other" in r.output, r.output


# ---------------------------------------------------------------------------------------------- learning
def test_training_lowers_the_loss_and_beats_the_untrained_model(tmp_path: Path) -> None:
    ds = write_dataset(tmp_path, 120, cases=6, size=16, seed=4)
    values = {**TINY, "data": str(ds), "iters_per_epoch": "10", "lr": "0.01", "union_prob": "0", "seed": "0"}
    task = InContextTask(build_config(InContextConfig, values), torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_model()
    before = task.validate(model.eval())["dice"]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    model.train()
    for epoch in range(8):
        for batch in task.batches(epoch, 4):
            loss, _ = task.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    after = task.validate(model.eval())["dice"]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses
    assert after > before + 0.1, (before, after)


# ---------------------------------------------------------------------------------------------- synthesiser
def test_synthesiser_is_seeded_keeps_geometry_and_only_the_labels(tmp_path: Path) -> None:
    from ncatool.data.synth import synthesize

    labels = np.zeros((12, 14, 16), dtype=np.uint8)
    labels[3:8, 4:10, 5:12] = 1
    labels[6:10, 2:6, 2:6] = 3
    img = Image.from_array(labels, spacing=(0.7, 1.3, 2.5), origin=(10.0, -5.5, 3.25))
    write_image(img, tmp_path / "maps" / "brain.nii.gz")
    args = ["mock-data", "--from-labels", str(tmp_path / "maps"), "--cases", "2", "--seed", "3"]
    for name in ("a", "b"):
        assert _invoke(*args, "--out", str(tmp_path / name)).exit_code == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == [
        "brain_s001_gt.nii.gz",
        "brain_s001_img.nii.gz",
        "brain_s002_gt.nii.gz",
        "brain_s002_img.nii.gz",
    ]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    gt, im = (
        read_image(tmp_path / "a" / "brain_s001_gt.nii.gz"),
        read_image(tmp_path / "a" / "brain_s001_img.nii.gz"),
    )
    src = read_image(tmp_path / "maps" / "brain.nii.gz")  # NIfTI stores float32 geometry
    for out in (gt, im):
        assert out.array.shape == labels.shape and out.spacing == src.spacing and out.origin == src.origin
        assert out.direction == src.direction
    assert set(np.unique(gt.array)) <= {0, 1, 3} and not np.array_equal(gt.array, labels)  # deformed
    assert im.array.min() >= 0.0 and im.array.max() <= 1.0
    image, same = synthesize(labels, np.random.default_rng(0), deform=0.0, blur=0.0, noise=0.0, bias=0.0)
    assert np.array_equal(same, labels)
    means = [image[labels == v].mean() for v in (0, 1, 3)]
    assert all(image[labels == v].std() < 0.2 for v in (0, 1, 3)) and len(set(np.round(means, 3))) == 3


def test_mock_data_shape_labels_give_one_label_per_shape_class(tmp_path: Path) -> None:
    r = _invoke("mock-data", "--out", str(tmp_path / "m"), "--dim", "2", "--cases", "3", "--size-min", "40",
                "--size-max", "40", "--shapes", "disk,square", "--multi", "3", "--shape-labels", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    for rec in json.loads(r.stdout):
        gt = read_image(Path(rec["label"])).array
        present = {int(v) for v in np.unique(gt)} - {0}
        assert present == {1 + ["disk", "square"].index(s) for s in rec["shapes"]}


def test_predict_one_label_with_an_ensemble_writes_its_std_map(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "p"
    r = _invoke("predict", "-c", str(trained["ckpt"]), "--context", str(trained["ds"]), "--context-size", "2",
                "--labels", "2", "--ensemble", "2", "-i", str(trained["ds"] / "imagesTr"), "-o", str(out), "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["labels"] == {"2": "box"} and len(result["context_cases"]["box"]) == 2
    assert all(row["quality"] is not None for row in result["cases"])
    assert set(np.unique(read_image(out / "c000.nii.gz").array)) <= {0, 2}
    assert read_image(out / "c000_std.nii.gz").array.shape == (20, 20)


def test_api_train_takes_a_list_of_datasets_and_init(tmp_path: Path) -> None:
    """``ncatool.train(data=[a, b], init=...)`` is ``--data a --data b --init ...``."""
    import ncatool

    a = write_dataset(tmp_path, 101, 2, cases=4, size=20, seed=1)
    b = write_dataset(tmp_path, 102, 2, cases=4, size=20, seed=2)
    tiny = {**TINY, "samples": "0", "epochs": "1"}
    first = ncatool.train("incontext", [a, b], out=tmp_path / "ic1", stage=1, **tiny)
    assert json.loads((tmp_path / "ic1" / "config.json").read_text())["data"] == [str(a), str(b)]
    ncatool.train(
        "incontext",
        (a, b),
        out=tmp_path / "ic2",
        stage=2,
        init=Path(first["run_dir"]) / "checkpoints" / "best.pt",
        **tiny,
    )
    assert json.loads((tmp_path / "ic2" / "config.json").read_text())["lr"] == pytest.approx(
        0.2 * InContextConfig.lr
    )


# ---------------------------------------------------------------------------------------------- adaptation
def test_adapting_on_the_context_learns_a_task_the_prior_cannot_see_and_leaves_the_model_alone(
    tmp_path: Path,
) -> None:
    """The ball's boundary: inside and rim have one intensity, so the untrained model (its Bayes
    prior) finds nothing; 40 leave-one-out steps on 3 context pairs learn the rim for other queries."""
    from ncatool.data.datasets import DataConfig
    from ncatool.tasks.incontext.adapt import adapt
    from ncatool.tasks.incontext.episodes import boundary, load_dataset
    from ncatool.tasks.incontext.task import episode_dice

    ds = load_dataset(write_dataset(tmp_path, 101, cases=8, size=16, seed=5), DataConfig(), (16, 16))
    rims = boundary(torch.stack([ds.mask(i, [1]) for i in range(8)])[:, None])
    torch.manual_seed(0)
    model = _model().eval()
    weights = [p.detach().clone() for p in model.parameters()]

    def query_dice(m: InContextNCA) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            stats = m.context_stats(
                ds.images[None, :3].expand(5, -1, -1, -1, -1), rims[None, :3].expand(5, -1, -1, -1, -1)
            )
            return float(np.nanmean(episode_dice(m.segment(ds.images[3:], stats)[0], rims[3:])))

    tuned = adapt(model, ds.images[:3], rims[:3], 40, lr=1e-2, batch=4)
    again = adapt(model, ds.images[:3], rims[:3], 40, lr=1e-2, batch=4)
    assert query_dice(model) < 0.3 < 0.6 < query_dice(tuned)
    assert all(torch.equal(a, b) for a, b in zip(tuned.parameters(), again.parameters(), strict=True))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_predict_and_eval_adapt_on_request_and_other_tasks_refuse_it(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    ckpt, ds = str(trained["ckpt"]), str(trained["ds"])
    r = _invoke("predict", "-c", ckpt, "--context", ds, "--context-size", "2", "--adapt-steps", "2",
                "-i", ds, "-o", str(tmp_path / "p"), "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["adapt_steps"] == 2 and len(list((tmp_path / "p").glob("*.nii.gz"))) == 4
    r = _invoke("eval", "-c", ckpt, "--data", ds, "--context-size", "2", "--adapt-steps", "2", "--labels", "1",
                "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["adapt_steps"] == 2
    assert summary["context_size"]["2"]["labels"]["1"]["n"] == 5 * 2  # draws x the queries outside each draw
    seg = Path(__file__).parent / "fixtures" / "main_2f367d7" / "seg2d" / "last.pt"
    r = _invoke("eval", "-c", str(seg), "--data", ds, "--adapt-steps", "3")
    assert r.exit_code == 2 and "--adapt-steps does not apply" in r.output, r.output
