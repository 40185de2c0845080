"""Process-wide output settings: human output goes to stderr, machine output (``--json``) to stdout."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console


@dataclass
class OutputState:
    """Global CLI flags set by the top-level callback."""

    quiet: bool = False
    verbose: bool = False
    debug: bool = False


state = OutputState()
#: Human-readable progress, tables and messages. Never stdout, so pipelines can read ``--json``.
err = Console(stderr=True, highlight=False)


def info(message: str) -> None:
    """Print a progress/info line to stderr unless ``--quiet``."""
    if not state.quiet:
        err.print(message)


def debug(message: str) -> None:
    """Print a detail line to stderr only with ``--verbose``."""
    if state.verbose and not state.quiet:
        err.print(f"[dim]{message}[/dim]")


def warn(message: str) -> None:
    """Print a warning to stderr (shown even with ``--quiet``)."""
    err.print(f"[yellow]warning:[/yellow] {message}")


def emit_json(payload: Any) -> None:
    """Write one JSON document to stdout for shell pipelines."""
    sys.stdout.write(json.dumps(payload, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    """Serialise numpy scalars/arrays and paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
