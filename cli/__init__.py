"""shoal.cli: the ``shoal`` command (SQL shell, one-shot queries, cache and config commands).

Entry point: :func:`shoal.cli.main.main`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shoal")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

__all__ = ["__version__"]
