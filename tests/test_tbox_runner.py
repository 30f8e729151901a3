"""The TBOX's campaign runner, state by state, in-process: the real runner on a real state
directory, fakes at its two ports (cloud, gateway) and at the download function. A runner
"killed" right after a state was persisted is dropped and a new one is built on the same state
directory, as a restarted daemon would."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.file_client import DeployResult
from agent.core.campaign import key_id, sign_campaign
from agent.core.config import PreconditionsConfig, TboxConfig
from agent.errors import TryLater
from agent.protocol.link import InstallStatus
from tbox.campaign_state import STATES, TERMINAL, CampaignRecord
from tbox.download import DownloadError, DownloadInfo, DownloadInterrupted
from tbox.gateway_client import GatewayError
from tbox.inbound import Inbound
from tbox.runner import WAITING, CampaignRunner

VIN = "LVOTARUNNER000001"
NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.timezone.utc)
KEY = Ed25519PrivateKey.generate()
TRUSTED = {key_id(KEY.public_key()): KEY.public_key()}
IMAGES = {"vcu": b"v" * 3000, "bms": b"b" * 2000}


def envelope(cid: str = "c-1", install: str = "immediate", version: str = "2.0.0", campaign: dict[str, Any] | None = None,
             **package: Any) -> bytes:
    return sign_campaign({
        "format": "vota-campaign", "version": 1, "campaign_id": cid, "vin": VIN, "install": install,
        "issued": "2026-11-21T10:00:00Z", "expires": "2026-12-31T00:00:00Z",
        "packages": [{"name": f"{ecu}-{version}.bin", "ecu": ecu, "version": version, "url": f"http://cloud/{ecu}",
                      "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **package}
                     for ecu, data in IMAGES.items()], **(campaign or {}),
    }, KEY)


class Killed(BaseException):
    """The process dies here: nothing after it runs (not an Exception: no handler catches it)."""


class FakeCloud:
    def __init__(self) -> None:
        self.messages: dict[str, tuple[str, dict[str, Any]]] = {}  # by id: what the cloud stores once
        self.traces: list[str] = []

    def report(self, kind: str, body: dict[str, Any], msg_id: str | None = None) -> str:
        assert msg_id is not None, "every campaign report has a stable id"
        self.messages[msg_id] = (kind, body)
        return msg_id

    def report_trace(self, trace_id: str, trace: bytes, meta: dict[str, Any]) -> list[str]:
        self.traces.append(trace_id)
        return [trace_id]

    def events(self, **match: Any) -> list[dict[str, Any]]:
        return [b for k, b in self.messages.values() if k == "events" and all(b.get(f) == v for f, v in match.items())]


class FakeGateway:
    """The gateway as the TBOX sees it; its state (deployed files, the install) outlives the TBOX."""

    def __init__(self) -> None:
        self.deployed: dict[str, bytes] = {}
        self.deploys: list[tuple[str, bool]] = []
        self.installs: list[str] = []
        self.manifests: dict[str, dict[str, Any]] = {}
        self.install: dict[str, int] = {}
        self.fail: dict[str, list[BaseException]] = {}  # per method: errors to raise first, in order
        self.boot = b"boot-one"
        self.broken_deploys: list[bool | None] = []  # None: that deploy goes through
        self.refuse: str | None = None  # the gateway refuses installs, with this reason
        self.held: list[dict[str, Any]] = []  # installs stopped for the vehicle's preconditions, first to last
        self.on_held: Callable[[], None] = lambda: None
        self.cancels: list[tuple[str, str]] = []

    def _maybe_fail(self, method: str) -> None:
        if self.fail.get(method):
            raise self.fail[method].pop(0)

    def inventory(self) -> list[dict[str, Any]]:
        self._maybe_fail("inventory")
        return [{"ecu": ecu, "software_version": "1.0.0"} for ecu in IMAGES]

    def boot_id(self) -> bytes:
        self._maybe_fail("boot_id")
        return self.boot

    def rxswin(self) -> dict[str, str] | None:
        return None  # a vehicle without approvals (the RXSWIN: tests/test_rxswin.py)

    def traced(self, directory: Path, name: str) -> Any:
        return contextlib.nullcontext()  # the exchanges of a real gateway link: tests/test_link_traces.py

    def deploy(self, name: str, path: Path, sha256: str, out_dir: Path | None = None, *, resume: bool = False,
               progress: Callable[[int, int], None] | None = None) -> DeployResult:
        self._maybe_fail("deploy")
        restart = self.broken_deploys.pop(0) if self.broken_deploys else None
        if restart is not None:  # the deploy breaks off without an answer; ``restart`` restarts the gateway under it
            self.deploys.append((name, resume))
            if restart:
                self.boot = os.urandom(8)
            return DeployResult(package=name, result="failed", size=0, sha256=sha256, failed_step="transfer_data",
                                reason="no response (timeout)")
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha256
        if progress is not None:
            progress(len(data), len(data))
        self.deploys.append((name, resume))
        self.deployed[name] = data
        result = DeployResult(package=name, result="success", size=len(data), sha256=sha256, packets=1)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{name}.deploy.trace.jsonl").write_text('{"format":"vota-trace","version":1}\n')
            (out_dir / f"{name}.deploy.result.json").write_text(json.dumps(result.to_json()))
        return result

    def install_status(self, campaign_id: str) -> tuple[int, int, int]:
        self._maybe_fail("install_status")
        return self.install.get(campaign_id, InstallStatus.NONE), 0, len(IMAGES)

    def start_install(self, manifest_name: str) -> None:
        manifest = json.loads(self.deployed[manifest_name])
        if self.refuse is not None:
            self.install[manifest["campaign_id"]] = InstallStatus.REFUSED
            raise GatewayError("start install: negative response 0x22")
        if not manifest.get("arriving"):  # else each package is waited for as the install goes (gateway/arrivals.py)
            assert {j["package"] for j in manifest["jobs"]} <= set(self.deployed)
        self.manifests[manifest["campaign_id"]] = manifest
        self.installs.append(manifest["campaign_id"])
        self.install[manifest["campaign_id"]] = InstallStatus.RUNNING

    def cancel_install(self, campaign_id: str, reason: str) -> tuple[int, int, int]:
        self._maybe_fail("cancel_install")
        self.cancels.append((campaign_id, reason))
        if self.install.get(campaign_id) == InstallStatus.RUNNING:
            self.install[campaign_id] = InstallStatus.CANCELLED
        return self.install.get(campaign_id, InstallStatus.NONE), 0, len(IMAGES)

    def wait_install(self, campaign_id: str, timeout: float, poll: float = 0.5,
                     should_stop: Callable[[int, int], bool] | None = None,
                     waiting: Callable[[bool], None] | None = None) -> int:
        self._maybe_fail("wait_install")
        manifest = self.manifests[campaign_id]  # by now every package is on the gateway
        assert {j.get("delta") or j["package"] for j in manifest["jobs"]} <= set(self.deployed)
        if should_stop is not None:
            should_stop(len(IMAGES), len(IMAGES))
        if self.held:
            self.summary_extra = {"preconditions": self.held.pop(0)}
            self.on_held()
            self.install[campaign_id] = InstallStatus.FAILED
            return InstallStatus.FAILED
        self.summary_extra = {}
        self.install[campaign_id] = InstallStatus.SUCCEEDED
        return InstallStatus.SUCCEEDED

    def install_progress(self, campaign_id: str) -> dict[str, tuple[str, int, int]]:
        return {}

    def read_file(self, path: str) -> bytes:
        self._maybe_fail("read_file")
        cid, _, name = path.partition("/")
        if name == "install.json":
            return json.dumps({"campaign_id": cid, "status": "refused", "error": self.refuse}).encode()
        if name == "summary.json":
            return json.dumps({"results": [{"ecu": ecu, "result": "success", "failed_step": None, "reason": None,
                                            "version_after": "2.0.0", "trace_file": f"{ecu}.trace.jsonl",
                                            "image_size": len(data), "bytes_transferred": len(data), "transfer_s": 0.5}
                                           for ecu, data in IMAGES.items()], **getattr(self, "summary_extra", {})}).encode()
        return b'{"format":"vota-trace","version":1}\n'


class Vehicle:
    """One TBOX state directory and the world around it (cloud, gateway, package server)."""

    def __init__(self, tmp: Path, **tbox: Any) -> None:
        self.config = replace(TboxConfig(VIN, state_dir=str(tmp / "tbox"), trusted_keys=("k",), retry_delay_s=0.001,
                                         retry_max_delay_s=0.002, max_retries=3), **tbox)
        self.cloud, self.gateway = FakeCloud(), FakeGateway()
        self.fetches: list[str] = []
        self.fetch_errors: list[BaseException] = []
        self.signals: dict[str, Any] | None = None  # the vehicle's state, with tbox.preconditions
        self.estimate: Any = None

    def fetch(self, url: str, dest: Path, size: int, sha256: str, *, progress: Any = None, should_stop: Any = None) -> DownloadInfo:
        self.fetches.append(url)
        if self.fetch_errors:
            raise self.fetch_errors.pop(0)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(IMAGES[url.rsplit("/", 1)[1]])
        return DownloadInfo(0, size)

    def runner(self, entered: Callable[[CampaignRecord], None] | None = None) -> CampaignRunner:
        return CampaignRunner(self.config, set(IMAGES), self.cloud, self.gateway, TRUSTED, now=lambda: NOW,
                              stop=threading.Event(), fetch=self.fetch, entered=entered, estimate=self.estimate,
                              signals=None if self.signals is None else lambda: dict(self.signals or {}))

    def receive(self, data: bytes) -> None:
        runner = self.runner()
        Inbound(VIN, runner, lambda doc: None, lambda: None, lambda: None).on_message("campaign", data)

    def record(self) -> CampaignRecord:
        (record,) = self.runner().records()
        return record

    def finished(self) -> dict[str, Any]:
        (done,) = self.cloud.events(event="finished")
        return done


def kill_in(state: str, times: int = 1) -> Callable[[CampaignRecord], None]:
    """An ``entered`` hook: the process dies right after ``state`` was persisted, ``times`` times."""
    left = [times]

    def hook(record: CampaignRecord) -> None:
        if record.state == state and left[0] > 0:
            left[0] -= 1
            raise Killed(state)

    return hook


def test_a_campaign_runs_through_every_state(tmp_path: Path) -> None:
    v = Vehicle(tmp_path)
    v.receive(envelope())
    assert v.record().state == "received"  # persisted before anything else happens
    seen: list[str] = []
    v.runner(entered=lambda r: seen.append(r.state)).step()
    assert seen == ["received", "verified", "downloading", "downloaded", "deploying", "deployed", "awaiting_install",
                    "installing", "done"]
    assert v.record().state == "reported" and v.finished()["outcome"] == "success"
    # pipelined: the manifest and the install's start first, then each package while the gateway installs
    assert v.gateway.deploys == [("install-c-1.json", False), ("vcu-2.0.0.bin", False), ("bms-2.0.0.bin", False)]
    assert v.gateway.installs == ["c-1"] and json.loads(v.gateway.deployed["install-c-1.json"])["arriving"] is True
    assert {"c-1.deploy.vcu-2.0.0.bin", "c-1.flash.vcu", "c-1.flash.bms"} <= set(v.cloud.traces)
    assert "c-1.inventory" in v.cloud.messages
    progress = [(b["stage"], b.get("package"), b["done"], b["total"]) for b in v.cloud.events(event="progress")]
    assert ("install", None, 2, 2) in progress and {p[:2] for p in progress} >= {("deploy", "vcu-2.0.0.bin"),
                                                                                ("deploy", "bms-2.0.0.bin")}


def test_without_pipelining_the_install_starts_once_every_package_is_on_the_gateway(tmp_path: Path) -> None:
    v = Vehicle(tmp_path, pipeline=False)
    v.receive(envelope())
    v.runner().step()
    assert v.record().state == "reported" and v.finished()["outcome"] == "success"
    assert v.gateway.deploys == [("vcu-2.0.0.bin", False), ("bms-2.0.0.bin", False), ("install-c-1.json", False)]
    assert "arriving" not in json.loads(v.gateway.deployed["install-c-1.json"])


def test_the_runner_says_what_it_does_in_one_line(tmp_path: Path) -> None:
    """The line systemd shows as STATUS=: the campaign's state, and bytes or ECUs as they go."""
    v = Vehicle(tmp_path)
    v.receive(envelope())
    said: list[str] = []
    runner = v.runner(entered=lambda r: said.append(runner.activity))
    deploy = v.gateway.deploy

    def deploy_and_listen(*args: Any, progress: Any = None, **kw: Any) -> DeployResult:
        def listen(done: int, total: int) -> None:
            progress(done, total)
            said.append(runner.activity)
        return deploy(*args, progress=listen if progress is not None else None, **kw)

    v.gateway.deploy = deploy_and_listen  # type: ignore[method-assign]
    runner.step()
    assert said[0] == f"campaign {v.record().key}: received"  # not verified yet: named by its record
    assert said[1:3] == ["campaign c-1: verified", "campaign c-1: downloading"]
    size = len(IMAGES["vcu"])
    assert f"campaign c-1: deploy vcu-2.0.0.bin {size} of {size} bytes" in said
    assert "campaign c-1: installing" in said
    runner.step()
    assert runner.activity == "no campaign open"


