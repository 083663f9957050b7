"""Schema migrations: plain SQL in shared/migrations, applied by dbmate (shipped as a wheel)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from shared.errors import ConfigurationError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def dbmate_url(database_url: str) -> str:
    """dbmate wants postgres:// and an explicit sslmode; asyncpg DSNs often have neither."""
    parts = urlsplit(database_url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("sslmode", "disable")
    return urlunsplit(("postgres", parts.netloc, parts.path, urlencode(query), ""))


def _dbmate() -> str:
    beside_python = Path(sys.executable).parent / "dbmate"
    found = str(beside_python) if beside_python.exists() else shutil.which("dbmate")
    if found is None:
        raise ConfigurationError("dbmate is not installed: run `make install`")
    return found


def run_dbmate(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        _dbmate(),
        "--url",
        dbmate_url(database_url),
        "--migrations-dir",
        str(MIGRATIONS_DIR),
        "--no-dump-schema",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603


def migrate(database_url: str) -> str:
    """Create the database if needed and apply every pending migration; returns dbmate's report."""
    result = run_dbmate(database_url, "--wait", "--wait-timeout", "30s", "up")
    if result.returncode != 0:
        raise ConfigurationError(
            f"migrations failed: {result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout.strip()


def pending_migrations(database_url: str) -> list[str]:
    result = run_dbmate(database_url, "status")
    return [
        line.removeprefix("[ ]").strip()
        for line in result.stdout.splitlines()
        if line.startswith("[ ]")
    ]
