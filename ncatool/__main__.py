"""Allow ``python -m ncatool``."""

from ncatool.cli import app

if __name__ == "__main__":
    app()
