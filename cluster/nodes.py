"""Three nodes of the installed RabbitMQ, clustered, beside the machine's own node.

Each node runs the versioned `sbin/rabbitmq-server` as the `rabbitmq` user (whose Erlang cookie
every node and CLI call then shares) with its own name, ports, data, logs, pid file and
configuration files, so nothing of the machine's node (`/etc/rabbitmq/*`, its startup log, its
data) leaks in or is touched. The management plugin is off on these nodes; queues are listed
with `rabbitmqctl`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.loopback import free_port

RABBITMQ_USER = "rabbitmq"
# Debian's `/usr/sbin/rabbitmq-server` wrapper writes the machine node's startup log: the
# versioned scripts underneath are called instead.
SERVER_GLOB = "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"

Say = Callable[[str], None]


class ClusterError(RuntimeError):
    """The cluster could not be started, joined or asked."""


def server_scripts() -> Path:
    found = sorted(glob.glob(SERVER_GLOB))
    if not found:
        raise ClusterError(f"no RabbitMQ scripts under {SERVER_GLOB}: is RabbitMQ installed?")
    return Path(found[-1])


def as_rabbitmq_user() -> list[str]:
    """The prefix that runs a command as the `rabbitmq` user, whose cookie the nodes share."""
    try:
        user = pwd.getpwnam(RABBITMQ_USER)
    except KeyError as exc:
        raise ClusterError("there is no `rabbitmq` user: is RabbitMQ installed?") from exc
    if os.geteuid() == user.pw_uid:
        return []
    if os.geteuid() == 0:
        return ["runuser", "-u", RABBITMQ_USER, "--"]
    raise ClusterError("run `make cluster` as root or as the rabbitmq user (the nodes run as it)")


# How long a quorum queue's at-least-once dead-letter worker waits before it forwards again a
# message that its target refused (or never routed); the broker's default, as users run it.
# While its window (32 messages) is full of such messages the worker takes no more, so every
# timer of that level waits.
DEFAULT_DLX_CONFIRM_TIMEOUT_MS = 180_000


@dataclass
class Node:
    short: str  # the part before @localhost
    base: Path
    dlx_confirm_timeout_ms: int = DEFAULT_DLX_CONFIRM_TIMEOUT_MS
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _pid: int | None = None

    @property
    def name(self) -> str:
        return f"{self.short}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def log_dir(self) -> Path:
        return self.base / "log"

    @property
    def config_file(self) -> Path:
        return self.base / "rabbitmq.conf"

    @property
    def pid_file(self) -> Path:
        return self.base / "pid"

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": pwd.getpwnam(RABBITMQ_USER).pw_dir,
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.config_file),
            "RABBITMQ_CONFIG_FILES": str(self.config_file),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            # Distribution on loopback only, as the machine's node has it.
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def prepare(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.base / "mnesia").mkdir(exist_ok=True)
        (self.base / "rabbitmq-env.conf").write_text("")
        self.config_file.write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            # As the Kubernetes overlay runs its cluster.
            "cluster_partition_handling = pause_minority\n"
        )
        (self.base / "advanced.config").write_text(
            "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, "
            f"{self.dlx_confirm_timeout_ms}}}]}}].\n"
        )
        (self.base / "enabled_plugins").write_text("[].\n")

    def start(self) -> None:
        self.prepare()
        with (self.log_dir / "startup.log").open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 (fixed arguments)
                [*as_rabbitmq_user(), str(server_scripts() / "rabbitmq-server")],
                env=self.env(),
                cwd=self.base,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Ctrl-C on the terminal reaches the harness, which stops the nodes itself.
                start_new_session=True,
            )

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n <this node> ...`; raises ClusterError with its output on failure."""
        return run_cli("rabbitmqctl", self, args, timeout)

    @property
    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def wait_until_up(self, timeout: float = 120.0) -> None:
        # `await_startup` fails at once while the node is not yet registered with epmd: ping
        # until it answers, then wait for the boot to finish.
        deadline = time.monotonic() + timeout
        while True:
            if self.exited:
                raise ClusterError(f"{self.name} exited at start; see {self.log_dir}")
            try:
                self.ctl("ping", timeout=15)
                break
            except ClusterError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 10)
        self._pid = int(self.pid_file.read_text().strip())

    @property
    def pid(self) -> int:
        if self._pid is None:
            raise ClusterError(f"{self.name} has not started")
        return self._pid

    def kill(self) -> None:
        """SIGKILL the Erlang VM: no shutdown, as when a machine dies."""
        with_pid_signal(self.pid, signal.SIGKILL)
        self._reap(10.0)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (RabbitMQ's orderly shutdown), SIGKILL if it takes longer than `timeout`."""
        if self._pid is not None and not self.exited:
            with_pid_signal(self._pid, signal.SIGTERM)
            if not self._reap(timeout):
                with_pid_signal(self._pid, signal.SIGKILL)
                self._reap(10.0)
        elif self.process is not None and not self.exited:
            # Started but never came up far enough to write its pid: stop what was started.
            self.process.kill()
            self._reap(10.0)

    def _reap(self, timeout: float) -> bool:
        if self.process is None:
            return True
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True


def with_pid_signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def run_cli(tool: str, node: Node, args: Sequence[str], timeout: float) -> str:
    command = [*as_rabbitmq_user(), str(server_scripts() / tool), "-q", "-n", node.name, *args]
    try:
        result = subprocess.run(  # noqa: S603 (fixed arguments)
            command, env=node.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        what = f"{tool} {' '.join(args)} on {node.name}"
        raise ClusterError(f"{what}: no answer in {timeout} s") from exc
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise ClusterError(f"{tool} {' '.join(args)} on {node.name} failed: {detail}")
    return result.stdout


class Cluster:
    """`start()` boots `size` nodes and joins the others to the first; `stop()` ends each node
    this object started, by its pid, and removes their data."""

    def __init__(
        self,
        base: Path,
        size: int = 3,
        tag: str | None = None,
        dlx_confirm_timeout_ms: int = DEFAULT_DLX_CONFIRM_TIMEOUT_MS,
    ) -> None:
        self.base = base
        tag = tag or f"{os.getpid()}"
        self.nodes = [
            Node(f"followups-{tag}-{i}", base / f"node{i}", dlx_confirm_timeout_ms)
            for i in range(1, size + 1)
        ]
        self.killed: set[str] = set()

    def by_name(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ClusterError(f"{name} is not a node of this cluster")

    @property
    def alive(self) -> list[Node]:
        return [n for n in self.nodes if n.name not in self.killed and not n.exited]

    def start(self, say: Say) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            node.base.mkdir(parents=True, exist_ok=True)
            node.prepare()
        owner = pwd.getpwnam(RABBITMQ_USER)
        for path in [self.base, *self.base.rglob("*")]:
            os.chown(path, owner.pw_uid, owner.pw_gid)
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_until_up()
            say(f"  {node.name} up: AMQP 127.0.0.1:{node.port}, pid {node.pid}")
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
            node.ctl("await_startup")
        running = self.running_nodes()
        if sorted(running) != sorted(n.name for n in self.nodes):
            raise ClusterError(f"the cluster formed with {running}, not all {len(self.nodes)}")
        say(f"  clustered: {', '.join(running)}")

    def running_nodes(self) -> list[str]:
        status: dict[str, Any] = json.loads(self.ask("cluster_status", "--formatter", "json"))
        return list(status.get("running_nodes", []))

    def ask(self, *args: str, timeout: float = 60.0) -> str:
        """A CLI call on the first node still alive."""
        for node in self.alive:
            return node.ctl(*args, timeout=timeout)
        raise ClusterError("no node of the cluster is alive")

    def list_queues(self, *columns: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(
            self.ask("list_queues", *columns, "--formatter", "json")
        )
        return rows

    def kill(self, name: str) -> None:
        self.by_name(name).kill()
        self.killed.add(name)

    def restart(self, name: str) -> None:
        """Start a killed node again on its own data; it rejoins the cluster by itself."""
        node = self.by_name(name)
        node.start()
        node.wait_until_up()
        self.killed.discard(name)

    def stop(self, keep_data: bool = False) -> None:
        for node in self.nodes:
            node.stop()
        if not keep_data:
            for node in self.nodes:
                shutil.rmtree(node.base / "mnesia", ignore_errors=True)
