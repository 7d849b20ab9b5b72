"""Where a process finds its storage and transport when none is given: the
environment variables, the one default SQLite file name and its URL."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "DEFAULT_SQLITE_FILE",
    "DEFAULT_SQLITE_URL",
    "STORAGE_ENV",
    "TRANSPORT_ENV",
    "sqlite_url",
]

STORAGE_ENV = "ORCHESTRATR_STORAGE"
"""Environment variable holding the storage (plugin name or URL)."""
TRANSPORT_ENV = "ORCHESTRATR_TRANSPORT"
"""Environment variable holding the transport (plugin name or URL)."""
DEFAULT_SQLITE_FILE = "orchestratr.sqlite3"
"""The embedded default storage: this file in the working directory."""
DEFAULT_SQLITE_URL = f"sqlite:///{DEFAULT_SQLITE_FILE}"
""":data:`DEFAULT_SQLITE_FILE` as a relative URL (the ``sqlite`` plugin's default)."""


def sqlite_url(path: Path) -> str:
    """The storage URL of a SQLite file (``sqlite:///`` followed by the absolute path)."""
    return "sqlite:///" + str(path.resolve())
