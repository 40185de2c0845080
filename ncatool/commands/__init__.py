"""CLI command bodies. Each module imports only light modules at import time (typer, pathlib, enum);
torch, SimpleITK and matplotlib are imported inside the command functions so ``--help`` is instant."""