@pytest.mark.parametrize("state", [s for s in STATES if s not in (*TERMINAL, "failed")])
def test_killed_in_every_state_resumes_and_finishes_once(tmp_path: Path, state: str) -> None:
    v = Vehicle(tmp_path)
    v.receive(envelope())
    with pytest.raises(Killed):
        v.runner(entered=kill_in(state)).step()
    assert v.record().state == state  # what the new process finds
    v.runner().step()  # the restarted TBOX
    record = v.record()
    assert record.state == "reported" and record.outcome == "success"
    # once before the kill, once after the restart; waiting (for the owner, for the gateway's install) is one entry
    assert record.entries[state] == (1 if state in (*WAITING, "installing") else 2)
    assert v.finished()["outcome"] == "success"
    assert v.gateway.installs == ["c-1"]  # never installed twice
    assert len(v.fetches) == len(IMAGES)  # nothing downloaded twice
    assert [name for name, _ in v.gateway.deploys] == ["install-c-1.json", "vcu-2.0.0.bin", "bms-2.0.0.bin"]


def test_killed_in_the_middle_of_a_deploy_resumes_that_package(tmp_path: Path) -> None:
    v = Vehicle(tmp_path, pipeline=False)  # the packages' deploys first, as the faults below count them
    v.receive(envelope())
    v.gateway.fail["deploy"] = [Killed("in TransferData")]
    with pytest.raises(Killed):
        v.runner().step()
    v.runner().step()
    assert v.finished()["outcome"] == "success"
    assert v.gateway.deploys == [("vcu-2.0.0.bin", True), ("bms-2.0.0.bin", False), ("install-c-1.json", False)]


