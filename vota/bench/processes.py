"""The bench's processes: started as ``vota`` commands (or other programs), each with its log,
each waited for until it says it is ready, every one stopped at the end."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from agent.errors import VotaError

__all__ = ["Processes", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Starts vota processes, waits for their "ready" line, and always stops them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ready: set[str] = set()  # known to be ready (a process that prints no "ready" line is marked by its starter)

    def start(self, name: str, *args: str, argv: list[str] | None = None) -> None:
        """``vota ARGS`` (or another program's ``argv``), its output in ``<log_dir>/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(argv or [sys.executable, "-m", "vota.cli", *args], stdout=log,
                                                stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.procs) - self.ready
        while pending:
            for name in list(pending):
                if self.procs[name].poll() is not None:
                    text = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
                    raise VotaError(f"{name} exited at start-up: {text[-1] if text else 'no output'}")
                if " ready" in (self.log_dir / f"{name}.log").read_text(errors="replace"):
                    pending.discard(name)
                    self.ready.add(name)
            if time.monotonic() > deadline:
                raise VotaError(f"not ready after {timeout:.0f} s: {', '.join(sorted(pending))} (see {self.log_dir})")
            time.sleep(0.05)

    def stop(self, grace_s: float = 8.0) -> None:
        """SIGTERM to every process at once, SIGKILL to those still there after ``grace_s`` in
        all (each daemon checkpoints its journal first: a campaign cut off resumes)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
