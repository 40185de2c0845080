"""ncatool: Neural Cellular Automata for medical images, as one command-line toolkit."""

from __future__ import annotations

__version__ = "0.1.0"
