"""A private PostgreSQL database and RabbitMQ vhost for one test or benchmark run, removed
afterwards."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

import asyncpg

from shared.migrate import migrate

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class BrokerNode:
    """The RabbitMQ node that tests and benchmarks run against: the machine's own, unless
    `TESTBED_RABBITMQ_NODE` (its Erlang node name, for the CLI), `TESTBED_AMQP_PORT` and
    `TESTBED_MANAGEMENT_PORT` name another on this host, such as a second node that has the
    delayed-message plugin the machine's lacks. The tests run the services with the timer
    backend `TESTBED_DELAY_BACKEND` (default `levels`, which every broker can run)."""

    name: str | None = None
    amqp_port: int = 5672
    management_port: int = 15672
    delay_backend: str = "levels"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> BrokerNode:
        default = cls()
        return cls(
            name=environ.get("TESTBED_RABBITMQ_NODE") or None,
            amqp_port=int(environ.get("TESTBED_AMQP_PORT") or default.amqp_port),
            management_port=int(environ.get("TESTBED_MANAGEMENT_PORT") or default.management_port),
            delay_backend=environ.get("TESTBED_DELAY_BACKEND") or default.delay_backend,
        )

    @property
    def amqp_root(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def management_root(self) -> str:
        """As the services' RABBITMQ_MANAGEMENT_URL takes it."""
        return f"http://guest:guest@127.0.0.1:{self.management_port}"

    @property
    def management_api(self) -> str:
        return f"http://127.0.0.1:{self.management_port}/api"

    def cli(self, *args: str) -> list[str]:
        """A `rabbitmqctl` command line addressed to this node."""
        node = ["-n", self.name] if self.name else []
        return ["rabbitmqctl", "-q", *node, *args]

    def vhost_url(self, vhost: str) -> str:
        return f"{self.amqp_root}{quote(vhost, safe='')}"


@functools.cache
def broker_node() -> BrokerNode:
    return BrokerNode.from_environment(os.environ)


# A CLI call that hangs holds one of the few distribution ports the RabbitMQ CLI may use; enough
# of them and every later call fails with "nodistribution". So a call gets this long, then its
# whole process group (su, sh, the Erlang VM) is killed.
RABBITMQCTL_TIMEOUT_SECONDS = 180


def rabbitmqctl(*args: str) -> None:
    with subprocess.Popen(
        broker_node().cli(*args),
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
        return broker_node().vhost_url(self.name)

    @property
    def rabbitmq_management_url(self) -> str:
        return broker_node().management_root

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
