"""The benchmark's reading of py-spy's collapsed stacks (bench/profile.py)."""

from __future__ import annotations

from bench.profile import frame_name, summarise

STACKS = [
    # busy in our handler, inside a database call
    "run (asyncio/runners.py:118);handle (services/dispatcher/handlers.py:70);"
    "Connection.execute (asyncpg/connection.py:350) 6",
    # busy in our handler itself
    "run (asyncio/runners.py:118);handle (services/dispatcher/handlers.py:75) 2",
    # busy outside our code
    "run (asyncio/runners.py:118);Channel._reader (aiormq/channel.py:40) 2",
    # parked threads: idle, not work
    "WorkerThread.run (anyio/_backends/_asyncio.py:900);Queue.get (queue.py:171);"
    "Condition.wait (threading.py:327) 10",
    # uvloop's C loop, polling or doing its own work: the Python frame that started it
    "run (uvloop/__init__.py:92);Runner.run (asyncio/runners.py:118) 5",
    "not a stack line",
]


def test_frame_name_drops_line_numbers_and_site_packages() -> None:
    assert frame_name("handle (services/dispatcher/handlers.py:70)") == (
        "handle (services/dispatcher/handlers.py)"
    )
    assert frame_name("post (/x/.venv/lib/python3.11/site-packages/httpx/_client.py:1)") == (
        "post (httpx/_client.py)"
    )


def test_summarise_sets_idle_apart_and_shares_busy_samples() -> None:
    summary = summarise(STACKS)
    assert dict(summary["samples"]) == {
        "total": 25.0,
        "idle or inside uvloop's C loop %": 60.0,
        "busy samples through services/ or shared/ %": 80.0,
    }
    own = dict(summary["self"])
    assert own["Connection.execute (asyncpg/connection.py)"] == 60.0
    assert own["handle (services/dispatcher/handlers.py)"] == 20.0
    inclusive = dict(summary["inclusive"])
    assert inclusive["handle (services/dispatcher/handlers.py)"] == 80.0
    # The event loop is plumbing: every sample passes through it, so it is left out.
    assert not any(name.startswith("run (asyncio") for name in inclusive)


def test_summarise_of_nothing_is_empty() -> None:
    assert summarise([]) == {"self": [], "inclusive": []}
