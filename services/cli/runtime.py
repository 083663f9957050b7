"""Getting a deployment going: migrate the database, declare the topology, run the services."""

from __future__ import annotations

import asyncio
import gc
import importlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import Annotated, Any

import typer
import uvloop

from services.cli.common import console, err, fail, load_settings

SERVICES = ("scheduler", "personalizer", "dispatcher")
# Python's default is 700 allocations: a few messages' worth of objects, each collection a
# pause in the middle of a timed send.
GC_YOUNG_THRESHOLD = 20_000
# `run all`: the services with seconds of slack (the intake, the text) yield a shared core to
# the dispatcher, whose sends are timed to the millisecond (nice 5: a third of its CPU weight).
SLACK_NICE = {"scheduler": 5, "personalizer": 5}


def migrate() -> None:
    """Create the database if needed and apply pending migrations.

    Runs started together (one per pod) wait for each other: each migration is applied once.

    Example: [bold]DATABASE_URL=postgresql://127.0.0.1/followups followups migrate[/bold]
    """
    from shared.errors import ConfigurationError
    from shared.migrate import migrate as run_migrations

    settings = load_settings()
    try:
        report = run_migrations(settings.database_url)
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    console.print(report or "migrations: nothing to do")


def declare(
    migrate_queues: Annotated[
        bool,
        typer.Option(
            "--migrate-queues",
            help="redeclare work queues of earlier releases, keeping their messages "
            "(stop the services first)",
        ),
    ] = False,
) -> None:
    """Declare the broker topology (exchanges, queues, timers) for the configured backend, and
    apply the queue policies (delivery limit, dead-letter target, dead-letter caps) through the
    management API (RABBITMQ_MANAGEMENT_URL).

    Example: [bold]followups declare[/bold]
    """
    from services.cli.declaring import declare_broker
    from services.cli.queue_moves import MoveRefused
    from shared.policies import ManagementError

    settings = load_settings()
    try:
        declared = asyncio.run(declare_broker(settings, migrate_queues=migrate_queues))
    except (ManagementError, MoveRefused) as exc:
        raise fail(str(exc)) from None
    for queue, count in declared.moved.items():
        console.print(f"moved {queue}: redeclared, {count} message(s) kept", soft_wrap=True)
    console.print(f"topology declared; timer backend: {declared.backend}")
    console.print(f"policies applied: {', '.join(declared.policies)}", soft_wrap=True)
    for warning in declared.warnings:
        err.print(f"[yellow]warning[/yellow]: {warning}", soft_wrap=True)


def run(
    service: Annotated[str, typer.Argument(help="scheduler, personalizer, dispatcher or all")],
) -> None:
    """Run one service, or all three as child processes, until Ctrl-C.

    Each service serves /healthz, /readyz and /metrics on HTTP_HOST:HTTP_PORT (default 127.0.0.1,
    port 8081 scheduler, 8082 personalizer, 8083 dispatcher; HTTP_PORT=0 picks a free port).

    Example: [bold]followups run all[/bold]
    """
    if service == "all":
        raise typer.Exit(_run_all())
    if service not in SERVICES:
        raise fail(f"unknown service {service!r}; choose from {', '.join(SERVICES)} or all", 2)
    from shared.errors import ConfigurationError
    from shared.health import ServiceApp

    settings = load_settings()
    try:
        app = importlib.import_module(f"services.{service}.app").create_app(settings)
    except ConfigurationError as exc:
        raise fail(f"{service} cannot start: {exc}", 2) from None
    if not isinstance(app, ServiceApp):
        raise fail(f"services.{service}.app.create_app must return a ServiceApp")
    if settings.cpu_nice:
        os.nice(settings.cpu_nice)
    # What is loaded by now lives as long as the process: the collector need not walk it again
    # and again, and each message's short-lived objects are collected less often.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    # uvloop's C event loop and transports halve the per-message cost of the loop itself.
    uvloop.run(app.serve(settings.http_host, settings.http_port))


def _print_endpoints(host: str, free_ports: bool) -> None:
    from shared.health import DEFAULT_HTTP_PORTS

    base = f"[{host}]" if ":" in host else host
    for name in SERVICES:
        where = (
            "/healthz /readyz /metrics on a free port (logged as `http endpoints listening`)"
            if free_ports
            else f"http://{base}:{DEFAULT_HTTP_PORTS[name]}/healthz  /readyz  /metrics"
        )
        console.print(f"{name:<12} {where}", highlight=False, soft_wrap=True)


def child_environment(service: str, environ: Mapping[str, str]) -> dict[str, str]:
    """What `run all` starts `service` with: the environment, and its slack niceness unless
    CPU_NICE is set already."""
    child = dict(environ)
    if service in SLACK_NICE:
        child.setdefault("CPU_NICE", str(SLACK_NICE[service]))
    return child


def _run_all() -> int:
    port = os.environ.get("HTTP_PORT", "")
    if port not in ("", "0"):
        raise fail("HTTP_PORT names one port; unset it (or set 0) to run all three services", 2)
    children = [
        subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "services.cli.main", "run", name],
            env=child_environment(name, os.environ),
        )
        for name in SERVICES
    ]
    _print_endpoints(load_settings().http_host, port == "0")

    def _forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGINT, _forward)
    signal.signal(signal.SIGTERM, _forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)
