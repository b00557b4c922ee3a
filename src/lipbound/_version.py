"""The package version: read by ``pyproject.toml`` (``[tool.setuptools.dynamic]``), the CLI
(``lipbound --version``) and the JSON reports; this line is its one place."""

__version__ = "0.1.0"
