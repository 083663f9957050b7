"""requirements.lock (runtime, what the image installs) and requirements-dev.lock (the tests'
tools besides), both written by `make lock` from pyproject.toml with a hash for every file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(name: str) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes)."""
    entries: dict[str, tuple[str, int]] = {}
    current = ""
    for line in (ROOT / name).read_text().splitlines():
        match = _ENTRY.match(line)
        if match:
            current = _normal(match[1])
            entries[current] = (match[2], 0)
        elif line.strip().startswith("--hash=sha256:") and current:
            version, hashes = entries[current]
            entries[current] = (version, hashes + 1)
    return entries


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        name, version = re.sub(r"\[.*\]", "", requirement).split("==")
        pins[_normal(name)] = version
    return pins


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_runtime_dependency_is_locked_at_its_pin():
    lock = read_lock("requirements.lock")
    for name, version in _pins(PROJECT["dependencies"]).items():
        assert lock[name][0] == version, name


def test_the_runtime_lock_holds_no_development_tool():
    lock = read_lock("requirements.lock")
    for name in _pins(PROJECT["optional-dependencies"]["dev"]):
        assert name not in lock, f"{name} is a development tool"


def test_the_dev_lock_has_every_tool_and_the_runtime_versions():
    runtime, dev = read_lock("requirements.lock"), read_lock("requirements-dev.lock")
    for name, version in _pins(PROJECT["optional-dependencies"]["dev"]).items():
        assert dev[name][0] == version, name
    for name, (version, _) in runtime.items():
        assert dev[name][0] == version, f"{name}: the dev lock must keep the runtime's version"


def test_every_locked_file_has_a_hash():
    for name in ("requirements.lock", "requirements-dev.lock"):
        lock = read_lock(name)
        assert len(lock) > 20
        assert all(hashes > 0 for _, hashes in lock.values()), name


def test_the_image_and_make_install_use_the_locks_with_hashes():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes --requirement requirements.lock" in dockerfile
    instructions = [line for line in dockerfile.splitlines() if not line.startswith("#")]
    assert not any("requirements-dev.lock" in line for line in instructions)
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCKS := requirements.lock requirements-dev.lock" in makefile
    assert "cat $(LOCKS) pyproject.toml | sha1sum" in makefile
    assert "--require-hashes -r requirements.lock -r requirements-dev.lock" in makefile
