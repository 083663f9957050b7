"""Files generated from the code: the broker definitions, the AsyncAPI event catalogue and the
effectiveness dashboard."""

from __future__ import annotations

import asyncio
import json
from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import typer

from services.cli.common import console

topology_app = typer.Typer(
    help="The broker topology. Example: [bold]followups topology export[/bold]",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
docs_app = typer.Typer(
    help="Generated documentation. Example: [bold]followups docs asyncapi[/bold]",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

Out = Annotated[Path | None, typer.Option("--out", "-o", help="write here instead of stdout")]


def _emit(text: str, out: Path | None) -> None:
    if out is None:
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    console.print(f"wrote {out}")


def definitions_text(vhost: str = "/", queue_type: str = "quorum") -> str:
    from services.cli.definitions import definitions

    return json.dumps(asyncio.run(definitions(vhost, queue_type)), indent=2) + "\n"


def asyncapi_text() -> str:
    from services.cli.catalogue import catalogue, render

    return render(catalogue(version("followups")))


def effectiveness_dashboard_text() -> str:
    from services.cli.dashboard import effectiveness_text

    return effectiveness_text()


@topology_app.command("export")
def export(
    out: Out = None,
    vhost: Annotated[str, typer.Option(help="the vhost the definitions go to")] = "/",
    queue_type: Annotated[str, typer.Option(help="timer queues: quorum or classic")] = "quorum",
) -> None:
    """Write the exchanges, queues, bindings and queue policies as a RabbitMQ definitions file
    (levels timers; the policies with the default DELIVERY_LIMIT, DLQ_MAX_LENGTH and
    DLQ_MAX_AGE_HOURS).

    Import it in the management UI (Overview, Import definitions) or with
    `rabbitmqctl import_definitions`; the services declare the same objects at start, and
    `followups declare` applies the same policies with the configured values.

    Example: [bold]followups topology export --out deploy/rabbitmq/definitions.json[/bold]
    """
    _emit(definitions_text(vhost, queue_type), out)


@docs_app.command("asyncapi")
def asyncapi(out: Out = None) -> None:
    """Write the AsyncAPI 3.0 event catalogue generated from shared/schemas.py.

    Example: [bold]followups docs asyncapi --out docs/asyncapi.json[/bold]
    """
    _emit(asyncapi_text(), out)


@docs_app.command("effectiveness-dashboard")
def effectiveness_dashboard(out: Out = None) -> None:
    """Write the Grafana effectiveness dashboard generated from shared/effectiveness.py.

    Import it in Grafana (Dashboards, New, Import); `make docs` keeps the committed copy current.

    Example: [bold]followups docs effectiveness-dashboard -o effectiveness.json[/bold]
    """
    _emit(effectiveness_dashboard_text(), out)
