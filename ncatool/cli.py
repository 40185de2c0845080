"""The ``ncatool`` command-line interface.

Commands are thin: they validate options and call one library function. Human-readable output goes
to stderr; ``--json`` output goes to stdout so commands compose in shell pipelines. User errors
(:class:`ncatool.errors.NcaError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from ncatool import __version__
from ncatool.console import err, state
from ncatool.errors import USER_ERROR_EXIT_CODE, NcaError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="ncatool",
    help="Neural Cellular Automata for medical images: data, training, evaluation, animation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def handle_user_errors(func: F) -> F:
    """Turn user errors into one line on stderr and exit code 2 (traceback only with ``--debug``)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NcaError as exc:
            _report(exc, str(exc), getattr(exc, "exit_code", USER_ERROR_EXIT_CODE))
        except OSError as exc:  # permission denied, disk full, ...: the environment, not a bug
            where = f"{exc.filename}: " if exc.filename else ""
            _report(exc, f"{where}{exc.strerror or exc}")
        except KeyboardInterrupt:
            err.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _report(exc: BaseException, message: str, code: int = USER_ERROR_EXIT_CODE) -> None:
    if state.debug:
        err.print_exception(show_locals=False)
    err.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code) from None


def _version_callback(value: bool) -> None:
    if value:
        sys.stdout.write(f"ncatool {__version__}\n")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and warnings on stderr.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """Neural Cellular Automata for medical images."""
    state.quiet = quiet
    state.verbose = verbose and not quiet
    state.debug = debug


def _register() -> None:
    # Imports here are light: each command module defers torch/SimpleITK/matplotlib to its body.
    from ncatool.commands import bench as bench_cmd
    from ncatool.commands import mock_data, prepare, train, verify

    app.command("mock-data")(handle_user_errors(mock_data.mock_data))
    app.command("prepare")(handle_user_errors(prepare.prepare))
    app.command("verify")(handle_user_errors(verify.verify))
    app.command("train")(handle_user_errors(train.train))
    app.command("bench")(handle_user_errors(bench_cmd.bench))
    from ncatool.commands import evaluate, predict

    app.command("predict")(handle_user_errors(predict.predict))
    app.command("eval")(handle_user_errors(evaluate.evaluate))
    from ncatool.commands import animate

    app.command("animate")(handle_user_errors(animate.animate))
    from ncatool.commands import config

    app.command("config")(handle_user_errors(config.config))


_register()
