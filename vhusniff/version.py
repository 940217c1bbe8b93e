"""The one place the version is said (pyproject.toml reads it; captures name it)."""
__version__ = "0.1.0"
