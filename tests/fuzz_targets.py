"""Fuzz targets: every external input of the daemons, each with what must hold for any input.

A target sets up the real component (an ECU simulator, the gateway's deploy server, a UDS
link, the TBOX's inbound handling, the collector, the verifiers, the diagnosis), is fed one
generated input at a time, and checks after each: no exception escaped, nothing was logged
as an internal error, the input got an answer or a reason, and what was stored before is
still there unchanged. ``tests/test_fuzz.py`` runs them under hypothesis with bounded
example counts; ``benchmarks/fuzz.py`` runs them for as long as asked.

The only stand-ins are at the transport port: a stack that collects what a server sends
instead of putting it on the bus, and an in-memory cloud port that records reports.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import can
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import strategies as st

from agent.core.campaign import CampaignRejected, key_id, sign_campaign, verify_campaign
from agent.core.config import TboxConfig, parse_vehicle_config
from agent.core.content import BundleRejected, build_bundle, sign_bundle, verify_bundle
from agent.core.trace import parse_trace
from agent.errors import VotaError

__all__ = ["TARGETS", "Target", "internal_errors"]

VIN = "LVOTAFUZZ00000001"
NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.timezone.utc)


# ---- shared pieces ------------------------------------------------------------------------------------------------
class _Errors(logging.Handler):
    """Collects ERROR records of vota's own loggers (``log.exception`` marks an internal error)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in ("agent", "tbox", "gateway", "ecu_sim", "cloud_sim"):
            self.records.append(record)


@contextlib.contextmanager
def internal_errors() -> Iterator[list[logging.LogRecord]]:
    handler = _Errors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)


def _no_internal_error(records: list[logging.LogRecord], what: Any) -> None:
    assert not records, f"{what!r}: logged as an internal error: {records[0].getMessage()}"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mutate(data: bytes, rnd: random.Random, edits: int) -> bytes:
    """Byte-level mutations of a valid input: flips, insertions, deletions, cuts, repeats."""
    buf = bytearray(data)
    for _ in range(edits):
        op = rnd.randrange(6)
        pos = rnd.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rnd.randrange(8)
        elif op == 1:
            buf[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 8)))
        elif op == 2:
            del buf[pos:pos + rnd.randrange(1, 16)]
        elif op == 3:
            del buf[pos:]
        elif op == 4 and buf:
            chunk = buf[pos:pos + rnd.randrange(1, 32)]
            buf[pos:pos] = chunk * rnd.randrange(1, 4)
        else:
            buf[pos:pos] = rnd.choice([b"[", b"{", b'"', b"\\u0000", b"-1", b"1e999", b"null", b"\x00", b"\xff"])
    return bytes(buf)


def json_values(depth: int = 3) -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                             max_size=4), max_leaves=12)


def mutated(seed_bytes: bytes) -> st.SearchStrategy[bytes]:
    """A valid input mutated 1-8 times (drawn reproducibly from hypothesis's randomness)."""
    return st.tuples(st.randoms(use_true_random=False), st.integers(1, 8)).map(
        lambda t: mutate(seed_bytes, t[0], t[1]))