def test_the_loop_guard_counts_restarts_not_retries(tmp_path: Path) -> None:
    v = Vehicle(tmp_path, max_attempts=3)
    v.receive(envelope())
    for _ in range(3):  # the TBOX dies in the same state again and again
        with pytest.raises(Killed):
            v.runner(entered=kill_in("deploying")).step()
    v.runner().step()
    done = v.finished()
    assert done["outcome"] == "failed" and done["failure"]["reason"] == "loop_guard"
    assert done["failure"]["stage"] == "deploying"


def test_a_deploy_cut_off_by_a_gateway_restart_is_resumed_not_failed(tmp_path: Path) -> None:
    v = Vehicle(tmp_path, pipeline=False)  # the packages' deploys first, as the faults below count them
    v.receive(envelope())
    v.gateway.broken_deploys = [True]  # the gateway restarts in the middle of the first package
    v.runner().step()
    assert v.finished()["outcome"] == "success"
    assert v.gateway.deploys[:2] == [("vcu-2.0.0.bin", False), ("vcu-2.0.0.bin", True)]  # resumed (ResumeFile)
    cut = v.cloud.events(event="interrupted")
    assert [(b["stage"], b["package"], b["failed_step"]) for b in cut] == [("deploy", "vcu-2.0.0.bin", "transfer_data")]


