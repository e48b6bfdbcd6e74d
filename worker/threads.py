"""The worker's own threads, named for the operating system too: ``top -H -p PID``, ``ps -L`` and
``/proc/PID/task/TID/comm`` tell the device loop from the query stream's reader and writer (``bench/lane.py``
splits a worker's CPU by these names). Linux keeps 15 bytes of a name."""
from __future__ import annotations

import ctypes
import threading
from typing import Callable

DEVICE, HEARTBEAT, STREAM_READER, STREAM_WRITER = "m3q-device", "m3q-heartbeat", "m3q-stream-in", "m3q-stream-out"
_PR_SET_NAME = 15


def thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread (not started) running ``target``, named ``name`` in Python and for the OS."""
    return threading.Thread(target=_named, args=(target, name), name=name, daemon=True)


def _named(target: Callable[[], None], name: str) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the Python name is enough
        pass
    target()
