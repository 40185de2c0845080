"""``ncatool config TASK``: every setting of a task with its default and its comment, as TOML."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ncatool.commands.choices import TaskName


def config(
    task: Annotated[
        TaskName, typer.Argument(help="The task whose settings are printed.", show_default=False)
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the TOML here instead of stdout.", show_default=False),
    ] = None,
) -> None:
    """Print every setting of TASK with its default and its comment, as TOML.

    The text is a config file: edit it and pass it back with ncatool train --config FILE.
    """
    from ncatool.config import config_toml
    from ncatool.tasks import config_class

    name = task.value
    text = config_toml(
        config_class(name),
        header=f"Every setting of ncatool train --task {name}, at its default.\n"
        f"Edit and pass back: ncatool train --config FILE (options and --set KEY=VALUE win over the file).",
    )
    if output is None:
        typer.echo(text, nl=False)
        return
    from ncatool.console import info
    from ncatool.data.io import write_text_atomic

    write_text_atomic(text, output)
    info(f"wrote {output}")