def test_a_deploy_that_breaks_off_on_a_gateway_that_did_not_restart_fails(tmp_path: Path) -> None:
    v = Vehicle(tmp_path, pipeline=False)  # the packages' deploys first, as the faults below count them
    v.receive(envelope())
    v.gateway.broken_deploys = [False]  # no answer, same boot id: the gateway's fault (D4)
    v.runner().step()
    done = v.finished()
    assert done["outcome"] == "failed" and done["failure"]["reason"] == "deploy_failed"
    assert v.cloud.events(event="interrupted") == []


def test_a_campaign_that_fails_while_its_install_runs_cancels_that_install(tmp_path: Path) -> None:
    """Pipelined: the install runs on the gateway when a deploy fails; before the campaign's end
    is told, the install is cancelled there, and ``finished`` says so."""
    v = Vehicle(tmp_path)
    v.receive(envelope())
    v.gateway.broken_deploys = [None, False]  # the first package's deploy (after the manifest) fails
    v.runner().step()
    done = v.finished()
    assert (done["outcome"], done["failure"]["reason"]) == ("failed", "deploy_failed")
    assert v.gateway.installs == ["c-1"] and v.gateway.cancels == [("c-1", "deploy: deploy_failed")]
    assert done["cancel"]["state"] == "done" and done["cancel"]["status"] == "cancelled"
    assert v.record().cancel == done["cancel"]


