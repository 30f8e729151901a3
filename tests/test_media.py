"""Removable media as hostile input (tbox/media.py, tbox/offline.py): FIFOs, links to devices,
sparse giants and packages of the wrong size are refused before they are read or copied, and
nothing of a refused import stays behind."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.campaign import sign_campaign
from agent.errors import UsageError
from tbox.media import MediaRefused, MediaWatcher, copy_exact, read_bounded
from tbox.offline import CAMPAIGN_FILE, PACKAGES, import_campaign

KEY = Ed25519PrivateKey.generate()


def _stick(tmp: Path, packages: dict[str, bytes], signed_size: dict[str, int] | None = None) -> Path:
    stick = tmp / "stick"
    (stick / PACKAGES).mkdir(parents=True)
    doc = {"format": "vota-campaign", "version": 1, "campaign_id": "c-media", "vin": "V", "install": "immediate",
           "issued": "2026-11-01T00:00:00Z", "expires": "2026-12-31T00:00:00Z",
           "packages": [{"name": name, "ecu": name.split("-")[0], "version": "2.0.0", "url": "http://cloud/p",
                         "size": (signed_size or {}).get(name, len(data)), "sha256": hashlib.sha256(data).hexdigest()}
                        for name, data in packages.items()]}
    (stick / CAMPAIGN_FILE).write_bytes(sign_campaign(doc, KEY))
    for name, data in packages.items():
        (stick / PACKAGES / name).write_bytes(data)
    return stick


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "vota-campaign.json"
    os.mkfifo(fifo)
    done: list[BaseException] = []

    def read() -> None:
        try:
            read_bounded(fifo, 1 << 20)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            done.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)  # a blocking open would still be waiting for a writer
    assert not reader.is_alive() and isinstance(done[0], MediaRefused) and "a FIFO" in str(done[0])


def test_links_and_devices_are_refused_and_a_large_file_is_not_read(tmp_path: Path) -> None:
    link = tmp_path / "zero"
    link.symlink_to("/dev/zero")
    with pytest.raises(MediaRefused, match="symbolic link"):
        read_bounded(link, 1 << 20)
    with pytest.raises(MediaRefused, match="character device"):
        read_bounded(link, 1 << 20, follow_links=True)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB that cost nothing to make, a lot to read
    with pytest.raises(MediaRefused, match=f"{3 << 30} bytes, more than the 1048576"):
        read_bounded(big, 1 << 20)
    with pytest.raises(MediaRefused, match="the campaign signs 32768"):
        copy_exact(big, tmp_path / "out" / "pkg", 32768)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_package_of_its_signed_size_is_copied_with_its_digest(tmp_path: Path) -> None:
    data = os.urandom(70_000)
    (tmp_path / "p").write_bytes(data)
    assert copy_exact(tmp_path / "p", tmp_path / "o" / "p", len(data)) == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "o" / "p").read_bytes() == data and sorted(os.listdir(tmp_path / "o")) == ["p"]


def _import(stick: Path, tmp: Path, **kw: object) -> Path:
    campaigns = tmp / "tbox" / "campaigns"
    import_campaign(stick, campaigns, lambda envelope: None, **kw)  # type: ignore[arg-type]
    return campaigns


@pytest.mark.parametrize("hostile", ["fifo", "device", "oversized", "packages_link"])
def test_a_hostile_stick_is_refused_and_nothing_of_it_stays(tmp_path: Path, hostile: str) -> None:
    good = os.urandom(40_000)
    stick = _stick(tmp_path, {"vcu-2.0.0.bin": good, "bms-2.0.0.bin": good})
    bms = stick / PACKAGES / "bms-2.0.0.bin"
    if hostile == "fifo":
        bms.unlink()
        os.mkfifo(bms)
    elif hostile == "device":
        bms.unlink()
        bms.symlink_to("/dev/zero")
    elif hostile == "oversized":
        with open(bms, "ab") as f:
            f.truncate(200 << 20)  # 200 MiB where the campaign signs 40,000 bytes
    else:
        elsewhere = tmp_path / "elsewhere"
        (stick / PACKAGES).rename(elsewhere)
        (stick / PACKAGES).symlink_to(elsewhere)
    with pytest.raises(UsageError) as refused:
        _import(stick, tmp_path)
    assert {"fifo": "a FIFO", "device": "symbolic link", "oversized": f"{200 << 20} bytes on the media",
            "packages_link": "symbolic link"}[hostile] in str(refused.value)
    state = tmp_path / "tbox"
    assert [p for p in state.rglob("*") if p.is_file()] == []  # no copy, no half record


def test_a_stick_that_does_not_fit_is_refused_before_anything_is_copied(tmp_path: Path) -> None:
    stick = _stick(tmp_path, {"vcu-2.0.0.bin": b"x" * 1000})
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(UsageError, match="storage: the packages need"):
        _import(stick, tmp_path, reserve=free)
    assert [p for p in (tmp_path / "tbox").rglob("*") if p.is_file()] == []
    campaigns = _import(stick, tmp_path)
    (record,) = campaigns.iterdir()
    assert (record / "media" / "vcu-2.0.0.bin").read_bytes() == b"x" * 1000


def test_the_watcher_reads_the_media_again_only_when_it_changed(tmp_path: Path) -> None:
    media = tmp_path / "mnt"
    (media / PACKAGES).mkdir(parents=True)
    looks: list[Path] = []
    watcher = MediaWatcher(media, CAMPAIGN_FILE, PACKAGES, looks.append, threading.Event())
    assert not watcher.tick()  # nothing on it
    (media / CAMPAIGN_FILE).write_bytes(b"{}")
    assert watcher.tick() and not watcher.tick() and not watcher.tick()
    time.sleep(0.01)
    (media / PACKAGES / "vcu.bin").write_bytes(b"1")  # a package copied on: looked at again
    assert watcher.tick() and not watcher.tick()
    (media / PACKAGES / "vcu.bin").write_bytes(b"12")
    assert watcher.tick()
    assert len(looks) == 3
