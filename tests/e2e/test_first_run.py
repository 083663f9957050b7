"""The README's first run, word for word, in a terminal 80 columns wide: the services as
processes with the console sink, the commands as a newcomer types them, and what the terminal
shows, outside quiet hours and inside them."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from shared.calendar import quiet_until
from shared.settings import QuietHours
from testbed.infra import broker_node
from testbed.processes import ServiceSet
from tests.e2e.conftest import service_env, wait_until

TEMPLATE = "Hi {first_name}, checking in."
FOLLOWUPS = Path(sys.executable).with_name("followups")


def terminal_env(settings, quiet_hours: str) -> dict[str, str]:
    """A newcomer's shell: no webhook (the console sink), the default zone, 80 columns."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("N8N_", "WEBHOOK_"))}
    env.update(
        DATABASE_URL=settings.database_url,
        RABBITMQ_URL=settings.rabbitmq_url,
        DELAY_BACKEND=broker_node().delay_backend,
        QUIET_HOURS=quiet_hours,
        DEFAULT_TIMEZONE="America/New_York",
        COLUMNS="80",
        LINES="50",
    )
    return env


def console_services(settings, receiver, tmp_path: Path, quiet_hours: str) -> ServiceSet:
    env = service_env(settings, receiver, QUIET_HOURS=quiet_hours)
    for name in ("N8N_OUTBOUND_WEBHOOK_URL", "WEBHOOK_ALLOW_INSECURE"):
        env.pop(name)
    env["DEFAULT_TIMEZONE"] = "America/New_York"
    services = ServiceSet(env, tmp_path)
    services.start()
    return services