def test_a_cancel_that_cannot_reach_the_gateway_goes_before_the_next_install(tmp_path: Path) -> None:
    v = Vehicle(tmp_path, cancel_timeout_s=0)
    v.receive(envelope())
    v.gateway.broken_deploys = [None, False]
    v.gateway.fail["cancel_install"] = [TryLater("no answer")]
    v.runner().step()
    first = v.finished()
    assert first["cancel"] == {"state": "pending", "reason": "no answer"} and v.gateway.cancels == []
    v.receive(envelope("c-2", version="2.0.1"))
    v.runner().step()
    assert v.gateway.cancels == [("c-1", "deploy: deploy_failed")]  # delivered before c-2's install started
    assert v.gateway.installs == ["c-1", "c-2"]
    c2 = [b for b in v.cloud.events(event="finished") if b["campaign_id"] == "c-2"]
    assert c2[0]["outcome"] == "success" and "cancel" not in c2[0]
    (c1,) = [r for r in v.runner().records() if r.campaign_id == "c-1"]
    assert c1.cancel is not None and c1.cancel["state"] == "done"


def test_a_campaign_whose_install_ended_is_not_cancelled(tmp_path: Path) -> None:
    """The gateway said the install is over; the TBOX then failed reading its results: there is
    nothing running to cancel (and what the install did stays)."""
    v = Vehicle(tmp_path)
    v.receive(envelope())
    v.gateway.fail["read_file"] = [TryLater("no answer")] * 10
    v.runner().step()
    done = v.finished()
    assert (done["failure"]["stage"], done["failure"]["reason"]) == ("installing", "retries_exhausted")
    assert v.gateway.cancels == [] and "cancel" not in done


def test_killed_again_and_again_while_the_gateway_installs_is_no_loop(tmp_path: Path) -> None:
    """The gateway runs the install on its own: a TBOX killed while it waits, however often,
    goes on waiting; once the install is over, restarts count again."""
    v = Vehicle(tmp_path, max_attempts=2)
    v.receive(envelope())
    for _ in range(5):
        v.gateway.fail["wait_install"] = [Killed("while polling")]
        with pytest.raises(Killed):
            v.runner().step()
    v.runner().step()
    assert v.finished()["outcome"] == "success"
    assert v.gateway.installs == ["c-1"]  # started once
    assert [b["state"] for b in v.cloud.events(event="state")].count("installing") == 1


def test_transient_problems_back_off_within_their_own_budget(tmp_path: Path) -> None:
    v = Vehicle(tmp_path, max_retries=3, max_attempts=1)  # one entry per state is all the loop guard allows
    v.receive(envelope())
    v.gateway.fail["inventory"] = [TryLater("gateway busy"), TryLater("gateway busy")]
    v.fetch_errors = [DownloadInterrupted("connection reset"), DownloadInterrupted("connection reset")]
    v.runner().step()
    assert v.finished()["outcome"] == "success"  # two retries in two states: no loop guard
    retries = sorted((b["state"], b["retry"]) for b in v.cloud.events(event="retry"))
    assert retries == [("downloading", 1), ("downloading", 2), ("received", 1), ("received", 2)]
    assert v.record().entries["received"] == 1 and v.record().entries["downloading"] == 1


def test_a_transient_problem_that_does_not_go_away_ends_the_campaign(tmp_path: Path) -> None:
    v = Vehicle(tmp_path, max_retries=3)
    v.receive(envelope())
    v.gateway.fail["wait_install"] = [TryLater("gateway unreachable")] * 10
    v.runner().step()
    done = v.finished()
    assert done["failure"]["reason"] == "retries_exhausted" and done["failure"]["stage"] == "installing"
    assert "gateway unreachable" in done["failure"]["detail"]
    assert v.gateway.installs == ["c-1"]  # started once; the retries only asked for its status
    assert v.gateway.cancels == [("c-1", "installing: retries_exhausted")]  # and it is not left running there


