"""The CLI shell: --version, --help of every command, light imports, error reporting."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ncatool import __version__
from ncatool.cli import app

runner = CliRunner()
COMMANDS = sorted(cmd.name for cmd in app.registered_commands if cmd.name)


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"ncatool {__version__}"


def test_every_planned_command_is_registered() -> None:
    assert {"mock-data", "prepare", "verify", "train"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ncatool.cli import app\n"
        f"for args in (['--help'], *[[c, '--help'] for c in {COMMANDS!r}]):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "heavy = [m for m in ('torch', 'SimpleITK', 'matplotlib', 'nibabel', 'scipy', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_python_dash_m_works() -> None:
    out = subprocess.run([sys.executable, "-m", "ncatool", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_user_error_is_one_line_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "nope.toml"
    result = runner.invoke(app, ["train", "--config", str(missing)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "Traceback" not in result.output
