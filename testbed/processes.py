"""The services as real processes, started the way an operator starts them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

READY_LINE = "started successfully"


class ServiceProcess:
    def __init__(
        self, name: str, env: Mapping[str, str], log_dir: Path, label: str | None = None
    ) -> None:
        self.name = name
        self.label = label or name
        self.env = dict(env)
        self.log_path = log_dir / f"{self.label}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self, timeout: float = 30.0) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "run", self.name],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in self.log_text(since_start=True):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_text()[-3000:]}")

    def log_text(self, since_start: bool = False) -> str:
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        return (
            data[self._log_offset :].decode(errors="replace")
            if since_start
            else data.decode(errors="replace")
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9: no shutdown hooks, unacked messages go back to the broker."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


class ServiceSet:
    def __init__(
        self,
        env: Mapping[str, str],
        log_dir: Path,
        names: tuple[str, ...] = ("scheduler", "personalizer", "dispatcher"),
        ready_timeout: float = 30.0,
    ) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        # How long each service may take to say it started (a loaded machine starts slowly).
        self.ready_timeout = ready_timeout
        self.services = {name: ServiceProcess(name, env, log_dir) for name in names}

    def add(self, label: str, name: str, **overrides: str) -> ServiceProcess:
        """Another replica (or a differently configured process) of service `name`."""
        process = ServiceProcess(name, {**self.env, **overrides}, self.log_dir, label)
        self.services[label] = process
        process.start(self.ready_timeout)
        return process

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.services[name]

    def start(self) -> None:
        for service in self.services.values():
            service.start(self.ready_timeout)

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()

    def logs(self) -> str:
        return "\n".join(s.log_text() for s in self.services.values())
