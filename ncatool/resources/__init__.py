"""Data that ships inside the package, so that defaults work wherever ncatool is installed.

* ``retina/retina_rgba_64.png``: the default ``--task grow`` target (scikit-image's retina, CC0);
* ``digits/digits_8x8.npz``: the default ``--task digits`` data (scikit-learn's digits, CC BY 4.0).

Provenance, licences and the script that derives them: ``data/README.md`` and
``scripts/derive_data.py`` in the source tree; each folder here carries its own README with the
attribution. They are found with :mod:`importlib.resources`, never through the source checkout.
"""

from __future__ import annotations

import atexit
import contextlib
from importlib.resources import as_file, files
from pathlib import Path

_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def resource_path(*parts: str) -> Path:
    """A file shipped in ``ncatool/resources`` as a path on disk, e.g. ``resource_path("retina",
    "retina_rgba_64.png")``.

    Installed from a wheel or a checkout the file is on disk already; from a zipped install it is
    extracted to a temporary file that lives as long as the process.
    """
    ref = files(__name__).joinpath(*parts)
    if isinstance(ref, Path):
        return ref
    return Path(_extracted.enter_context(as_file(ref)))


__all__ = ["resource_path"]