def test_a_programming_error_surfaces_instead_of_being_retried(tmp_path: Path) -> None:
    v = Vehicle(tmp_path)
    v.receive(envelope())
    v.gateway.fail["deploy"] = [KeyError("packet")]
    v.runner().step()
    done = v.finished()
    assert done["failure"]["reason"] == "internal_error" and done["failure"]["stage"] == "deploying"
    assert "KeyError" in done["failure"]["detail"]
    assert not v.cloud.events(event="retry")


def test_a_refused_download_and_a_refused_campaign_end_it_at_once(tmp_path: Path) -> None:
    v = Vehicle(tmp_path)
    v.receive(envelope())
    v.fetch_errors = [DownloadError("http://cloud/vcu: SHA-256 does not match", "digest_mismatch")]
    with pytest.raises(Killed):  # and the TBOX dies once the failure is persisted, before reporting it
        v.runner(entered=kill_in("failed")).step()
    v.runner().step()
    assert v.finished()["failure"]["reason"] == "package_refused" and len(v.fetches) == 1
    w = Vehicle(tmp_path / "older")
    w.receive(envelope("c-2", version="0.9.0"))  # older than the installed 1.0.0
    w.runner().step()
    assert w.finished()["failure"]["reason"] == "downgrade" and not w.gateway.deploys
    assert w.cloud.events(event="rejected")[0]["reason"] == "downgrade"


def test_confirm_policy_waits_and_a_restart_keeps_waiting(tmp_path: Path) -> None:
    v = Vehicle(tmp_path)
    v.receive(envelope(install="confirm"))
    runner = v.runner()
    assert runner.step() and v.record().state == "awaiting_install"
    assert not v.runner().step()  # a restarted TBOX waits too, without entering the state again
    assert v.record().entries["awaiting_install"] == 1 and not v.gateway.installs
    assert v.runner().confirm("c-1") and not v.runner().confirm("c-unknown")
    v.runner().step()
    assert v.finished()["outcome"] == "success" and v.gateway.installs == ["c-1"]


def test_an_unmet_requirement_is_refused_before_anything_is_downloaded(tmp_path: Path) -> None:
    v = Vehicle(tmp_path)
    v.receive(envelope(requires={"bcm": "4.0"}))  # bcm is not even in the inventory
    v.runner().step()
    done = v.finished()
    assert done["failure"]["reason"] == "dependency" and done["failure"]["stage"] == "verify"
    assert not v.fetches and not v.gateway.deploys
    assert v.cloud.events(event="rejected")[0]["reason"] == "dependency"


def test_deeply_nested_json_is_malformed_not_an_internal_error(tmp_path: Path) -> None:
    v = Vehicle(tmp_path)
    junk = b"[" * 50000 + b"]" * 50000
    v.receive(junk)
    Inbound(VIN, v.runner(), lambda doc: None, lambda: None, lambda: None).on_message("command", junk)
    v.runner().step()
    assert sorted((b["topic"], b["reason"]) for b in v.cloud.events(event="rejected")) == [
        ("campaign", "malformed"), ("command", "malformed")]
    campaigns = tmp_path / "tbox" / "campaigns"
    assert not campaigns.exists() or not list(campaigns.iterdir())  # junk is not kept to be read again
    assert not [b for kind, b in v.cloud.messages.values() if kind == "inventory"]  # nor did it cost an inventory
    v.receive(envelope())  # and the next campaign runs
    v.runner().step()
    assert [b["outcome"] for b in v.cloud.events(event="finished", campaign_id="c-1")] == ["success"]


def test_the_install_manifest_carries_the_signed_campaign_and_a_refusal_ends_the_campaign(tmp_path: Path) -> None:
    """The gateway verifies what it flashes against the signed campaign the manifest carries; when
    it refuses, the campaign fails at once with the gateway's reason (not retried for 18 minutes)."""
    v = Vehicle(tmp_path)
    v.gateway.refuse = "not signed: campaign rejected (untrusted_key): no signature by a trusted key"
    v.receive(envelope())
    v.runner().step()
    manifest = json.loads(v.gateway.deployed["install-c-1.json"])
    assert base64.b64decode(manifest["proof"]["campaign"]) == envelope()
    finished = v.finished()
    assert finished["outcome"] == "failed" and finished["failure"]["reason"] == "install_refused"
    assert "untrusted_key" in finished["failure"]["detail"] and v.gateway.installs == []


