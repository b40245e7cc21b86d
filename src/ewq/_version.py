"""ewq's version: the one place it is declared (pyproject reads it)."""

__version__ = "0.1.0"
