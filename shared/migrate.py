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


# Every service's pod runs `followups migrate` before it starts (Kubernetes init containers), so
# several runs meet on one database: dbmate's migration lock (a PostgreSQL advisory lock) makes
# the later ones wait and then find nothing to do. Long enough for a migration that rebuilds an
# index on a big table; a run that waits longer fails, and its pod retries.
MIGRATION_LOCK_TIMEOUT = "15m"
_UP = (
    "--wait",
    "--wait-timeout",
    "30s",
    "--migration-lock",
    "--migration-lock-timeout",
    MIGRATION_LOCK_TIMEOUT,
    "up",
)


def migrate(database_url: str) -> str:
    """Create the database if needed and apply every pending migration; returns dbmate's report.

    Safe to run from several processes at once: each migration is applied once.
    """
    result = run_dbmate(database_url, *_UP)
    if result.returncode != 0 and _lost_creation_race(result):
        # Runs that start together on a server without the database all try to create it, and
        # dbmate holds no lock for that; the losers find it there on a second try.
        result = run_dbmate(database_url, *_UP)
    if result.returncode != 0:
        raise ConfigurationError(
            f"migrations failed: {result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout.strip()


def _lost_creation_race(result: subprocess.CompletedProcess[str]) -> bool:
    return "Creating:" in result.stdout and "Applying:" not in result.stdout


def pending_migrations(database_url: str) -> list[str]:
    result = run_dbmate(database_url, "status")
    return [
        line.removeprefix("[ ]").strip()
        for line in result.stdout.splitlines()
        if line.startswith("[ ]")
    ]
