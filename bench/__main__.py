"""`python -m bench` (`make bench`): see docs/performance.md and `python -m bench --help`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import uvloop
from rich.console import Console

from bench.runner import PROBES, Selection, run
from bench.scenarios import SCENARIOS, Plan

DEFAULTS = Plan()

EPILOG = """scenarios:
  steady     follow-ups spread evenly over a window, AI on, each request published --advance
             seconds before its due time: lateness (receive - scheduled_time)
  burst      follow-ups all due at one instant: how fast the backlog drains (sends/s)
  ingest     followup.requested published as fast as possible: requests stored per second
  pending    many follow-ups days ahead, then steady on top: memory of services, broker, database
  timerwork  single timers 20 s and 30 days ahead: how many queues each one enters
  capacity   steady at 50, 100, 200, 400, 800/s, 20 s each, a fresh stack per step, until p99
             passes 50 ms: the last rate that held (only when asked for, or with "all")
Each scenario gets a fresh database, vhost and service processes. With BENCH_PEER set to a
prepared copy of the BullMQ design, steady, burst, ingest and capacity also run on it, in the same
run (docs/performance.md). With the defaults a full run takes about 25 minutes (the pending load
about 10); try --pending 100000 for a shorter one."""
DEFAULT_SCENARIOS = ["steady", "burst", "ingest", "pending", *PROBES]


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
        choices=[*SCENARIOS, *PROBES, "all"],
        help="scenario to run (repeatable); all but capacity when not given",
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
        "--advance",
        type=float,
        default=DEFAULTS.advance,
        help="steady and capacity: each request is published this many seconds before its due "
        "time, while the earlier ones are being sent (as requests arrive in production)",
    )
    parser.add_argument(
        "--up-front",
        action="store_true",
        help="steady and capacity: publish every request first, then wait (the first due "
        "--settle + --lead seconds later), instead of --advance seconds ahead",
    )
    parser.add_argument(
        "--capacity-rates",
        type=lambda text: tuple(int(v) for v in text.split(",")),
        default=DEFAULTS.capacity_rates,
        metavar="R,R,...",
        help="capacity: follow-ups per second of each step, rising",
    )
    parser.add_argument(
        "--capacity-seconds",
        type=float,
        default=DEFAULTS.capacity_seconds,
        help="capacity: seconds each step's follow-ups are spread over",
    )
    parser.add_argument(
        "--capacity-p99",
        type=float,
        default=DEFAULTS.capacity_p99_ms,
        help="capacity: a step holds while p99 lateness stays at or under this many ms",
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
        "--no-slack-nice",
        dest="slack_nice",
        action="store_false",
        help="run the scheduler and the personalizer at the dispatcher's priority, instead of "
        "at the nice value `followups run all` gives them (CPU_NICE=5)",
    )
    parser.add_argument(
        "--dispatcher-nice",
        type=int,
        default=0,
        help="nice value of the dispatcher processes: below 0 (root or CAP_SYS_NICE) their "
        "timed sends go first on busy cores, as a Kubernetes CPU request or compose's "
        "cpu_shares give them",
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

    def chosen(values: list[str] | None, every: list[str], default: list[str]) -> tuple[str, ...]:
        if not values:
            return tuple(default)
        if "all" in values:
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
        advance=args.advance,
        up_front=args.up_front,
        capacity_rates=args.capacity_rates,
        capacity_seconds=args.capacity_seconds,
        capacity_p99_ms=args.capacity_p99,
    )
    selection = Selection(
        scenarios=chosen(args.scenario, [*DEFAULT_SCENARIOS, "capacity"], DEFAULT_SCENARIOS),
        backends=chosen(args.backend, ["levels", "plugin"], ["levels", "plugin"]),
        dispatch_concurrency=args.dispatch_concurrency,
        queue_type=args.queue_type,
        log_level=args.log_level,
        replicas=args.replicas,
        dispatcher_nice=args.dispatcher_nice,
        slack_nice=args.slack_nice,
        repeat=args.repeat,
        out=args.out,
        profile=args.profile,
    )
    return plan, selection


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    plan, selection = parse(sys.argv[1:] if argv is None else argv)
    # Stopped by `timeout` or a CI runner: clean up as after Ctrl-C (stacks stopped, dropped).
    signal.signal(signal.SIGTERM, _interrupt)
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
