"""`python -m bench` (`make bench`): see README, Performance, and `python -m bench --help`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import uvloop
from rich.console import Console

from bench.runner import Selection, run
from bench.scenarios import SCENARIOS, Plan

DEFAULTS = Plan()

EPILOG = """scenarios:
  steady   follow-ups spread evenly over a window, AI on: lateness (receive - scheduled_time)
  burst    follow-ups all due at one instant: how fast the backlog drains (sends/s)
  ingest   followup.requested published as fast as possible: requests stored per second
  pending  many follow-ups days ahead, then steady on top: memory of services, broker, database
Each scenario gets a fresh database, vhost and service processes. With the defaults a full run
takes about 20 minutes (the pending load about 10); try --pending 100000 for a shorter one."""


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except for options whose absence means "all" or "none"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def parse(argv: list[str]) -> tuple[Plan, Selection]:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Run the three services as in production against the local PostgreSQL and RabbitMQ "
            "(a database and vhost of their own, dropped at the end), with a loopback webhook "
            "receiver and an OpenAI-compatible stand-in, and measure each scenario on each timer "
            "backend. Prints a table and writes bench/results/<timestamp>.json."
        ),
        formatter_class=_Help,
        epilog=EPILOG,
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[*SCENARIOS, "all"],
        help="scenario to run (repeatable); all when not given",
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=["levels", "plugin", "all"],
        help="timer backend (repeatable); both when not given (plugin where the broker has it)",
    )
    parser.add_argument(
        "--steady-count", type=int, default=DEFAULTS.steady_count, help="follow-ups in steady"
    )
    parser.add_argument(
        "--steady-seconds",
        type=float,
        default=DEFAULTS.steady_seconds,
        help="the steady follow-ups are spread evenly over this many seconds",
    )
    parser.add_argument(
        "--ai-delay",
        type=float,
        default=DEFAULTS.ai_delay,
        help="seconds the OpenAI stand-in takes to answer (steady and pending)",
    )
    parser.add_argument(
        "--burst-count", type=int, default=DEFAULTS.burst_count, help="follow-ups in burst"
    )
    parser.add_argument(
        "--ingest-count", type=int, default=DEFAULTS.ingest_count, help="requests in ingest"
    )
    parser.add_argument(
        "--pending",
        type=int,
        default=int(os.environ.get("BENCH_PENDING", DEFAULTS.pending_count)),
        help="follow-ups waiting days ahead in the pending scenario (env BENCH_PENDING)",
    )
    parser.add_argument(
        "--pending-method",
        choices=["direct", "scheduler"],
        default=DEFAULTS.pending_method,
        help="direct: set-based INSERTs and the same timers armed with pipelined confirms; "
        "scheduler: followup.requested through the scheduler (slower)",
    )
    parser.add_argument(
        "--lead",
        type=float,
        default=DEFAULTS.lead,
        help="PERSONALIZE_LEAD_SECONDS for the services",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=DEFAULTS.settle,
        help="seconds allowed to store the requests before the first text is prepared",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULTS.timeout,
        help="give up waiting this many seconds after the last scheduled time",
    )
    parser.add_argument(
        "--window", type=int, default=DEFAULTS.window, help="publishes in flight (pipelined)"
    )
    parser.add_argument(
        "--dispatch-concurrency",
        type=int,
        default=20,
        help="DISPATCH_CONCURRENCY; the dispatcher opens this many database connections plus 2",
    )
    parser.add_argument(
        "--queue-type",
        choices=["quorum", "classic"],
        default="quorum",
        help="DELAY_QUEUE_TYPE: queue type of the levels timer queues",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="processes of the scheduler and of the dispatcher each (scaling out on this machine)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each scenario this many times, each on a fresh stack (a row per run): "
        "on a shared machine the tail of one run says little",
    )
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL for the services")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/<time>.json)")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample each service with py-spy during each scenario; collapsed stacks go to DIR",
    )
    args = parser.parse_args(argv)

    def chosen(values: list[str] | None, every: list[str]) -> tuple[str, ...]:
        if not values or "all" in values:
            return tuple(every)
        return tuple(dict.fromkeys(values))

    plan = Plan(
        steady_count=args.steady_count,
        steady_seconds=args.steady_seconds,
        ai_delay=args.ai_delay,
        burst_count=args.burst_count,
        ingest_count=args.ingest_count,
        pending_count=args.pending,
        pending_method=args.pending_method,
        lead=args.lead,
        settle=args.settle,
        timeout=args.timeout,
        window=args.window,
    )
    selection = Selection(
        scenarios=chosen(args.scenario, list(SCENARIOS)),
        backends=chosen(args.backend, ["levels", "plugin"]),
        dispatch_concurrency=args.dispatch_concurrency,
        queue_type=args.queue_type,
        log_level=args.log_level,
        replicas=args.replicas,
        repeat=args.repeat,
        out=args.out,
        profile=args.profile,
    )
    return plan, selection


def main(argv: list[str] | None = None) -> int:
    plan, selection = parse(sys.argv[1:] if argv is None else argv)
    # A table this wide is cut on an 80-column default when the output is not a terminal.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        # On the services' event loop, so the receivers timing each call add little of their own.
        uvloop.run(run(plan, selection, console))
    except KeyboardInterrupt:
        console.print("interrupted; everything started was stopped and dropped")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
