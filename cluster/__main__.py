"""`python -m cluster` (`make cluster`): see README, "A broker cluster"."""

from __future__ import annotations

import argparse
import sys

import uvloop
from rich.console import Console

from bench.progress import Progress
from cluster.run import Plan, run

DEFAULTS = Plan()


def parse(argv: list[str]) -> Plan:
    parser = argparse.ArgumentParser(
        prog="python -m cluster",
        description=(
            "Start a three-node RabbitMQ cluster beside the machine's own node, run the three "
            "services on it with quorum `levels` timers, request follow-ups due over a window, "
            "SIGKILL the node that leads most timer queues in the middle and report what was "
            "sent, lost, sent twice or early, and how long sends stopped. Needs root (the "
            "nodes run as the rabbitmq user) and the local PostgreSQL."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--followups", type=int, default=DEFAULTS.followups, help="follow-ups to request"
    )
    parser.add_argument(
        "--span", type=float, default=DEFAULTS.span, help="seconds the due times spread over"
    )
    parser.add_argument(
        "--lead-in",
        type=float,
        default=DEFAULTS.lead_in,
        help="seconds from the requests to the first due time",
    )
    parser.add_argument(
        "--kill-at",
        type=float,
        default=DEFAULTS.kill_at,
        help="when to kill the node, as a fraction of the span",
    )
    parser.add_argument(
        "--dlx-confirm-timeout-ms",
        type=int,
        default=DEFAULTS.dlx_confirm_timeout_ms,
        help="the nodes' dead_letter_worker_publisher_confirm_timeout: how soon a dead-letter "
        "worker forwards again what its target refused (the broker's default)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="run the repair sweep as configured by default (held back otherwise, so that "
        "every send comes from a timer the cluster kept)",
    )
    parser.add_argument(
        "--restart-after",
        type=float,
        help="start the killed node again this many seconds after the kill (it stays down "
        "when not given)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep node data and logs after a successful run"
    )
    args = parser.parse_args(argv)
    if args.followups < 1 or args.span <= 0 or not 0 <= args.kill_at <= 1:
        parser.error("need --followups >= 1, --span > 0 and --kill-at within 0..1")
    if args.dlx_confirm_timeout_ms < 1:
        parser.error("--dlx-confirm-timeout-ms must be positive")
    return Plan(
        followups=args.followups,
        span=args.span,
        lead_in=args.lead_in,
        kill_at=args.kill_at,
        keep=args.keep,
        sweep=args.sweep,
        restart_after=args.restart_after,
        dlx_confirm_timeout_ms=args.dlx_confirm_timeout_ms,
    )


def main(argv: list[str]) -> int:
    plan = parse(argv)
    # Long lines stay whole in a log file (a terminal wraps them itself).
    progress = Progress(Console(soft_wrap=True))
    try:
        result = uvloop.run(run(plan, progress))
    except KeyboardInterrupt:
        # The run has stopped what it started on the way out.
        return 130
    return 0 if result.met_goal else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
