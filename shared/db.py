"""asyncpg pool with JSON codecs, used by every service for its database connections."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

T = TypeVar("T")


async def _init_connection(connection: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await connection.set_type_codec(
            name, schema="pg_catalog", encoder=json.dumps, decoder=json.loads
        )


async def _keep_session(_connection: asyncpg.Connection) -> None:
    return None


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, application_name: str = "followups"
) -> asyncpg.Pool:
    """`application_name` shows in pg_stat_activity which service holds a connection."""
    pool = await asyncpg.create_pool(
        dsn,
        server_settings={"application_name": application_name},
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=30,
        # Connections that sat idle across a database restart are dropped, not handed out.
        max_inactive_connection_lifetime=60,
        # The default reset is a round trip on every release. Pooled connections keep no
        # session state (advisory locks are transaction-scoped, no LISTEN, no SET); an open
        # transaction is still rolled back by asyncpg before this runs.
        reset=_keep_session,
    )
    assert pool is not None
    return pool


# Errors that mean "the database is unreachable right now", as opposed to a bad query.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ConnectionFailureError,
    ConnectionError,
    OSError,
    TimeoutError,
)

# Errors after which the same write succeeds if tried again: the database unreachable, or one of
# two transactions that waited for each other's row locks ended by PostgreSQL (statements that
# lock several rows, such as a batch of claims against a cancel of a whole series).
RETRYABLE_WRITE_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.exceptions.DeadlockDetectedError,
)

# Pauses between tries of a write that must not be lost (about 25 s in all).
PERSIST_PAUSES = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0)


async def persist(operation: Callable[[], Awaitable[T]]) -> T:
    """Run a database write again across connection losses and deadlocks. For writes after a
    side effect (the webhook call) that must not make the whole message run again."""
    for pause in PERSIST_PAUSES:
        try:
            return await operation()
        except RETRYABLE_WRITE_ERRORS:
            await asyncio.sleep(pause)
    return await operation()