async def followups(env: dict[str, str], *args: str) -> str:
    """`.venv/bin/followups ARGS` as typed in the terminal; returns what it printed."""
    done = await asyncio.to_thread(
        subprocess.run,
        [str(FOLLOWUPS), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    print(f"\n$ followups {' '.join(args)}\n{done.stdout}", end="")
    return done.stdout


def row_cells(output: str, followup_id: int) -> list[str]:
    """The first line of a follow-up's row in `followups list`, split into its cells."""
    for line in output.splitlines():
        if line.strip().startswith(f"{followup_id} "):
            return re.split(r"\s{2,}", line.strip())
    raise AssertionError(f"no row {followup_id} in:\n{output}")


def number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, text
    return int(match[1])


def assert_readable_at_80(output: str) -> None:
    assert "…" not in output
    assert max(len(line) for line in output.splitlines()) <= 80, output


async def status_of(pool, followup_id: int) -> str:
    return await pool.fetchval(
        "SELECT status FROM contractor_followup_schedules WHERE id = $1", followup_id
    )


async def test_first_run_outside_quiet_hours_at_any_hour(settings, pool, receiver, tmp_path):
    """The default quiet hours and the default zone, at whatever hour the test runs: the demo
    contractor lives where it is daytime, so the follow-up goes ten seconds later."""
    env = terminal_env(settings, "21:00-08:00")
    services = console_services(settings, receiver, tmp_path, "21:00-08:00")
    with (tmp_path / "watch.out").open("w") as out, (tmp_path / "watch.err").open("w") as err:
        watcher = subprocess.Popen(
            [str(FOLLOWUPS), "watch"], env=env, stdout=out, stderr=err, text=True
        )
    try:

        async def watching() -> bool:
            return "watching" in (tmp_path / "watch.out").read_text()

        assert await wait_until(watching, timeout=60), (tmp_path / "watch.err").read_text()

        added = await followups(env, "add-contractor")
        match = re.search(
            r"contractor (\d+) added: Sam Rivera in (\S+), (\d\d:\d\d) there now", added
        )
        assert match, added
        contractor, zone = int(match[1]), ZoneInfo(match[2])
        assert quiet_until(datetime.now(UTC), QuietHours.parse("21:00-08:00"), zone) is None
        assert "inside quiet hours" not in added

        scheduled = await followups(
            env, "schedule", "--contractor", str(contractor), "--in", "10s", "--template", TEMPLATE
        )
        found = re.search(
            r"follow-up (\d+) scheduled for contractor (\d+) \(Sam Rivera\)", scheduled
        )
        assert found, scheduled
        followup_id = int(found[1])
        assert re.search(
            rf"due \d\d:\d\d:\d\d \S+, \w+ \w+ \d\d in {zone.key} \(in 10 s\)", scheduled
        )
        assert re.search(r"key cli-[0-9a-f]{12}", scheduled)
        assert "quiet hours" not in scheduled
        assert f"followups show {followup_id}" in scheduled

        async def sent() -> bool:
            return await status_of(pool, followup_id) == "sent"

        assert await wait_until(sent, timeout=90), services.logs()[-3000:]

        listed = await followups(env, "list")
        assert_readable_at_80(listed)
        cells = row_cells(listed, followup_id)
        assert cells[:4] == [str(followup_id), str(contractor), "manual", "sent"]
        # Listed within a second of an on-time send, the due time reads "now".
        assert re.fullmatch(r"now|\d+ s ago|\d+ min ago", cells[4]), cells
        assert re.match(r"[\d.,]+ (ms|s|min) late", cells[5]), cells

        sink = services["dispatcher"].log_text()
        block = sink[sink.index("CONSOLE SINK · NOT SENT") :]
        assert f"to contractor {contractor} at +*********23 · follow-up {followup_id}" in block
        assert "text     Hi Sam, checking in." in block
        assert re.search(r"^due      \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC$", block, re.M)
        assert re.search(r"^went out .+ UTC · [\d,.]+ ms late$", block, re.M)
        assert "2025550123" not in services.logs()

        async def watched_the_send() -> bool:
            return (
                f"follow-up {followup_id}  contractor {contractor}  manual  sent"
                in (tmp_path / "watch.out").read_text()
            )

        assert await wait_until(watched_the_send, timeout=30), (tmp_path / "watch.out").read_text()
    finally:
        watcher.send_signal(signal.SIGINT)
        code = watcher.wait(timeout=30)
        services.stop()
    watched = (tmp_path / "watch.out").read_text()
    print(f"\n$ followups watch\n{watched}")
    assert code == 0
    assert "Traceback" not in (tmp_path / "watch.err").read_text()
    lines = [line for line in watched.splitlines() if f"follow-up {followup_id} " in line]
    assert [line.split("  ")[4] for line in lines] == ["scheduled", "sent"], watched
    assert re.search(r"\(in \d+ s\)", lines[0]), lines[0]
    assert "ms late" in lines[1]
    assert watched.rstrip().endswith("stopped")


def _window_around(now: datetime) -> str:
    """A quiet window in UTC that holds now and ends two hours later."""
    start, end = now - timedelta(hours=1), now + timedelta(hours=2)
    return f"{start:%H:%M}-{end:%H:%M}"


async def test_first_run_inside_quiet_hours_says_when_it_will_go(
    settings, pool, receiver, tmp_path
):
    """Quiet hours that hold now in the contractor's zone: schedule warns and names the instant
    the dispatcher then moves it to, and list says why it waits."""
    quiet_hours = _window_around(datetime.now(UTC))
    env = terminal_env(settings, quiet_hours)
    services = console_services(settings, receiver, tmp_path, quiet_hours)
    try:
        added = await followups(env, "add-contractor", "--timezone", "UTC")
        contractor = number(r"contractor (\d+) added", added)
        assert f"inside quiet hours {quiet_hours}: follow-ups wait" in added

        started = time.monotonic()
        scheduled = await followups(
            env, "schedule", "--contractor", str(contractor), "--in", "10s", "--template", TEMPLATE
        )
        followup_id = number(r"follow-up (\d+) scheduled", scheduled)
        assert f"inside quiet hours {quiet_hours} in UTC" in scheduled
        goes = re.search(
            r"so it goes at (\d\d:\d\d:\d\d) UTC, \w+ (\w+ \d\d) \(in (\d) h\)", scheduled
        )
        assert goes, scheduled
        assert goes[3] in ("1", "2")

        async def deferred():
            row = await pool.fetchrow(
                "SELECT * FROM contractor_followup_schedules WHERE id = $1", followup_id
            )
            return row if row["deferred_reason"] else None

        assert await wait_until(deferred, timeout=90), services.logs()[-3000:]
        row = await deferred()
        # What schedule said is what the dispatcher did: the same rule, the same instant.
        assert row["status"] == "scheduled"
        assert row["deferred_reason"] == f"quiet_hours {quiet_hours} in UTC"
        assert f"{row['next_attempt_at']:%H:%M:%S}" == goes[1]
        assert f"{row['next_attempt_at']:%b %d}" == goes[2]

        listed = await followups(env, "list")
        assert_readable_at_80(listed)
        cells = row_cells(listed, followup_id)
        assert cells[3] == "scheduled"
        assert re.fullmatch(r"\d+ s ago|in \d+ s|now", cells[4]), cells
        assert "deferred: quiet hours" in " ".join(listed.split())
        assert "CONSOLE SINK" not in services["dispatcher"].log_text()
        print(f"\nfirst run inside quiet hours took {time.monotonic() - started:.1f} s")
    finally:
        services.stop()