def test_a_signed_campaign_overrides_the_vehicle_preconditions_and_the_gateway_is_handed_them(tmp_path: Path) -> None:
    v = Vehicle(tmp_path, preconditions=PreconditionsConfig(ecu="vcu", min_soc=20, soc_per_minute=0, recheck_s=0.001))
    v.signals = {"soc": 60, "power_mode": "off", "gear": "P", "speed_kmh": 0, "battery_mv": 12600, "charging": "charging"}
    v.receive(envelope(campaign={"preconditions": {"min_soc": 70, "charging": "forbidden"}}))
    v.runner().step()
    assert v.record().state == "awaiting_install" and not v.gateway.installs
    (waiting,) = v.cloud.events(event="preconditions")
    assert set(waiting["unmet"]) == {"soc", "charging"} and "70 % needed" in waiting["unmet"]["soc"], waiting
    v.signals.update(soc=75, charging="no")
    v.runner().step()
    assert v.finished()["outcome"] == "success"
    gate = json.loads(v.gateway.deployed["install-c-1.json"])["preconditions"]
    assert (gate["ecu"], gate["min_soc"], gate["charging"], gate["parked"]) == ("vcu", 70, "forbidden", True), gate
    assert gate["until"] > 0 and "install_s" in gate


@pytest.mark.parametrize("override, why", [
    ({"ecu": "bcm"}, "'ecu' cannot be set by a campaign"),
    ({"min_soc": "high"}, "preconditions.min_soc must be a number, 0 or more"),
    ({"parked": 1}, "preconditions.parked must be true or false"),
    ({"charging": "sometimes"}, "preconditions.charging must be allowed or forbidden"),
    ({"window_s": 0}, "preconditions.window_s must be a number above 0"),
    ([], "preconditions must be an object"),
])
def test_a_campaign_override_the_vehicle_cannot_use_is_refused_as_malformed(override: Any, why: str) -> None:
    from agent.core.campaign import CampaignRejected, verify_campaign

    doc = json.loads(base64.b64decode(json.loads(envelope())["payload"]))
    with pytest.raises(CampaignRejected) as refused:
        verify_campaign(_unchecked({**doc, "preconditions": override}), TRUSTED, vin=VIN, now=NOW)
    assert refused.value.reason == "malformed" and why in str(refused.value), str(refused.value)


def _unchecked(doc: dict[str, Any]) -> bytes:
    """Signed without the signing side's own check (what a broken or hostile signer could send)."""
    from agent.core.campaign import _DOMAIN, PAYLOAD_TYPE
    from agent.core.roles import sign_envelope

    return sign_envelope(json.dumps(doc).encode(), PAYLOAD_TYPE, _DOMAIN, KEY)


def test_the_rate_each_ecu_was_last_flashed_at_goes_into_the_next_estimate(tmp_path: Path) -> None:
    from agent.core.preconditions import Estimate

    v = Vehicle(tmp_path)
    measured: list[dict] = []
    v.estimate = lambda jobs, activation, pipelined, rates: measured.append(rates) or Estimate(9.5, {"vcu": 5.0})
    v.receive(envelope())
    v.runner().step()
    v.receive(envelope("c-2", version="3.0.0"))
    v.runner().step()
    assert measured[0] == {}
    second = measured[1]  # image bytes over 0.5 s of transfer; the rest of each flash; the install beyond them
    assert {e: second[e]["bytes_per_s"] for e in ("vcu", "bms")} == {"vcu": 6000.0, "bms": 4000.0}, second
    assert all(second[e]["other_s"] >= 0 for e in ("vcu", "bms")) and set(second["_install"]) == {"per_ecu"}, second
    assert [e["install_s"] for e in v.cloud.events(event="estimate")] == [9.5, 9.5]
    assert v.cloud.events(event="finished", campaign_id="c-2")[0]["estimated_install_s"] == 9.5


