"""Packages from the npm registry for tests that need them, installed into a folder of the test's
own (never into the repository)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def npm_install(folder: Path, *packages: str) -> Path:
    """Install `packages` (name@version) under `folder`; returns its node_modules."""
    if shutil.which("npm") is None:
        pytest.fail("npm is missing (Debian: apt-get install nodejs npm)")
    subprocess.run(
        [
            "npm",
            "install",
            "--prefix",
            str(folder),
            "--no-save",
            "--no-audit",
            "--no-fund",
            *packages,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return folder / "node_modules"
