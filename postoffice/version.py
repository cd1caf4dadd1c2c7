"""The installed version, for ``--version`` of both commands.

Read from the installed distribution's metadata, so that it is the one
``pyproject.toml`` declared when the package was built or installed; a
source tree run without installing says so instead of guessing.
"""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    try:
        return metadata.version("postoffice")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
