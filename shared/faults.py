"""Named crash points for fault-injection tests (FOLLOWUPS_CRASH_AT=<point>).

Unset in production. A test sets it on one service process to kill it with SIGKILL at an exact
moment, such as right after the gateway accepted a send but before the database recorded it.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("FOLLOWUPS_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
