"""Shared fixtures: unique CAN segments per test, and checks that nothing leaks."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from vota.bench.processes import free_port

ROOT = Path(__file__).resolve().parent.parent

# Tests that start processes or a broker are marked slow (pytest -m "not slow" is the inner loop).
PROCESS_FIXTURES = {"procs", "mosquitto", "vehicle", "bare_vehicle"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _children() -> set[int]:
    me = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[1] == me and fields[0] != "Z":
            found.add(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """No thread or child process started by a test may outlive it."""
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        kids = _children() - children_before
        if not extra and not kids:
            return
        time.sleep(0.05)
    assert not kids, f"child processes leaked: {sorted(kids)}"
    assert not extra, f"threads leaked: {[t.name for t in extra]}"


_rng = random.Random(os.getpid() ^ int(time.time()))


def multicast_bus(fd: bool = False) -> dict[str, Any]:
    """A udp_multicast bus no other test or process on this machine uses."""
    group = f"239.{_rng.randint(64, 250)}.{_rng.randint(0, 255)}.{_rng.randint(1, 254)}"
    return {"interface": "udp_multicast", "channel": group, "port": _rng.randint(20000, 60000), "fd": fd}


def loopback() -> str:
    """A loopback address of a test's own: every test's DoIP entity listens on port 13400."""
    return f"127.{_rng.randint(1, 254)}.{_rng.randint(0, 255)}.{_rng.randint(1, 254)}"


def virtual_bus() -> dict[str, Any]:
    return {"interface": "virtual", "channel": f"vota-test-{_rng.getrandbits(48):x}"}


def ecu_entry(name: str, request_id: int, response_id: int, segment: str = "pt", **sim: Any) -> dict[str, Any]:
    base_sim = {"erase_ms": 150, "check_ms": 20, "reset_ms": 200, "part_number": f"{name.upper()}-1",
                "serial": f"SN-{name}", "software_version": "1.0.0"}
    base_sim.update(sim)
    return {"segment": segment, "request_id": request_id, "response_id": response_id,
            "security_secret": f"{name}-secret", "sim": base_sim}


def firmware_like(size: int) -> bytes:
    """A real compiled binary (a shared library of this Python), cut to ``size``."""
    import _ssl

    data = Path(_ssl.__file__).read_bytes()
    return (data * (size // len(data) + 1))[:size]


def next_release(image: bytes) -> bytes:
    """A new version that differs from ``image`` the way a rebuild does: a few changed bytes here
    and there, a function grown by a few bytes (everything after it shifts), a new string."""
    new = bytearray(image)
    for at in range(1000, len(new), 7919):
        new[at] ^= 0x5A
    new[len(new) // 3 : len(new) // 3] = b"\x90" * 37
    return bytes(new[: len(image) - 64]) + b"release notes of 3.1.0 " * 4


@pytest.fixture
def write_config(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write a vehicle config dict as YAML; returns its path."""

    def write(data: dict[str, Any], name: str = "vehicle.yaml") -> Path:
        """A gateway results directory of the test's own unless the test names one: the default
        (var/gateway under the working directory) is shared, and locked, by whichever test's
        gateway runs there first."""
        path = tmp_path / name
        if "gateway" not in data or "results_dir" not in (data.get("gateway") or {}):
            data = {**data, "gateway": {**(data.get("gateway") or {}), "results_dir": str(tmp_path / "gateway-results")}}
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def vota(*args: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run the vota command line as a separate process."""
    return subprocess.run([sys.executable, "-m", "vota", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kw.pop("cwd", ROOT), **kw)


class Proc:
    """A background vota process that is always stopped."""

    def __init__(self, *args: str, log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")
        self.p = subprocess.Popen([sys.executable, "-m", "vota", *args], stdout=self._out,
                                  stderr=subprocess.STDOUT, cwd=ROOT)

    def stop(self, sig_kill: bool = False) -> int:
        if self.p.poll() is None:
            self.p.kill() if sig_kill else self.p.terminate()
        try:
            code = self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            code = self.p.wait()
        self._out.close()
        return code

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, word: str, timeout: float = 30.0) -> "Proc":
        """Wait until the process has printed ``word`` (e.g. ``gateway ready``); fails with its
        output when it exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while word not in self.text():
            assert self.p.poll() is None, f"exited with {self.p.returncode} before {word!r}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {word!r} within {timeout:.0f} s:\n{self.text()}"
            time.sleep(0.05)
        return self


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:  # every one told at once, then each waited for: they shut down side by side
        if p.p.poll() is None:
            p.p.terminate()
    for p in started:
        p.stop()




class Mosquitto:
    """A real Mosquitto broker on a free loopback port, restartable on the same port."""

    def __init__(self, directory: Path) -> None:
        import shutil

        self.binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if self.binary is None:
            pytest.fail("mosquitto is not installed: `make test` installs it (apt-get install mosquitto)")
        self.port = free_port()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        # persistence: a broker restart keeps the cloud's durable session and its queued messages
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             f"persistence true\npersistence_location {self.dir}/\n" + self.user_line())
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def user_line() -> str:
        """As root, Mosquitto drops to user 'mosquitto', who cannot read the test's files."""
        return "user root\n" if os.geteuid() == 0 else ""

    def start(self) -> None:
        import socket

        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def vehicle(tmp_path: Path, mosquitto: Mosquitto, write_config: Any, procs: list[Proc]) -> Iterator[Any]:
    """A whole vehicle (TBOX, gateway, ECU simulators) and the stand-in cloud."""
    from tests.vehicle import Vehicle

    v = Vehicle(tmp_path, mosquitto, write_config, procs)
    yield v
    v.close()


@pytest.fixture
def bare_vehicle(tmp_path: Path, mosquitto: Mosquitto, write_config: Any, procs: list[Proc]) -> Iterator[Any]:
    """A whole vehicle and the stand-in cloud; the test starts the TBOX (``start_tbox``)."""
    from tests.vehicle import Vehicle

    v = Vehicle(tmp_path, mosquitto, write_config, procs, tbox=False)
    yield v
    v.close()


class SmallDisk:
    """A small file system of its own (tmpfs), to fill up and free again: a vehicle's full eMMC."""

    def __init__(self, path: Path, size_mib: int) -> None:
        self.path, self.filler = path, path / "filler"
        path.mkdir(parents=True, exist_ok=True)
        run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            pytest.skip(f"a small file system cannot be mounted here (needs root): {run.stderr.strip()}")

    def fill(self, leave: int = 0) -> None:
        """Fill it up, leaving ``leave`` bytes free (a disk the processes filled meanwhile is filled)."""
        st = os.statvfs(self.path)
        room = st.f_bavail * st.f_frsize - leave
        try:
            with open(self.filler, "ab", buffering=0) as f:  # unbuffered: nothing left to fail at close
                while room > 0:
                    written = f.write(b"\0" * min(room, 1 << 20))
                    if not written:
                        break
                    room -= written
        except OSError:
            pass  # full

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Any]:
    """``small_disk(size_mib)`` mounts a tmpfs under tmp_path; skipped where mounting is not allowed."""
    made: list[SmallDisk] = []

    def make(size_mib: int, name: str = "disk") -> SmallDisk:
        made.append(SmallDisk(tmp_path / name, size_mib))
        return made[-1]

    yield make
    for disk in made:
        disk.unmount()