def test_staging_stopped_for_the_vehicle_s_state_waits_again_and_a_restart_keeps_waiting(tmp_path: Path) -> None:
    """The gateway stopped staging (the ignition went on): the campaign is back in awaiting_install,
    persisted, so neither this runner nor a restarted one starts the install again until the
    vehicle allows it; when it does, the install runs once more. Turned back between
    activations: failed ``preconditions``."""
    parked = {"soc": 80, "power_mode": "off", "gear": "P", "speed_kmh": 0, "battery_mv": 12600, "charging": "no"}
    v = Vehicle(tmp_path, preconditions=PreconditionsConfig(ecu="vcu", soc_per_minute=0, recheck_s=0.001))
    v.signals = dict(parked)
    check = {"phase": "stage", "met": False, "unmet": {"ignition_off": "power mode run, off needed"},
             "values": {**parked, "power_mode": "run"}}
    v.gateway.held = [check]
    v.gateway.on_held = lambda: v.signals.update(power_mode="run")  # as the gateway found it
    v.receive(envelope())
    v.runner().step()
    assert v.record().state == "awaiting_install" and v.gateway.installs == ["c-1"]
    for _ in range(3):
        v.runner().step()
    assert v.record().state == "awaiting_install" and v.gateway.installs == ["c-1"]  # not started again
    (stopped,) = v.cloud.events(event="preconditions", phase="stage")
    assert stopped["staging"] == "stopped" and stopped["unmet"] == check["unmet"], stopped
    v.signals["power_mode"] = "off"
    v.runner().step()
    assert v.finished()["outcome"] == "success" and v.gateway.installs == ["c-1", "c-1"]
    assert len(v.cloud.events(event="preconditions", met=True)) == 2  # met, stopped, met again

    w = Vehicle(tmp_path / "between", preconditions=PreconditionsConfig(ecu="vcu", soc_per_minute=0, recheck_s=0.001))
    w.signals = dict(parked)
    w.gateway.held = [{**check, "phase": "activate"}]
    w.receive(envelope())
    w.runner().step()
    failure = w.finished()["failure"]
    assert (failure["stage"], failure["reason"], failure["phase"]) == ("install", "preconditions", "activate"), failure
    assert failure["unmet"] == check["unmet"] and w.gateway.installs == ["c-1"]


def test_ended_campaigns_give_back_their_packages_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    v = Vehicle(tmp_path, keep_campaigns=2)
    first = envelope("c-1")
    for n, data in enumerate([first, envelope("c-2", version="2.0.1"), envelope("c-3", version="2.0.2"),
                              envelope("c-4", version="2.0.3")]):
        v.receive(data)
        v.runner().step()
        os.utime(next(r.path for r in v.runner().records() if r.campaign_id == f"c-{n + 1}"), (time.time() - 100 + n,) * 2)
    runner = v.runner()
    runner.step()
    kept = sorted(r.campaign_id or "" for r in runner.records())
    assert kept == ["c-3", "c-4"]
    for record in runner.records():  # the evidence stays, the packages are gone
        assert record.state == "reported" and not (record.dir / "packages").exists() and record.envelope_path.exists()
    retired = json.loads((tmp_path / "tbox" / "retired.json").read_text())["campaigns"]
    assert sorted(retired.values()) == ["c-1", "c-2"] and not (tmp_path / "tbox" / "trash").exists()
    installs = list(v.gateway.installs)
    v.receive(first)  # the same envelope again: known, not run again
    v.runner().step()
    assert sorted(r.campaign_id or "" for r in v.runner().records()) == ["c-3", "c-4"]
    v.receive(envelope("c-1", version="2.0.9"))  # another envelope with a retired campaign's id: a duplicate
    v.runner().step()
    assert v.gateway.installs == installs
    assert any(b.get("reason") == "duplicate" and b.get("campaign_id") == "c-1" for b in v.cloud.events(event="rejected"))


def test_a_cancel_the_gateway_refuses_is_left_pending_at_once(tmp_path: Path) -> None:
    """A negative answer is an answer: the TBOX does not ask again for a minute, the cancel waits
    for the next install (a busy 0x21 is asked again)."""
    v = Vehicle(tmp_path)  # cancel_timeout_s: 60
    v.receive(envelope())
    v.gateway.broken_deploys = [None, False]
    v.gateway.fail["cancel_install"] = [GatewayError("cancel install: negative response 0x22", 0x22)]
    began = time.monotonic()
    v.runner().step()
    assert v.finished()["cancel"] == {"state": "pending", "reason": "cancel install: negative response 0x22"}
    assert time.monotonic() - began < 30  # not the minute of cancel_timeout_s (generous: a busy machine)
