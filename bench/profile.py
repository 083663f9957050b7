"""`--profile DIR`: py-spy samples each service process while a scenario runs, writes collapsed
stacks (flamegraph input) and summarises where the time went. py-spy pauses a process for each
sample (its --nonblocking mode tore a third of the stacks here), so a profiled run's timings are
a little worse than an unprofiled one's."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

PROJECT_CODE = re.compile(r"\((services|shared)/")
# Frames every delivery passes through (event loop, CLI, FastStream's plumbing): left out of the
# inclusive list, which is there to show which calls of ours and of the drivers cost the most.
PLUMBING = re.compile(
    r"\((<frozen runpy>|asyncio/|typer/|threading\.py|services/cli/|fast_depends/"
    r"|faststream/_internal/|faststream/middlewares/|faststream/prometheus/)"
)
# "function (path/to/file.py:123)": the line number is dropped to add up a function's samples.
FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^()]*?)(?::\d+)?\)$")
TOP = 15
# A thread parked here is waiting, not working (anyio's idle worker threads, the event loop's
# poll); py-spy counts such samples anyway, so they are set apart as `idle`. The services run on
# uvloop, whose loop is C: its poll, and its own C work, show up as the Python frame that
# started it (`Runner.run`), so that share is the loop's and counted as idle too.
WAITING = (
    "Condition.wait (threading.py",
    "EpollSelector.select (selectors.py",
    "Runner.run (asyncio/runners.py",
)


def py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("--profile needs py-spy (make install puts it in .venv/bin)")
    return found


def frame_name(frame: str) -> str:
    match = FRAME.match(frame)
    if match is None:
        return frame
    path = match["path"]
    for root in ("/site-packages/", "/work/main/", "/lib/python3"):
        if root in path:
            path = path.split(root, 1)[1]
            break
    return f"{match['function']} ({path})"


def summarise(lines: Iterable[str]) -> dict[str, list[tuple[str, float]]]:
    """From collapsed stacks: the share of busy samples spent in each function itself (`self`)
    and in each function including what it called (`inclusive`, plumbing left out); how many
    samples were idle and how many busy ones passed through the project's own code."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    idle = 0
    busy = 0
    ours = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        if frames[-1].startswith(WAITING):
            idle += samples
            continue
        busy += samples
        own[frame_name(frames[-1])] += samples
        ours += samples if any(PROJECT_CODE.search(f) for f in frames) else 0
        for name in {frame_name(f) for f in frames if not PLUMBING.search(f)}:
            inclusive[name] += samples
    if not busy:
        return {"self": [], "inclusive": []}
    return {
        "self": [(name, round(n / busy * 100, 1)) for name, n in own.most_common(TOP)],
        "inclusive": [(name, round(n / busy * 100, 1)) for name, n in inclusive.most_common(TOP)],
        "samples": [
            ("total", float(total)),
            ("idle or inside uvloop's C loop %", round(idle / total * 100, 1)),
            ("busy samples through services/ or shared/ %", round(ours / busy * 100, 1)),
        ],
    }


class Profiler:
    def __init__(self, out_dir: Path, label: str, rate: int = 100) -> None:
        self.out_dir = out_dir
        self.label = label
        self.rate = rate
        self._running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start(self, pids: dict[str, int]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        binary = py_spy()
        for name, pid in pids.items():
            output = self.out_dir / f"{self.label}-{name}.txt"
            process = subprocess.Popen(
                [
                    binary,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(self.rate),
                    "--format",
                    "raw",
                    "--output",
                    str(output),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self._running[name] = (process, output)

    def stop(self) -> dict[str, dict[str, list[tuple[str, float]]]]:
        """Stops each recorder (SIGINT makes py-spy write its file) and summarises it."""
        summaries = {}
        for name, (process, output) in self._running.items():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if output.exists():
                with output.open() as lines:
                    summaries[name] = summarise(lines)
        self._running.clear()
        return summaries
