"""`followups declare`: the topology over AMQP, then the queue policies over the management API
(README: Queue policies), and the queues of earlier releases found or moved."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.cli.queue_moves import move_queue, queue_states
from shared.policies import Management, apply_policies, policies
from shared.settings import Settings
from shared.timers import resolve_backend
from shared.topology import declare_topology


@dataclass
class Declared:
    backend: str
    policies: list[str]
    warnings: list[str] = field(default_factory=list)
    moved: dict[str, int] = field(default_factory=dict)  # queue: messages it got back


def _legacy_advice(queue: str, arguments: tuple[str, ...]) -> str:
    return (
        f"{queue} was declared by an earlier release with {', '.join(arguments)}, which "
        "override or clash with its policy; it works as before, but to change its settings "
        "by policy stop the services and run `followups declare --migrate-queues`"
    )


async def declare_broker(settings: Settings, *, migrate_queues: bool = False) -> Declared:
    """Raises shared.policies.ManagementError when the management API can't be used, and
    services.cli.queue_moves.MoveRefused when a queue can't be moved now."""
    backend = (await resolve_backend(settings.rabbitmq_url, settings.delay_backend)).value
    limits = settings.queue_limits
    async with Management.from_settings(
        settings.rabbitmq_url, settings.rabbitmq_management_url
    ) as management:
        # Policies first: a queue declared a moment later has its delivery limit from the start.
        warnings = await apply_policies(management, limits)
        declared = Declared(backend, [p.name for p in policies(limits)], warnings)
        if migrate_queues:
            for state in await queue_states(management):
                if state.needs_move:
                    declared.moved[state.work.name] = await move_queue(
                        settings.rabbitmq_url, management, state
                    )
        await declare_topology(
            settings.rabbitmq_url, backend=backend, queue_type=settings.delay_queue_type
        )
        for state in await queue_states(management):
            if state.legacy_arguments:
                declared.warnings.append(_legacy_advice(state.work.name, state.legacy_arguments))
            elif state.holding:
                declared.warnings.append(
                    f"a move of {state.work.name} did not finish: run "
                    "`followups declare --migrate-queues` again"
                )
    return declared
