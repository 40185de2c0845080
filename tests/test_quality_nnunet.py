"""``benchmarks/quality/nnunet.py``: the time-budget rules of the nnU-Net row, without nnU-Net installed."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "nnunet.py"


@pytest.fixture(scope="module")
def nnunet() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quality_nnunet", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lr_follows_poly_schedule_in_seconds(nnunet: ModuleType) -> None:
    assert nnunet.budget_lr(0.01, 0.0, 300.0) == pytest.approx(0.01)
    assert nnunet.budget_lr(0.01, 150.0, 300.0) == pytest.approx(0.01 * 0.5**0.9)
    assert nnunet.budget_lr(0.01, 300.0, 300.0) == 0.0
    assert nnunet.budget_lr(0.01, 400.0, 300.0) == 0.0  # past the deadline: no negative base
    assert nnunet.budget_lr(0.01, 5.0, 0.0) == 0.0  # no time at all


def test_stop_rule_ends_within_half_a_step_of_the_deadline(nnunet: ModuleType) -> None:
    """Fixed-length steps against a 10 s deadline: the run ends as near the deadline as steps allow."""
    for step in (0.3, 0.7, 2.5):
        now, last = 0.0, 0.0
        while not nnunet.stop_now(now, 10.0, last):
            now, last = now + step, step
        assert abs(now - 10.0) <= step / 2 + 1e-9
    assert not nnunet.stop_now(0.0, 10.0, 0.0)  # always a first step when time is left
    assert nnunet.stop_now(10.0, 10.0, 0.0)


def test_trainer_module_carries_the_tested_rules(nnunet: ModuleType) -> None:
    """The module written into nnU-Net's venv parses and defines the trainer with these very functions."""
    source = nnunet.trainer_source()
    tree = ast.parse(source)
    names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert names == {"budget_lr", "stop_now", nnunet.TRAINER}
    namespace: dict[str, object] = {}
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    exec(compile(ast.Module(body=functions, type_ignores=[]), "trainer", "exec"), namespace)
    assert namespace["budget_lr"](0.01, 150.0, 300.0) == nnunet.budget_lr(0.01, 150.0, 300.0)  # type: ignore[operator]


def test_dataset_id_needs_an_nnunet_folder_name(nnunet: ModuleType, tmp_path: Path) -> None:
    assert nnunet.dataset_id(tmp_path / "Dataset501_Nuclei") == 501
    with pytest.raises(SystemExit, match="DatasetNNN_Name"):
        nnunet.dataset_id(tmp_path / "nuclei")
