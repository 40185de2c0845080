"""Process-wide output settings: human output goes to stderr, machine output (``--json``) to stdout.

Messages (:func:`info`, :func:`debug`, :func:`warn`), progress bars (:class:`ProgressBars`) and the
JSON summary (:func:`emit_json`) all go through here, so ``--quiet`` and ``NCATOOL_NO_PROGRESS`` are
obeyed in one place.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
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
    """Write one JSON document to stdout for shell pipelines (rank 0 only under torchrun)."""
    from ncatool.distributed import world

    if not world().is_main:
        return
    sys.stdout.write(json.dumps(payload, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    """Serialise numpy scalars/arrays and paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


class ProgressBars:
    """Rich progress bars on stderr; nothing at all with ``--quiet``, with ``NCATOOL_NO_PROGRESS`` set
    (to any value: logs and CI want no redrawn lines) or with ``enabled=False``.

    Usage::

        with ProgressBars() as bars:
            bar = bars.add("rendering", total=n)  # total None: no known end
            for ...:
                bars.advance(bar)  # or bars.advance(bar, {"loss": 0.12}): numbers and it/s after the bar
            bars.remove(bar)  # optional: drop a finished inner bar (an epoch's batches)

    When disabled every method does nothing, so callers never test for it.

    Args:
        enabled: The caller's own switch (e.g. a ``progress=`` argument), on top of the global ones.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and not state.quiet and os.environ.get("NCATOOL_NO_PROGRESS") is None
        self._bars: Any = None
        self._started: dict[int, float] = {}
        self._done: dict[int, int] = {}

    def __enter__(self) -> ProgressBars:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bars = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=err,
                transient=False,
            )
            self._bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.__exit__(*exc)
            self._bars = None

    def add(self, description: str, total: int | None, completed: int = 0) -> int:
        """A new bar (shown below the others); returns its id (0 when disabled)."""
        if self._bars is None:
            return 0
        bar = int(self._bars.add_task(description, total=total, completed=completed, stats=""))
        self._started[bar] = time.perf_counter()
        self._done[bar] = 0
        return bar

    def advance(self, bar: int, stats: Mapping[str, Any] | None = None) -> None:
        """One step done; with ``stats``, show up to six of its numbers and the rate after the bar."""
        if self._bars is None:
            return
        self._done[bar] += 1
        if stats is None:
            self._bars.advance(bar)
            return
        rate = self._done[bar] / max(time.perf_counter() - self._started[bar], 1e-9)
        shown = {k: v for k, v in stats.items() if isinstance(v, float | int) and k not in ("epoch", "steps")}
        text = " ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:6])
        self._bars.update(bar, advance=1, stats=f"{text} it/s={rate:.2f}")

    def remove(self, bar: int) -> None:
        """Take a bar off the display."""
        if self._bars is not None:
            self._bars.remove_task(bar)
