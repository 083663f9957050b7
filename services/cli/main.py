"""`followups`: the operator's command line. Each command lives in a module named by its role."""

from __future__ import annotations

import os
from importlib.metadata import version
from typing import Annotated

import typer

from services.cli import commands, dlq, doctor, exports, prune, runtime, stats, views, watch

app = typer.Typer(
    help="followups: follow-up SMS delivered at their exact scheduled time.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"followups {version('followups')}")
        raise typer.Exit()


@app.callback()
def _options(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """followups: follow-up SMS delivered at their exact scheduled time."""


app.command()(runtime.migrate)
app.command()(runtime.declare)
app.command()(runtime.run)
app.command()(commands.schedule)
app.command()(commands.cancel)
app.command()(commands.reschedule)
app.command("add-contractor")(commands.add_contractor)
app.command("list")(views.list_)
app.command()(views.show)
app.command()(watch.watch)
app.command("stats")(stats.stats_)
app.command()(doctor.doctor)
app.command()(prune.prune)
app.add_typer(dlq.app, name="dlq")
app.add_typer(exports.topology_app, name="topology")
app.add_typer(exports.docs_app, name="docs")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
