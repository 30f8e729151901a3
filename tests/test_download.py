"""Package download over real HTTP: resume with byte ranges, size and digest enforced."""

from __future__ import annotations

import hashlib
import os

import pytest

from agent.errors import TryLater
from cloud_sim.package_server import PackageServer
from tbox.download import DownloadError, download


@pytest.fixture
def server(tmp_path):  # type: ignore[no-untyped-def]
    (tmp_path / "srv").mkdir()
    srv = PackageServer(tmp_path / "srv").start()
    yield srv
    srv.stop()


def _package(server: PackageServer, name: str, size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    (server.root / name).write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


def test_download_and_verify(server, tmp_path):
    data, digest = _package(server, "a.bin", 300_000)
    seen = []
    info = download(server.url("a.bin"), tmp_path / "dl" / "a.bin", len(data), digest, progress=lambda n, t: seen.append(n))
    assert (tmp_path / "dl" / "a.bin").read_bytes() == data
    assert info.resumed_from == 0 and seen[-1] == len(data)
    assert not (tmp_path / "dl" / "a.bin.part").exists()


def test_interrupted_download_resumes_with_a_range(server, tmp_path):
    data, digest = _package(server, "b.bin", 1_000_000)
    server.cut_after = 400_000
    with pytest.raises(DownloadError) as err:
        download(server.url("b.bin"), tmp_path / "b.bin", len(data), digest)
    assert isinstance(err.value, TryLater)
    part = tmp_path / "b.bin.part"
    assert 0 < part.stat().st_size <= 400_000
    have = part.stat().st_size
    server.cut_after = None
    info = download(server.url("b.bin"), tmp_path / "b.bin", len(data), digest)
    assert info.resumed_from == have and info.downloaded == len(data) - have
    assert server.requests[-1]["range"] == f"bytes={have}-"
    assert (tmp_path / "b.bin").read_bytes() == data


def test_server_sending_too_much_is_cut_off(server, tmp_path):
    data, digest = _package(server, "c.bin", 100_000)
    server.extra_bytes = 5000
    with pytest.raises(DownloadError, match="more than the declared 100000 bytes") as err:
        download(server.url("c.bin"), tmp_path / "c.bin", len(data), digest)
    assert not isinstance(err.value, TryLater)
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.bin.part").exists()


def test_wrong_digest_and_missing_package(server, tmp_path):
    data, _ = _package(server, "d.bin", 10_000)
    with pytest.raises(DownloadError, match="does not match") as err:
        download(server.url("d.bin"), tmp_path / "d.bin", len(data), "0" * 64)
    assert not isinstance(err.value, TryLater) and not list(tmp_path.glob("d.bin*"))
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        download(server.url("nope.bin"), tmp_path / "n.bin", 10, "0" * 64)
    assert not isinstance(err.value, TryLater)
    with pytest.raises(DownloadError) as err:
        download("http://127.0.0.1:1/x", tmp_path / "x.bin", 10, "0" * 64, timeout=2)
    assert isinstance(err.value, TryLater)


def test_a_trickling_server_cannot_hold_a_download(server, tmp_path):
    """Uptane's slow retrieval: a server that sends 10 bytes a second keeps the connection alive
    (no read ever times out), but the transfer is cut off below the minimum rate; what arrived
    stays, and the next attempt resumes from it."""
    import time

    data, digest = _package(server, "slow.bin", 50_000)
    server.throttle = 10
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"bytes/s over 1 s, below the minimum 1000 \(slow retrieval\)") as err:
        download(server.url("slow.bin"), tmp_path / "slow.bin", len(data), digest, min_rate=1000, rate_window_s=1.0)
    assert isinstance(err.value, TryLater) and time.monotonic() - started < 10
    have = (tmp_path / "slow.bin.part").stat().st_size
    assert 0 < have < 1000
    with pytest.raises(DownloadError, match="not complete after 1 s") as err:  # a total time limit per attempt
        download(server.url("slow.bin"), tmp_path / "slow.bin", len(data), digest, max_time_s=1.0)
    assert isinstance(err.value, TryLater)
    server.throttle = None
    info = download(server.url("slow.bin"), tmp_path / "slow.bin", len(data), digest, min_rate=1000, rate_window_s=1.0)
    assert info.resumed_from > have and (tmp_path / "slow.bin").read_bytes() == data