def json_mutations(doc: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """The document with one field replaced by any JSON value, or removed."""
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append((*path, k))
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                paths.append((*path, i))
                walk(v, (*path, i))

    walk(doc, ())

    def apply(args: tuple[tuple[Any, ...], Any, bool]) -> bytes:
        path, value, remove = args
        copy = json.loads(json.dumps(doc))
        node = copy
        for key in path[:-1]:
            node = node[key]
        if remove and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return json.dumps(copy).encode()

    return st.tuples(st.sampled_from(paths), json_values(), st.booleans()).map(apply)


class Target:
    """One input of one component. ``open`` sets it up, ``feed`` takes one input and checks
    what must hold, ``close`` checks what must hold at the end and tears down."""

    name = ""
    strategy: st.SearchStrategy[Any]

    def open(self, tmp: Path) -> None:
        self.tmp = tmp

    def feed(self, example: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---- UDS servers --------------------------------------------------------------------------------------------------
class _Collecting:
    """The transport port of a UDS server: what it sends is collected, not put on the bus."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, payload: bytes) -> None:
        self.sent.append(bytes(payload))


def _well_formed(request: bytes, sent: list[bytes]) -> None:
    sid = request[0]
    for i, response in enumerate(sent):
        assert response, f"{request.hex()}: an empty response"
        if response[0] == 0x7F:
            assert len(response) == 3 and response[1] == sid, f"{request.hex()}: malformed negative {response.hex()}"
            assert response[2] != 0x78 or i < len(sent) - 1, f"{request.hex()}: response-pending without an answer"
        else:
            assert response[0] == (sid | 0x40), f"{request.hex()}: answered {response.hex()}"


def uds_requests(sids: list[int]) -> st.SearchStrategy[bytes]:
    """Requests of the services a server knows (sub-functions, DIDs, routines, lengths near the
    edges) and plain random bytes."""
    known = st.tuples(st.sampled_from(sids), st.binary(max_size=24)).map(lambda t: bytes([t[0]]) + t[1])
    shaped = st.tuples(st.sampled_from(sids), st.integers(0, 255), st.sampled_from([0xF1, 0xFF, 0x02, 0x03, 0x00]),
                       st.integers(0, 255), st.binary(max_size=12)).map(lambda t: bytes(t[:4]) + t[4])
    return st.one_of(known, shaped, st.binary(min_size=1, max_size=64))


class EcuServer(Target):
    """UDS requests to the ECU simulator (every service, every session it can reach)."""

    name = "ecu-uds"

    def open(self, tmp: Path) -> None:
        from ecu_sim.services import SERVICES
        from ecu_sim.simulator import EcuSimulator
        from tests.conftest import ecu_entry, virtual_bus

        super().open(tmp)
        data = {"segments": {"pt": {"bus": virtual_bus()}},
                "ecus": {"bms": ecu_entry("bms", 0x7E1, 0x7E9, erase_ms=0, check_ms=0, reset_ms=0, max_block_length=66,
                                          lockout_ms=0) | {"memory": {"address": 0x1000, "size": 0x4000}}}}
        self.sim = EcuSimulator(parse_vehicle_config(data, "fuzz"), ["bms"], str(tmp / "ecu"))
        self.sim.start()
        self.server = self.sim.servers["bms"]
        self.server.pending_interval = 0.01
        self.before = self.server.state.banks.active_info
        self.strategy = st.lists(st.one_of(
            st.sampled_from([b"\x10\x03", b"\x10\x02", b"\x10\x01", b"\x27\x01", b"\x31\x01\xff\x00", b"\x34\x00\x44"
                             b"\x00\x00\x10\x00\x00\x00\x00\x10", b"\x36\x01\x00", b"\x37", b"\x11\x01"]),
            uds_requests(sorted(SERVICES))), min_size=1, max_size=8)

    def feed(self, example: list[bytes]) -> None:
        with internal_errors() as errors:
            for request in example:
                for functional in (False, True):
                    stack = _Collecting()
                    self.server._handle(stack, request, functional)
                    self.server._silent_until = 0.0  # a reset's silence ends at once here
                    _well_formed(request, stack.sent)
        _no_internal_error(errors, example)

    def close(self) -> None:
        try:
            banks = self.server.state.banks
            assert banks.active_info.version == self.before.version, "random requests changed the running software"
            assert banks.active_info.sha256 == self.before.sha256
        finally:
            self.sim.stop()


class DeployServer(Target):
    """UDS requests to the gateway's deploy server: nothing is written outside its package and
    results directories, whatever file names and modes a request carries."""

    name = "deploy-uds"

    def open(self, tmp: Path) -> None:
        from gateway.daemon import GatewayDaemon
        from tests.conftest import virtual_bus

        super().open(tmp)
        (tmp / "outside").mkdir()
        (tmp / "outside" / "keep.bin").write_bytes(b"stored before")
        data = {"segments": {"bb": {"bus": virtual_bus()}},
                "deploy": {"segment": "bb", "package_dir": str(tmp / "gw" / "packages")},
                "gateway": {"results_dir": str(tmp / "gw" / "results")}}
        self.daemon = GatewayDaemon(parse_vehicle_config(data, "fuzz"))
        self.daemon.start()
        assert self.daemon.server is not None
        self.server = self.daemon.server
        names = st.sampled_from(["../outside/keep.bin", "/etc/passwd", "a/../../b", "ok.bin", "", ".", "..", "x" * 300,
                                 "nul\x00.bin", "dir/", "../../../../tmp/evil"])
        file_transfer = st.tuples(st.integers(0, 7), names | st.text(max_size=20), st.integers(0, 0x11),
                                  st.integers(0, 4), st.integers(0, 2**32 - 1)).map(
            lambda t: bytes([0x38, t[0]]) + len(t[1].encode()).to_bytes(2, "big") + t[1].encode()
            + bytes([t[2], t[3]]) + t[4].to_bytes(4, "big")[:t[3]] * 2)
        routine = st.tuples(st.sampled_from([0x0301, 0x0302, 0x0303, 0x0304]), st.binary(max_size=40)).map(
            lambda t: b"\x31\x01" + t[0].to_bytes(2, "big") + t[1])
        self.strategy = st.lists(st.one_of(file_transfer, routine, uds_requests(sorted(self.server.services))),
                                 min_size=1, max_size=6)

    def feed(self, example: list[bytes]) -> None:
        with internal_errors() as errors:
            for request in [b"\x10\x03", *example]:
                stack = _Collecting()
                self.server._handle(stack, request, False)
                _well_formed(request, stack.sent)
        _no_internal_error(errors, example)
        for path in self.tmp.rglob("*"):
            rel = path.relative_to(self.tmp).parts
            assert rel[0] == "gw" or path.name == "keep.bin" or path == self.tmp / "outside", f"{example!r} wrote {path}"
        assert (self.tmp / "outside" / "keep.bin").read_bytes() == b"stored before"

    def close(self) -> None:
        self.daemon.stop()


class SecuredDeployServer(Target):
    """Requests to a deploy server that authenticates them, after a real SecurityAccess: genuine
    authenticated requests, the same with a bit flipped or a byte cut, replays, forged trailers
    and random bytes. Only a request that carries a valid MAC over its own bytes and a fresh
    counter is ever handled (anything else answers 0x3A and changes nothing on disk)."""

    name = "deploy-secoc"

    def open(self, tmp: Path) -> None:
        from gateway.daemon import GatewayDaemon
        from tests.conftest import virtual_bus

        super().open(tmp)
        data = {"segments": {"bb": {"bus": virtual_bus()}},
                "deploy": {"segment": "bb", "package_dir": str(tmp / "gw" / "packages"), "security_secret": "fuzz"},
                "gateway": {"results_dir": str(tmp / "gw" / "results")}}
        self.daemon = GatewayDaemon(parse_vehicle_config(data, "fuzz"))
        self.daemon.start()
        assert self.daemon.server is not None
        self.server = self.daemon.server
        (tmp / "gw" / "packages" / "keep.bin").write_bytes(b"stored before")
        delete = b"\x38\x02\x00\x08keep.bin"
        body = st.sampled_from([delete, b"\x31\x03\x03\x01", b"\x31\x01\x03\x04c-1\x00x", b"\x37" + bytes(32)])
        how = st.sampled_from(["genuine", "flip", "cut", "replay", "stale", "plain", "random"])
        self.strategy = st.lists(st.tuples(body, how, st.integers(0, 10_000), st.binary(max_size=30)), min_size=1, max_size=6)

    def _ask(self, request: bytes) -> list[bytes]:
        stack = _Collecting()
        self.server._handle(stack, request, False)
        _well_formed(request, stack.sent)
        return stack.sent

    def feed(self, example: list[tuple[bytes, str, int, bytes]]) -> None:
        from agent.protocol.link import deploy_key, secure_request, session_key

        with internal_errors() as errors:
            self._ask(b"\x10\x03")
            seed = self._ask(b"\x27\x01")[-1][2:]
            assert self._ask(b"\x27\x02" + deploy_key("fuzz", seed))[-1] == b"\x67\x02"
            key, freshness = session_key("fuzz", seed), 0
            sent: list[bytes] = []
            for body, how, n, junk in example:
                genuine = body[:1] != b"\x38" or how != "genuine"  # never the genuine delete: keep.bin must stay
                freshness += 1
                request = secure_request(key, freshness, body if genuine else b"\x31\x03\x03\x01")
                if how == "flip":
                    request = bytearray(request)
                    request[n % len(request)] ^= 1 << (n % 8)
                    request = bytes(request)
                elif how == "cut":
                    request = request[: n % (len(request) - 1) + 1]  # at least one byte short
                elif how in ("replay", "stale"):
                    request = sent[n % len(sent)] if sent and how == "replay" else secure_request(key, 0, body)
                elif how == "plain":
                    request = body + junk[:12]
                elif how == "random":
                    request = body[:1] + junk
                answer = self._ask(request)[-1]
                if how == "genuine":
                    assert answer[:1] != b"\x7f" or answer[2] != 0x3A, f"{request.hex()}: a genuine request refused"
                    sent.append(request)
                else:  # refused; for its authenticator, unless the SID or sub-function itself was broken
                    assert answer[:1] == b"\x7f", f"{how} {request.hex()} was handled: {answer.hex()}"
                    assert answer[2] == 0x3A or request[:2] != body[:2] or len(request) < 4, f"{how} {request.hex()}"
        _no_internal_error(errors, example)
        assert (self.tmp / "gw" / "packages" / "keep.bin").read_bytes() == b"stored before"

    def close(self) -> None:
        self.daemon.stop()


# ---- raw CAN frames into a live exchange --------------------------------------------------------------------------
class CanFrames(Target):
    """Raw CAN frames (any id among the exchange's, any length, any bytes) while a UDS link
    reads a DID from a live ECU simulator: the request is answered or fails cleanly, and the
    next one is answered: the receive path survives every frame."""

    name = "can-frames"

    def open(self, tmp: Path) -> None:
        from agent.adapters.canbus import Segment
        from agent.adapters.uds_client import RawCodec, UdsLink
        from agent.core.trace import TraceHeader, TraceRecorder
        from agent.protocol.ecu import DID
        from ecu_sim.simulator import EcuSimulator
        from tests.conftest import ecu_entry, virtual_bus

        super().open(tmp)
        data = {"segments": {"pt": {"bus": virtual_bus()}}, "ecus": {"bms": ecu_entry("bms", 0x7E1, 0x7E9)}}
        config = parse_vehicle_config(data, "fuzz")
        self.sim = EcuSimulator(config, ["bms"], str(tmp / "ecu"))
        self.sim.start()
        self.segment = Segment(config.segments["pt"])
        self.noise = can.Bus(**config.segments["pt"].bus)
        self.recorder = TraceRecorder(TraceHeader("flash", "GW", "bms", "bms", 0x7E1, 0x7E9, 0x7DF, time.time()))
        self.link = UdsLink(self.segment, 0x7E1, 0x7E9, name="bms", recorder=self.recorder, p2=0.15, p2_star=0.3,
                            dids={DID.SOFTWARE_VERSION: RawCodec()})
        frame = st.tuples(st.sampled_from([0x7E1, 0x7E9, 0x7DF, 0x7E9, 0x123]), st.binary(max_size=8),
                          st.sampled_from([0x0, 0x1, 0x2, 0x3, None]))
        self.strategy = st.lists(frame.map(lambda t: (t[0], bytes([t[2] << 4 | (t[1][0] & 0xF if t[1] else 0)]) + t[1][1:]
                                                    if t[2] is not None and t[1] else t[1])), min_size=1, max_size=12)

    def _read(self) -> bytes | None:
        from agent.protocol.ecu import DID

        assert self.link.client.config["data_identifiers"], "the link reads a DID"
        try:
            return bytes(self.link.client.read_data_by_identifier(DID.SOFTWARE_VERSION).service_data.values[DID.SOFTWARE_VERSION])
        except Exception as exc:  # noqa: BLE001 - any clean failure of the request is fine; the next one must work
            assert not isinstance(exc, (IndexError, KeyError, AttributeError, TypeError)), f"a {type(exc).__name__}: {exc}"
            return None

    def feed(self, example: list[tuple[int, bytes]]) -> None:
        with internal_errors() as errors:
            reader = threading.Thread(target=self._read)
            reader.start()
            for can_id, data in example:
                self.noise.send(can.Message(arbitration_id=can_id, data=data, is_extended_id=False))
            reader.join(10)
            assert not reader.is_alive(), "a request did not end"
            time.sleep(0.35)  # what the noise started times out
            self.link.connection.empty_rxqueue()
            assert self._read() == b"1.0.0", f"{example!r}: the link does not work after the noise"
        _no_internal_error(errors, example)

    def close(self) -> None:
        self.link.close()
        self.noise.shutdown()
        self.segment.shutdown()
        self.sim.stop()


# ---- MQTT payloads ------------------------------------------------------------------------------------------------
class _Cloud:
    """The TBOX's cloud port, in memory: the reports it was asked to send."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, dict[str, Any], str | None]] = []

    def report(self, kind: str, body: dict[str, Any], msg_id: str | None = None) -> str:
        self.reports.append((kind, body, msg_id))
        return msg_id or ""

    def report_trace(self, trace_id: str, trace: bytes, meta: dict[str, Any]) -> list[str]:
        return [trace_id]


def _campaign_doc(key: Ed25519PrivateKey) -> dict[str, Any]:
    return {"format": "vota-campaign", "version": 1, "campaign_id": "c-fuzz", "vin": VIN, "install": "immediate",
            "issued": "2026-11-01T00:00:00Z", "expires": "2026-12-31T00:00:00Z", "activation": "atomic",
            "preconditions": {"min_soc": 40, "charging": "forbidden", "window_s": 3600},
            "rxswin": {"R10": {"before": "R10-A", "after": "R10-B"}},
            "information": {"en": {"purpose": "p", "changes": ["a", "b"], "after_failure": "f"}, "de": {"purpose": "q"}},
            "packages": [
                {"name": "vcu-2.0.0.bin", "ecu": "vcu", "version": "2.0.0", "url": "http://127.0.0.1:1/vcu.bin",
                 "size": 3000, "sha256": hashlib.sha256(b"v" * 3000).hexdigest(), "order": 1},
                {"name": "bms-2.0.0.bin", "ecu": "bms", "version": "2.0.0", "url": "http://127.0.0.1:1/bms.bin",
                 "size": 10, "sha256": hashlib.sha256(b"b" * 10).hexdigest(), "order": 2, "requires": {"vcu": "2.0.0"}}]}


class TboxInbound(Target):
    """MQTT payloads on a vehicle's campaign and command topics, into the TBOX's inbound
    handling: each junk payload is rejected with a reason (an event to the cloud), nothing of it
    is stored, and the campaign stored before is unchanged."""

    name = "tbox-inbound"

    def open(self, tmp: Path) -> None:
        from tbox.inbound import Inbound
        from tbox.runner import CampaignRunner

        super().open(tmp)
        key = Ed25519PrivateKey.generate()
        self.key = key
        trusted = {key_id(key.public_key()): key.public_key()}
        self.cloud = _Cloud()
        self.runner = CampaignRunner(TboxConfig(VIN, state_dir=str(tmp / "tbox"), trusted_keys=("k",)), {"vcu", "bms"},
                                     self.cloud, None, trusted, now=lambda: NOW)  # type: ignore[arg-type]
        self.submitted: list[dict[str, Any]] = []
        self.inbound = Inbound(VIN, self.runner, self.submitted.append, lambda: None, lambda: None)
        self.valid = sign_campaign(_campaign_doc(key), key)
        self.inbound.on_message("campaign", self.valid)  # stored: the one that must not change
        self.stored = snapshot(tmp / "tbox")
        assert len(self.stored) == 2, self.stored.keys()
        envelope = json.loads(self.valid)
        command = {"command": "confirm_install", "campaign_id": "c-fuzz", "vin": VIN}
        payloads = st.one_of(st.binary(max_size=200), mutated(self.valid), json_mutations(envelope),
                             json_mutations(command), json_values().map(lambda v: json.dumps(v).encode()),
                             st.integers(1, 20000).map(lambda n: b"[" * n + b"]" * n))
        self.strategy = st.tuples(st.sampled_from(["campaign", "command"]), payloads)

    def feed(self, example: tuple[str, bytes]) -> None:
        kind, payload = example
        known = kind == "campaign" and (self.inbound.campaigns_dir / hashlib.sha256(payload).hexdigest()[:24]).exists()
        before = len(self.cloud.reports), len(self.submitted), self.inbound._commands.qsize()
        with internal_errors() as errors:
            self.inbound.on_message(kind, payload)
        _no_internal_error(errors, example)
        after = len(self.cloud.reports), len(self.submitted), self.inbound._commands.qsize()
        now_stored = snapshot(self.tmp / "tbox")
        if kind == "campaign" and payload != self.valid and now_stored != self.stored:
            # only a campaign that verifies is kept (a mutation may still be valid JSON-wise: check it is)
            verify_campaign(payload, {key_id(self.key.public_key()): self.key.public_key()}, vin=VIN, now=NOW,
                            known_ecus={"vcu", "bms"})
            self.stored = now_stored
        assert all(now_stored.get(k) == v for k, v in self.stored.items()), "a stored campaign changed"
        if now_stored == self.stored and payload != self.valid:
            reasons = [body for kind_, body, _ in self.cloud.reports[before[0]:] if body.get("event") == "rejected"]
            taken = after[1] > before[1] or after[2] > before[2] or known  # known: a redelivery, stored once
            assert reasons or taken, f"{example!r}: neither taken nor rejected with a reason"
            assert all(r["reason"] and r["detail"] for r in reasons)


class Collector(Target):
    """MQTT messages on any topic into the stand-in cloud's collector: nothing stops it, nothing
    is written outside ``<store>/<vin>/``, what was stored is kept."""

    name = "collector"

    def open(self, tmp: Path) -> None:
        import paho.mqtt.client as mqtt

        from cloud_sim.collector import Collector as Impl

        super().open(tmp)
        self.mqtt = mqtt
        self.collector = Impl("mqtt://127.0.0.1:1", tmp / "store", diagnose=True)
        good = {"id": "m-1", "vin": VIN, "type": "events", "ts": "2026-11-22T12:00:00Z",
                "body": {"event": "finished", "campaign_id": "c-1", "outcome": "failed"}}
        self._deliver(f"vota/v1/{VIN}/events", json.dumps(good).encode())
        self.stored = snapshot(tmp / "store")
        assert self.stored
        topics = st.one_of(st.sampled_from([f"vota/v1/{VIN}/{k}" for k in ("events", "results", "traces", "status",
                                                                              "inventory")]),
                           st.sampled_from(["vota/v1/../status", "vota/v1/..", "vota/v1/x/..", "vota/v1//events",
                                            "vota/v1/%s/../../x" % VIN, "a/b", "", "vota/v1/" + "v" * 300 + "/events"]),
                           st.text(max_size=40))
        trace = {"id": "t-1", "vin": VIN, "type": "traces", "ts": "x",
                 "body": {"trace_id": "c-1.flash.vcu", "part": 0, "parts": 1, "data": "H4sIAAAAAAAC/wMAAAAAAAAAAAA="}}
        content = {"id": "e-1", "vin": VIN, "type": "events", "ts": "x",
                   "body": {"event": "content", "bundle_id": "b-1", "bundle_version": 1, "item": "x", "status": "done"}}
        payloads = st.one_of(st.binary(max_size=200), json_mutations(good), json_mutations(trace), json_mutations(content),
                             json_values().map(lambda v: json.dumps(v).encode()),
                             st.integers(1, 20000).map(lambda n: b"[" * n + b"]" * n))
        self.strategy = st.tuples(topics, payloads)

    def _deliver(self, topic: str, payload: bytes) -> None:
        msg = self.mqtt.MQTTMessage(topic=topic.encode("utf-8", "surrogatepass"))
        msg.payload = payload
        self.collector._on_message(self.collector.client, None, msg)

    def feed(self, example: tuple[str, bytes]) -> None:
        with internal_errors() as errors:
            self._deliver(*example)
        _no_internal_error(errors, example)
        for path in self.tmp.rglob("*"):
            parts = path.relative_to(self.tmp).parts
            assert parts[0] == "store", f"{example!r} wrote {path}"
            if len(parts) > 2:
                assert parts[1] not in (".", "..") and path.resolve().is_relative_to((self.tmp / "store").resolve())
        now_stored = snapshot(self.tmp / "store")
        assert all(now_stored.get(k) == v for k, v in self.stored.items() if "/status.json" not in k and "/content/" not in k
                   and "/diagnosis/" not in k), f"{example!r}: a stored message changed"


# ---- verification and diagnosis -----------------------------------------------------------------------------------
class CampaignEnvelopes(Target):
    """Campaign envelopes into verification: accepted only when signed and valid, otherwise
    refused with a reason code; never another exception."""

    name = "campaign-verify"

    def open(self, tmp: Path) -> None:
        super().open(tmp)
        self.key = Ed25519PrivateKey.generate()
        self.trusted = {key_id(self.key.public_key()): self.key.public_key()}
        doc = _campaign_doc(self.key)
        valid = sign_campaign(doc, self.key)
        resigned = json_mutations(doc).map(lambda b: _resign(b, self.key))  # signed, but the content is wrong
        self.strategy = st.one_of(mutated(valid), json_mutations(json.loads(valid)), resigned, st.binary(max_size=300))

    def feed(self, example: bytes) -> None:
        try:
            verify_campaign(example, self.trusted, vin=VIN, now=NOW, known_ecus={"vcu", "bms"},
                            installed={"vcu": "1.0.0", "bms": "1.0.0"})
        except CampaignRejected as exc:
            assert exc.reason and str(exc), "a refusal without a reason"


def _resign(body: bytes, key: Ed25519PrivateKey) -> bytes:
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    try:
        return sign_campaign(doc, key)
    except (VotaError, TypeError, ValueError, AttributeError, KeyError):
        return body  # what the signing tool itself refuses


class ContentBundles(Target):
    """Signed content bundles (tar archives) into verification: a valid one passes, any change
    is refused with a reason code."""

    name = "bundle-verify"

    def open(self, tmp: Path) -> None:
        super().open(tmp)
        self.key = Ed25519PrivateKey.generate()
        self.trusted = {key_id(self.key.public_key()): self.key.public_key()}
        spec = {"bundle_id": "b-fuzz", "bundle_version": 2, "owner": "o", "title": "t",
                "config": {"mode": "any", "start": "2026-11-01T00:00:00", "expiry": "2026-12-31T00:00:00", "tz": "UTC"},
                "items": [{"id": "pic", "class": "resource", "target": "dlp", "policy": "auto", "encrypt": True},
                          {"id": "app", "class": "application", "target": "com.x", "policy": "manual"}]}
        self.valid = sign_bundle(build_bundle(spec, {"pic": b"p" * 700, "app": b"a" * 300},
                                              X25519PrivateKey.generate().public_key(), VIN), self.key)
        verify_bundle(self.valid, self.trusted, vin=VIN, now=NOW)
        self.strategy = st.one_of(mutated(self.valid), st.binary(max_size=2000))

    def feed(self, example: bytes) -> None:
        try:
            verify_bundle(example, self.trusted, vin=VIN, now=NOW, max_size=1 << 20)
        except BundleRejected as exc:
            assert exc.reason and str(exc), "a refusal without a reason"
        else:
            assert example == self.valid or _same_members(example, self.valid), "a changed bundle verified"


def _same_members(a: bytes, b: bytes) -> bool:
    from agent.core.content import read_archive

    return read_archive(a, 1 << 20) == read_archive(b, 1 << 20)


_TRACE_HEAD = {"format": "vota-trace", "version": 1, "stage": "flash", "client": "GW", "server": "bms", "packet": "bms",
               "request_id": 0x7E1, "response_id": 0x7E9, "functional_id": 0x7DF, "started": 0.0}
_TRACE_ROWS = [[0, "1003", 2, 1, "5003003201f4"], [2, "1002", 2, 1, "5002003201f4"], [4, "2701", 2, 1, "670112345678"],
               [6, "2702", 6, 1, "6702"], [8, "3101ff00", 13, 500, "7101ff0000", {"pend": [3]}],
               [520, "3400440800000000003000", 11, 2, "74200fff"], [530, "3601", 4095, 30, "7601"],
               [570, "3602", 4095, 30, "7f3673"], [650, "37", 1, 2, None]]


class Traces(Target):
    """Header-only traces (truncated, mutated, any JSON lines) into the diagnosis: a verdict, or
    one error naming the problem."""

    name = "diagnosis"

    def open(self, tmp: Path) -> None:
        from agent.adapters.diagnosis_files import load_rules

        super().open(tmp)
        self.rules = load_rules()
        lines = [_TRACE_HEAD, *_TRACE_ROWS, {"end": True, "exchanges": len(_TRACE_ROWS), "result": "failed"}]
        valid = "\n".join(json.dumps(line) for line in lines).encode()
        rows = st.lists(st.one_of(json_values(), st.tuples(st.integers(-5, 10**6), st.text(max_size=12), st.integers(-1, 5000),
                                                            st.integers(-1, 600), st.text(max_size=12)).map(list)),
                        max_size=8).map(lambda rs: "\n".join(json.dumps(r) for r in [_TRACE_HEAD, *rs]).encode())
        nested = st.integers(1, 20000).map(lambda n: json.dumps(_TRACE_HEAD).encode() + b"\n" + b"[" * n + b"]" * n)
        # a link over DoIP: what its channel says of its own failure (x.doip), any values at all
        said = st.one_of(json_values(), st.fixed_dictionaries({}, optional={
            k: st.one_of(json_values(), st.integers(0, 0x110), st.sampled_from(["alive_check", "peer", "client",
                                                                                "unreachable", "tls", "ack"]))
            for k in ("act", "nack", "gnack", "closed", "conn", "timeout")}))
        doip_rows = st.lists(st.tuples(st.integers(0, 10**5), st.sampled_from(["1003", "3601", "37", "2701", "3801"]),
                                       st.integers(1, 4095), st.none(), st.none(),
                                       st.fixed_dictionaries({"doip": said}, optional={"sent": st.booleans()})).map(list),
                             min_size=1, max_size=6)
        doip = doip_rows.map(lambda rs: "\n".join(json.dumps(r) for r in [{**_TRACE_HEAD, "transport": "doip"}, *rs]).encode())
        self.strategy = st.one_of(mutated(valid), rows, nested, doip, st.binary(max_size=300))

    def feed(self, example: bytes) -> None:
        from agent.core.diagnosis import StageInput, diagnose, render_markdown
        from agent.errors import TraceFormatError

        try:
            trace = parse_trace(example.decode("utf-8"), "fuzz.trace.jsonl")
        except (TraceFormatError, UnicodeDecodeError) as exc:
            assert str(exc)
            return
        result = {"ecu": "bms", "result": "failed", "failed_step": "transfer_data", "reason": "x"}
        verdict = diagnose([StageInput("flash", "bms", result, trace, None)], self.rules, "all", "c-fuzz")
        assert render_markdown(verdict)


class KeyLists(Target):
    """Key list envelopes into the key store: taken only when the root signed a newer valid list,
    otherwise refused with a reason code; the lists already stored never change."""

    name = "key-lists"

    def open(self, tmp: Path) -> None:
        from agent.adapters.keys import KeyStore
        from agent.core.roles import KeyList, Role, key_list_doc, sign_key_list

        super().open(tmp)
        self.root = Ed25519PrivateKey.generate()
        signer = Ed25519PrivateKey.generate()
        role = Role({key_id(self.root.public_key()): self.root.public_key()})
        self.store = KeyStore(tmp / "keys", KeyList(0, {"root": role, "campaign": role, "content": role}))
        doc = key_list_doc(1, {"root": ([self.root.public_key()], 1), "campaign": ([signer.public_key()], 1),
                               "content": ([signer.public_key()], 1)})
        valid = sign_key_list(doc, [self.root])
        self.store.accept(valid)
        self.stored = snapshot(tmp / "keys")
        doc["version"] = 2

        def resign(body: bytes) -> bytes:
            try:
                return sign_key_list(json.loads(body), [self.root])
            except (VotaError, TypeError, ValueError, AttributeError, KeyError):
                return body

        self.strategy = st.one_of(mutated(valid), json_mutations(json.loads(valid)), json_mutations(doc).map(resign),
                                  st.binary(max_size=300))

    def feed(self, example: bytes) -> None:
        from agent.core.roles import KeysRejected

        before = self.store.current.version
        try:
            taken = self.store.accept(example)
            assert taken.version > before or example in self.store.chain(), "taken without a newer version"
        except KeysRejected as exc:
            assert exc.reason in KeysRejected.REASONS and str(exc)
            assert self.store.current.version == before
        now = snapshot(self.tmp / "keys")
        assert all(now.get(k) == v for k, v in self.stored.items()), f"{example!r}: a stored key list changed"
        self.stored = now


class SignedReports(Target):
    """Reports into a collector that knows the vehicle's report key: stored only when the
    vehicle signed exactly that report; nothing stops it; what was stored is kept."""

    name = "signed-reports"

    def open(self, tmp: Path) -> None:
        from agent.core.signed_report import check_report, sign_report
        from cloud_sim.collector import Collector as Impl

        super().open(tmp)
        key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        self.check = check_report
        self.keys = {key_id(key.public_key()): key.public_key()}
        self.collector = Impl("mqtt://127.0.0.1:1", tmp / "store", diagnose=False, report_keys={VIN: self.keys},
                              require_signed=True)
        good = {"id": "m-1", "vin": VIN, "type": "events", "ts": 1.5,
                "body": {"event": "finished", "campaign_id": "c-1", "outcome": "failed"}}
        self._deliver("events", json.dumps(sign_report(good, key)).encode())
        self.stored = snapshot(tmp / "store")
        assert self.stored

        def resign(body: bytes, signer: Ed25519PrivateKey) -> bytes:
            try:
                doc = json.loads(body)
                return json.dumps(sign_report(doc, signer)).encode() if isinstance(doc, dict) else body
            except (TypeError, ValueError, AttributeError):
                return body

        signed = sign_report({**good, "id": "m-2"}, key)
        self.strategy = st.tuples(
            st.sampled_from(["events", "results", "traces", "inventory"]),
            st.one_of(json_mutations(signed), json_mutations(good).map(lambda b: resign(b, key)),
                      json_mutations(good).map(lambda b: resign(b, other)), mutated(json.dumps(signed).encode()),
                      json_values().map(lambda v: json.dumps(v).encode())))

    def _deliver(self, kind: str, payload: bytes) -> None:
        import paho.mqtt.client as mqtt

        msg = mqtt.MQTTMessage(topic=f"vota/v1/{VIN}/{kind}".encode())
        msg.payload = payload
        self.collector._on_message(self.collector.client, None, msg)

    def feed(self, example: tuple[str, bytes]) -> None:
        kind, payload = example
        count = len(self.collector.messages)
        with internal_errors() as errors:
            self._deliver(kind, payload)
        _no_internal_error(errors, example)
        if len(self.collector.messages) > count:  # stored: then the vehicle signed exactly this report
            assert self.check(self.collector.messages[-1], VIN, kind, self.keys) is None, f"{example!r} stored unsigned"
        now = snapshot(self.tmp / "store")
        assert all(now.get(k) == v for k, v in self.stored.items()), f"{example!r}: a stored message changed"


class DeltaPatches(Target):
    """Delta patches, damaged, into the applier an ECU runs while a patch arrives, in blocks of
    any size: each block gives image bytes or a DecompressError, never another exception, never
    a hang; what it makes is never longer than announced; the base image is never written."""

    name = "delta-patches"

    def open(self, tmp: Path) -> None:
        from agent.protocol.delta import make_delta

        super().open(tmp)
        self.base = bytes(range(256)) * 24 + b"firmware" * 100
        new = self.base[:2000] + b"inserted" + self.base[2000:5000] + bytes(300)
        (tmp / "base.bin").write_bytes(self.base)
        valid = make_delta(self.base, new)
        self.strategy = st.tuples(st.one_of(mutated(valid), st.binary(max_size=400), st.just(valid)),
                                  st.lists(st.integers(1, 600), min_size=1, max_size=8))

    def feed(self, example: tuple[bytes, list[int]]) -> None:
        from agent.protocol.compression import DecompressError
        from ecu_sim.delta import DeltaApplier

        patch, sizes = example
        applier = DeltaApplier(self.tmp / "base.bin")
        made, at, i = 0, 0, 0
        try:
            while at < len(patch):
                block = patch[at : at + sizes[i % len(sizes)]]
                at, i = at + len(block), i + 1
                made += len(applier.feed(block, 1 << 20))
                assert made <= (1 << 20) + 1
        except DecompressError as exc:
            assert str(exc).startswith("delta: ")
        finally:
            applier.close()
        assert not applier._thread.is_alive()  # noqa: SLF001 - no applier left waiting
        assert (self.tmp / "base.bin").read_bytes() == self.base


class InstallManifests(Target):
    """Install manifests (what the TBOX names in routine 0x0301) into the gateway's parsing, the
    preconditions it is handed with them included: a manifest and a gate it can use, or a reason;
    never an exception, and a gate taken is one the checks can run on."""

    name = "install-manifests"

    def open(self, tmp: Path) -> None:
        from agent.core.config import PreconditionsConfig
        from agent.core.preconditions import Gate
        from agent.protocol.link import InstallJob, InstallManifest, encode_manifest

        super().open(tmp)
        gate = Gate(PreconditionsConfig(ecu="bcm", min_soc=30, charging="forbidden", recheck_s=2.0), 180.0, 1.8e9)
        valid = encode_manifest(InstallManifest("c-fuzz", (InstallJob("vcu", "vcu-2.bin", "2.0.0", 1, "vcu-2.delta"),
                                                           InstallJob("bms", "bms-2.bin", "2.0.0")), "atomic",
                                                {"campaign": "AAAA"}, False, gate.to_json()))
        self.strategy = st.one_of(mutated(valid), json_mutations(json.loads(valid)), st.binary(max_size=300))

    def feed(self, example: bytes) -> None:
        from agent.core.preconditions import parse_gate
        from agent.errors import InstallRefused
        from agent.protocol.link import InstallManifest, parse_manifest

        try:
            manifest = parse_manifest(example)
        except InstallRefused as refused:
            assert refused.detail, "a refusal without a reason"
            return
        assert isinstance(manifest, InstallManifest) and manifest.jobs
        if manifest.preconditions is None:
            return
        try:
            gate = parse_gate(manifest.preconditions, manifest.campaign_id)
        except InstallRefused as refused:
            assert refused.detail.startswith("preconditions") and refused.campaign_id == manifest.campaign_id, refused
            return
        assert gate.conditions.recheck_s > 0 and gate.conditions.ecu
        gate.unmet({"soc": 50, "power_mode": "off", "gear": "P", "speed_kmh": 0, "battery_mv": 12000, "charging": "no"})
        gate.unmet({})
        json.dumps(gate.to_json(), allow_nan=False)


class ImageFiles(Target):
    """ECU software files (Intel HEX, S-record, VBF, anything) into the reader the gateway and
    ``vota flash`` use before anything is erased: segments to program, or one ImageError naming
    the file; never another exception."""

    name = "image-files"

    def open(self, tmp: Path) -> None:
        import bincopy

        from agent.protocol.images import write_vbf

        super().open(tmp)
        segments = [(0x8000, bytes(range(256)) * 3), (0x9000, b"\x55" * 300)]
        f = bincopy.BinFile()
        for address, data in segments:
            f.add_binary(data, address=address)
        seeds = [write_vbf(segments, "P1"), f.as_ihex().encode(), f.as_srec().encode()]
        self.strategy = st.one_of(*(mutated(x) for x in seeds), st.binary(max_size=400))

    def feed(self, example: bytes) -> None:
        from agent.protocol.images import ImageError, read_image

        try:
            image = read_image(example, "fuzz.img")
        except ImageError as exc:
            assert str(exc).startswith("fuzz.img: "), exc
            return
        assert image.format in ("binary", "ihex", "srec", "vbf")
        assert all(isinstance(a, int) and a >= 0 and isinstance(d, bytes) for a, d in image.segments)


class FlashProfiles(Target):
    """Flash profiles (a foreign bootloader's, one field at a time replaced or removed) into the
    configuration parser: a configuration whose every step can build its request, or one
    ConfigError naming a key; never another exception."""

    name = "flash-profiles"

    def open(self, tmp: Path) -> None:
        from tests.test_foreign_ecu import ACME_PROFILE

        super().open(tmp)
        self.strategy = json_mutations({"flash_profiles": {"acme": ACME_PROFILE}})

    def feed(self, example: bytes) -> None:
        from agent.errors import ConfigError

        doc = json.loads(example)
        doc.update(segments={"pt": {"bus": {"interface": "virtual"}}},
                   ecus={"e": {"segment": "pt", "request_id": 1, "response_id": 2, "profile": "acme"}})
        try:
            config = parse_vehicle_config(doc, "fuzz.yaml")
        except ConfigError as exc:
            assert str(exc).startswith("fuzz.yaml"), exc
            return
        profile = config.ecu("e").flash_profile
        ctx = profile.context(version="1.0", address=0x10, size=0x20, block=1, data=b"x", check=b"\x00\x01")
        for step in profile.steps():
            assert step.payload(ctx)[:1] == bytes((step.service,))


class CloudAcks(Target):
    """Payloads on a vehicle's ``ack`` topic into its cloud link: a report leaves the outbox only
    when a well-formed acknowledgement names it; nothing else removes one, nothing raises."""

    name = "cloud-acks"

    def open(self, tmp: Path) -> None:
        from agent.adapters.cloud_link import CloudLink
        from agent.core.config import CloudConfig

        super().open(tmp)
        self.link = CloudLink(CloudConfig(outbox=str(tmp / "outbox.db")), VIN)  # not started: no broker needed
        self.ids = [f"m-{n}" for n in range(200)]
        for msg_id in self.ids:
            self.link.report("events", {"event": "tick"}, msg_id=msg_id)
        ack = {"ids": ["m-0"]}
        self.strategy = st.one_of(st.binary(max_size=200), json_mutations(ack), json_values().map(lambda v: json.dumps(v).encode()),
                                  st.lists(st.sampled_from(self.ids + ["other"]), max_size=3).map(
                                      lambda ids: json.dumps({"ids": ids}).encode()))

    def feed(self, example: bytes) -> None:
        before = {m.id for m in self.link.outbox.pending(limit=1000)}
        with internal_errors() as errors:
            self.link._cloud_ack(example)
        _no_internal_error(errors, example)
        after = {m.id for m in self.link.outbox.pending(limit=1000)}
        gone = before - after
        if gone:
            doc = json.loads(example)
            assert isinstance(doc, dict) and gone <= set(doc["ids"]), f"{example!r} removed {sorted(gone)}"

    def close(self) -> None:
        self.link.outbox.close()
        super().close()


class HmiLines(Target):
    """Anything a client writes on the TBOX's HMI socket (tbox/hmi.py): each line answered, a
    consent only for an offered campaign, the socket serving the next client."""

    name = "hmi-socket"

    def open(self, tmp: Path) -> None:
        import socket
        import tempfile

        from tbox.hmi import HmiFeed, HmiSocket

        super().open(tmp)
        self.consents: list[tuple[str, bool]] = []
        self.feed_ = HmiFeed(_Cloud(), lambda cid: {"install": "confirm"})
        self.feed_.report("events", {"event": "state", "campaign_id": "c-1", "state": "verified"}, "c-1.s")
        self.stop = threading.Event()
        self.path = Path(tempfile.mkdtemp(prefix="vota-hmi-", dir="/tmp")) / "hmi.sock"
        server = HmiSocket(self.path, self.feed_, lambda cid, ok: self.consents.append((cid, ok)), self.stop)
        assert server.start()
        self.socket = socket
        line = st.one_of(st.binary(max_size=200), json_mutations({"consent": "c-1", "accept": True}),
                         st.builds(lambda v: json.dumps(v).encode(), json_values()))
        self.strategy = st.lists(line, min_size=1, max_size=4)

    def feed(self, example: list[bytes]) -> None:
        client = self.socket.socket(self.socket.AF_UNIX, self.socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(str(self.path))
        reader = client.makefile("rb")
        try:
            assert json.loads(reader.readline())["campaign_id"] == "c-1"  # the offered campaign, first
            for raw in example:
                client.sendall(raw.replace(b"\n", b" ") + b"\n")
                answer = json.loads(reader.readline())
                assert answer.get("ok") is True or answer.get("error"), answer
        finally:
            client.close()
        assert all(cid == "c-1" for cid, _ in self.consents), self.consents

    def close(self) -> None:
        self.stop.set()
        super().close()


class EvidencePacks(Target):
    """Evidence packs, damaged, into ``vota evidence --verify``'s check: intact only when untouched."""

    name = "evidence-packs"

    def open(self, tmp: Path) -> None:
        from agent.adapters.evidence_pack import write_pack
        from agent.adapters.update_log import UpdateLog

        super().open(tmp)
        self.key = Ed25519PrivateKey.generate()
        log = UpdateLog(tmp / "log.jsonl", self.key)
        log.append("events", "c-1.a", {"event": "state", "campaign_id": "c-1", "state": "received"})
        data = (tmp / "log.jsonl").read_bytes()
        write_pack(tmp / "pack.tar.gz", "c-1", VIN, {"update-log.jsonl": data, "campaign-log.jsonl": data,
                                                      "summary.json": b"{}"}, self.key)
        self.valid = (tmp / "pack.tar.gz").read_bytes()
        self.strategy = st.one_of(mutated(self.valid), st.binary(max_size=400))

    def feed(self, example: bytes) -> None:
        from agent.adapters.evidence_pack import verify_pack

        path = self.tmp / "fuzzed.tar.gz"
        path.write_bytes(example)
        found = verify_pack(path, self.key.public_key())
        assert found["ok"] or found["problems"], found
        if found["ok"]:  # intact: what it holds is what was signed (a gzip header's bytes may differ)
            from agent.adapters.evidence_pack import _read

            original = self.tmp / "pack.tar.gz"
            assert _read(path) == _read(original), "a changed pack passed"


class DoipStream(Target):
    """Anything a tester sends on a TCP connection to the gateway's DoIP entity (gateway/doip_entity.py):
    well-formed messages of every payload type to every address, headers with a wrong pattern, an
    unknown type, a length above the data or the limit, routing activation storms, cut at any byte.
    The entity answers or closes, logs no internal error, lets go of every ECU the connection took
    once it is closed, and serves the next tester."""

    name = "doip-stream"

    def open(self, tmp: Path) -> None:
        import random as _random
        import struct

        from agent.core.config import parse_vehicle_config
        from agent.protocol import doip
        from gateway.buses import Buses
        from gateway.doip_entity import DoipEntity
        from tests.conftest import virtual_bus

        super().open(tmp)
        ip = f"127.{_random.randint(1, 254)}.{_random.randint(0, 255)}.{_random.randint(1, 254)}"
        self.config = parse_vehicle_config({
            "segments": {"pt": {"bus": virtual_bus()}, "body": {"bus": virtual_bus()}},
            "gateway": {"results_dir": str(tmp / "gw"), "vin": VIN},
            "ecus": {"vcu": {"segment": "pt", "request_id": 0x7E0, "response_id": 0x7E8},
                     "bcm": {"segment": "body", "request_id": 0x740, "response_id": 0x748}},
            "doip": {"address": ip, "announce_to": False, "max_testers": 2, "hold_s": 0.2, "max_request": 4096},
        }, "fuzz.yaml")
        self.buses = Buses(self.config)
        self.entity = DoipEntity(self.config, self.buses)
        self.entity.start()
        self.doip, self.struct, self.ip = doip, struct, ip
        T = doip.PayloadType
        address = st.sampled_from([0x0E00, 0x0E01, 0x07E0, 0x0740, 0x1010, 0xE400, 0x0000, 0xFFFF])
        message = st.one_of(
            st.builds(lambda sa, kind, oem: doip.encode(T.ROUTING_ACTIVATION_REQUEST, struct.pack("!HB", sa, kind) + bytes(4)
                                                        + oem), address, st.sampled_from([0, 1, 0xE0, 0x42]),
                      st.sampled_from([b"", b"abcd", b"ab"])),
            st.builds(lambda sa, ta, data: doip.encode(T.DIAGNOSTIC_MESSAGE, struct.pack("!HH", sa, ta) + data),
                      address, address, st.binary(max_size=40)),
            st.builds(lambda kind, payload: doip.encode(kind, payload), st.sampled_from(list(T)), st.binary(max_size=20)),
            st.builds(lambda v, i, kind, length, data: struct.pack("!BBHL", v, i, kind, length) + data,
                      st.sampled_from([2, 3, 0xFF, 0x42]), st.sampled_from([0xFD, 0xFC, 0x00, 0xBD]),
                      st.integers(0, 0xFFFF), st.sampled_from([0, 1, 7, 11, 4096, 5000, 0xFFFFFFFF]), st.binary(max_size=12)),
            st.binary(max_size=30),
        )
        storm = st.integers(1, 30).map(lambda n: doip.encode(T.ROUTING_ACTIVATION_REQUEST,
                                                             struct.pack("!HB", 0x0E00, 0) + bytes(4)) * n)
        self.strategy = st.lists(st.one_of(message, storm), min_size=1, max_size=8)

    def feed(self, example: list[bytes]) -> None:
        import socket

        doip = self.doip
        with internal_errors() as errors:
            with socket.create_connection((self.ip, doip.TCP_PORT), timeout=2) as sock:
                for chunk in example:
                    try:
                        sock.sendall(chunk)
                    except OSError:
                        break  # the entity closed the connection: its right
            deadline = time.monotonic() + 10
            while (self.entity.testers() or any(self.buses.busy(n) for n in self.config.ecus)) \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
        _no_internal_error(errors, example)
        assert not self.entity.testers(), "a closed connection still has routing"
        assert not any(self.buses.busy(n) for n in self.config.ecus), "an ECU is still held after its tester left"
        with socket.create_connection((self.ip, doip.TCP_PORT), timeout=2) as sock:  # the next tester is served
            sock.sendall(doip.encode(doip.PayloadType.ROUTING_ACTIVATION_REQUEST, self.struct.pack("!HB", 0x0E05, 0) + bytes(4)))
            answer: list[Any] = []
            framer = doip.Framer(64)
            while not answer:
                answer = framer.feed(sock.recv(100))
            assert answer[0].payload[4] == doip.RoutingCode.SUCCESS, answer

    def close(self) -> None:
        self.entity.stop()
        self.buses.shutdown()
        super().close()


TARGETS: dict[str, Callable[[], Target]] = {t.name: t for t in (
    EcuServer, DeployServer, SecuredDeployServer, CanFrames, TboxInbound, Collector, CampaignEnvelopes, ContentBundles,
    Traces, KeyLists, SignedReports, DeltaPatches, InstallManifests, ImageFiles, FlashProfiles, CloudAcks, HmiLines,
    EvidencePacks, DoipStream)}
