"""`followups dlq`: look into, replay and purge the dead-letter queue beside each work queue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import aiormq
import typer
from rich.progress import Progress
from rich.table import Table

from services.cli.common import console, fail, load_settings, print_json
from services.cli.deadletters import (
    DeadLetter,
    DeadLetterQueue,
    Outcome,
    open_dead_letters,
    resolve_queue,
)
from shared.topology import WORK_QUEUES, WorkQueue

T = TypeVar("T")

app = typer.Typer(
    help="Dead-letter queues: list, replay, purge. Example: [bold]followups dlq list[/bold]",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

QueueOption = Annotated[
    str,
    typer.Option(
        "--queue",
        "-q",
        help="scheduler, personalizer or dispatcher (or the full queue or DLQ name)",
    ),
]


def _work(name: str) -> WorkQueue:
    try:
        return resolve_queue(name)
    except LookupError as exc:
        raise fail(str(exc), 2) from None


def _run(work: WorkQueue, action: Callable[[DeadLetterQueue], Awaitable[T]]) -> T:
    settings = load_settings()

    async def _go() -> T:
        async with open_dead_letters(settings.rabbitmq_url, work) as dlq:
            return await action(dlq)

    try:
        return asyncio.run(_go())
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise fail(f"{work.dead_letter_queue} does not exist; run `followups declare`") from None
    except (OSError, aiormq.exceptions.AMQPConnectionError) as exc:
        raise fail(f"broker: {exc.__class__.__name__}; try `followups doctor`") from None


async def _depth(dlq: DeadLetterQueue) -> int:
    return dlq.depth


def _overview(as_json: bool) -> None:
    depths = [(work, _run(work, _depth)) for work in WORK_QUEUES]
    if as_json:
        print_json(
            [
                {"queue": work.dead_letter_queue, "messages": depth, "work_queue": work.name}
                for work, depth in depths
            ]
        )
        return
    table = Table("dead-letter queue", "messages", "work queue")
    for work, depth in depths:
        table.add_row(work.dead_letter_queue, str(depth), work.name)
    console.print(table)


@app.command("list")
def list_(
    queue: Annotated[
        str | None,
        typer.Option("--queue", "-q", help="one queue (scheduler, personalizer, dispatcher)"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="messages to show")] = 20,
    body: Annotated[bool, typer.Option(help="print each body (may hold personal data)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Depth of every DLQ; with --queue, its first messages and why each was dead-lettered.

    Messages are read and put back: nothing leaves the queue.

    Example: [bold]followups dlq list --queue scheduler --limit 5[/bold]
    """
    if queue is None:
        _overview(as_json)
        return
    work = _work(queue)

    async def _peek(dlq: DeadLetterQueue) -> tuple[int, list[DeadLetter]]:
        if as_json:  # stdout is for the JSON alone
            return dlq.depth, await dlq.peek(limit, lambda: None)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("reading", total=min(limit, dlq.depth))
            letters = await dlq.peek(limit, lambda: progress.advance(task))
        return dlq.depth, letters

    depth, letters = _run(work, _peek)
    if as_json:
        print_json(
            {
                "queue": work.dead_letter_queue,
                "messages": depth,
                "shown": [
                    {
                        "routing_key": letter.original_routing_key,
                        "reason": letter.reason,
                        "message_id": letter.message_id,
                        "bytes": len(letter.body),
                        **({"body": letter.body.decode(errors="replace")} if body else {}),
                    }
                    for letter in letters
                ],
            }
        )
        return
    table = Table("#", "routing key", "reason", "message id", "bytes", title=work.dead_letter_queue)
    for n, letter in enumerate(letters, 1):
        table.add_row(
            str(n),
            letter.original_routing_key,
            letter.reason,
            letter.message_id or "",
            str(len(letter.body)),
        )
    console.print(table)
    if body:
        for n, letter in enumerate(letters, 1):
            console.print(f"[bold]#{n}[/bold] {letter.body.decode(errors='replace')}")
    console.print(f"{depth} message(s) in {work.dead_letter_queue}; showed {len(letters)}")


@app.command()
def replay(
    queue: QueueOption,
    limit: Annotated[int, typer.Option(min=1, help="replay at most this many")] = 1_000_000,
    dry_run: Annotated[bool, typer.Option(help="only say what would happen")] = False,
) -> None:
    """Re-validate each dead letter and republish the valid ones where they first went.

    Commands go back to exchange `followups` with their original routing key; timers go back to
    their work queue (a stale timer is dropped there). Messages that still fail validation stay
    in the DLQ, and the report says why.

    Example: [bold]followups dlq replay --queue scheduler --dry-run[/bold]
    """
    work = _work(queue)

    async def _replay(dlq: DeadLetterQueue) -> Outcome:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("replaying", total=min(limit, dlq.depth))
            return await dlq.replay(
                limit=limit, dry_run=dry_run, progress=lambda: progress.advance(task)
            )

    outcome = _run(work, _replay)
    verb = "would replay" if dry_run else "replayed"
    console.print(f"{verb} {outcome.replayed}, kept {outcome.kept} in {work.dead_letter_queue}")
    for reason, count in sorted((outcome.reasons or {}).items()):
        console.print(f"  kept {count}: {reason}")
    if outcome.kept and not dry_run:
        console.print("fix the sender, then `followups dlq purge` what can never be accepted")


@app.command()
def purge(
    queue: QueueOption,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="don't ask")] = False,
) -> None:
    """Delete every message in one dead-letter queue. There is no undo.

    Example: [bold]followups dlq purge --queue dispatcher --yes[/bold]
    """
    work = _work(queue)
    if not yes:
        typer.confirm(f"delete every message in {work.dead_letter_queue}?", abort=True)
    purged = _run(work, lambda dlq: dlq.purge())
    console.print(f"purged {purged} message(s) from {work.dead_letter_queue}")
