"""One writer per run folder: ``RUN/.lock``, held with ``flock`` for as long as the run trains.

The kernel releases an ``flock`` when its holder dies, however it dies (kill -9 included), so a
lock left by a killed run is never mistaken for a live one: the next run takes it over, and the pid
the file still names says whose it was. A live holder makes :meth:`RunLock.acquire` refuse.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunLocked(Exception):
    """Another live process writes into this run folder."""


class RunLock:
    def __init__(self, path: Path, fd: int, stale: dict | None):
        self.path, self.fd = path, fd
        self.stale = stale  # the previous holder's record when its lock was left behind

    @classmethod
    def acquire(cls, run: Path) -> RunLock:
        """Hold ``run``'s lock; RunLocked names the live holder."""
        path = run / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
            raise RunLocked(f"'{run}' is in use by a live ept train ({who}): wait for it to finish, stop it, "
                            "or choose another --out") from None
        previous = _read(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        return cls(path, fd, previous or None)

    def release(self) -> None:
        """Unlock and remove the file (a clean exit leaves no lock behind)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        self.fd = -1


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
