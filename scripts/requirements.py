#!/usr/bin/env python3
"""Print the project's requirements from pyproject.toml, one per line (standard library only).

``python scripts/requirements.py [EXTRA ...]`` prints ``[project].dependencies`` plus the named
optional extras. ``./dev`` installs them with build isolation before it builds our own package
without isolation, so no build depends on what happens to be installed or cached.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(extras: list[str]) -> list[str]:
    """The base dependencies and those of each extra in ``extras``, in file order."""
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    project = project["project"]
    reqs = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"requirements: no extra named {extra!r} in pyproject.toml")
        reqs += optional[extra]
    return reqs


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:])))
