"""A private PostgreSQL database and RabbitMQ vhost for one test or benchmark run, removed
afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from dataclasses import dataclass
from urllib.parse import quote

import asyncpg

from shared.migrate import migrate

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
AMQP_ROOT = "amqp://guest:guest@127.0.0.1:5672/"


# A CLI call that hangs holds one of the few distribution ports the RabbitMQ CLI may use; enough
# of them and every later call fails with "nodistribution". So a call gets this long, then its
# whole process group (su, sh, the Erlang VM) is killed.
RABBITMQCTL_TIMEOUT_SECONDS = 180


def rabbitmqctl(*args: str) -> None:
    with subprocess.Popen(
        ["rabbitmqctl", "-q", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            _, stderr = process.communicate(timeout=RABBITMQCTL_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} did not answer in "
                f"{RABBITMQCTL_TIMEOUT_SECONDS} s; is RabbitMQ overloaded?"
            ) from None
    if process.returncode != 0:
        raise RuntimeError(
            f"rabbitmqctl {' '.join(args)} failed: {stderr.strip()}; "
            "is RabbitMQ running? (scripts/ensure-services.sh starts it)"
        )


@dataclass(frozen=True)
class Infra:
    name: str

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:5432/{self.name}"

    @property
    def rabbitmq_url(self) -> str:
        return f"{AMQP_ROOT}{quote(self.name, safe='')}"

    @classmethod
    def create(cls, label: str = "t") -> Infra:
        infra = cls(f"followups_{label}_{uuid.uuid4().hex[:10]}")
        rabbitmqctl("add_vhost", infra.name)
        rabbitmqctl("set_permissions", "-p", infra.name, "guest", ".*", ".*", ".*")
        migrate(infra.database_url)
        return infra

    async def drop(self) -> None:
        rabbitmqctl("delete_vhost", self.name)
        admin = await asyncpg.connect(PG_ADMIN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await admin.close()
