"""Several collectors on one MQTT 5 shared subscription, storing into one store: every report
is stored exactly once, whatever collector gets it, when it arrives twice, and across a
collector killed and started again (cloud_sim/claims.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.adapters.cloud_link import trace_parts
from cloud_sim.claims import ReportClaims
from tests.conftest import Proc

pytestmark = pytest.mark.slow  # a broker and collector processes

VIN = "LVOTASHARE0000001"


def _collector(tmp: Path, broker: str, name: str) -> Proc:
    proc = Proc("cloud", "serve", "--broker", broker, "--store", str(tmp / "store"), "--packages", str(tmp / "pk"),
                "--http-port", "0", "--share", "cloud", "--collector-id", name, log=tmp / f"{name}-{time.monotonic_ns()}.log")
    return proc.wait_ready("ready")


def _publish(port: int, reports: list[tuple[str, dict]]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="a-vehicle", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for kind, doc in reports:
            client.publish(f"vota/v1/{VIN}/{kind}", json.dumps(doc), qos=1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def _stored(store: Path) -> list[str]:
    return [json.loads(p.read_text())["id"] for p in (store / VIN / "messages").rglob("*.json")]


def test_two_collectors_on_a_shared_subscription_store_every_report_once(tmp_path, mosquitto, procs):
    one = _collector(tmp_path, mosquitto.url, "collector-1")
    procs.append(one)
    procs.append(_collector(tmp_path, mosquitto.url, "collector-2"))
    events = [("events", {"id": f"r-{i:04d}", "body": {"event": "state", "state": "downloading", "n": i}}) for i in range(200)]
    kind, parts = trace_parts(os.urandom(3000) + b"a header-only trace" * 2000, 1500)
    trace = [("traces", {"id": f"t-{i}", "body": {"trace_id": "c1.flash.vcu", "encoding": kind, "part": i,
                                                   "parts": len(parts), "data": part}})
             for i, part in enumerate(parts)]
    assert len(trace) > 3
    _publish(mosquitto.port, events[:100] + trace)
    one.stop(sig_kill=True)  # killed: its durable session keeps what comes meanwhile
    _publish(mosquitto.port, events[100:] + events[:100] + trace)  # and every report once more
    procs.append(_collector(tmp_path, mosquitto.url, "collector-1"))
    store = tmp_path / "store"
    deadline = time.monotonic() + 30
    while len(set(_stored(store))) < len(events) + len(trace) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # anything stored twice would be there by now
    stored = _stored(store)
    assert sorted(stored) == sorted(d["id"] for _, d in events + trace), (len(stored), len(set(stored)))
    assert not list((store / VIN / "messages").rglob(".claim-*"))
    joined = (store / VIN / "traces" / "c1.flash.vcu.jsonl").read_bytes()
    assert joined.endswith(b"a header-only trace" * 2000)  # reassembled from parts stored by either collector


def test_a_report_claimed_but_not_placed_when_a_collector_died_is_placed_at_the_next_start(tmp_path):
    claims = ReportClaims(tmp_path)
    assert claims.store_once(VIN, "events", "r-1", {"id": "r-1"}) and not claims.store_once(VIN, "events", "r-1", {"id": "r-1"})
    folder = tmp_path / VIN / "messages" / "events"
    orphan = folder / ".claim-r-2.123.456"  # a collector killed between the claim and the rename
    orphan.write_text(json.dumps({"id": "r-2"}))
    os.link(orphan, tmp_path / VIN / "ids" / "r-2")
    stray = folder / ".claim-r-3.123.457"  # killed before its claim: not stored
    stray.write_text(json.dumps({"id": "r-3"}))
    old = time.time() - 120
    for f in (orphan, stray):
        os.utime(f, (old, old))
    assert claims.recover() == 1
    assert sorted(json.loads(p.read_text())["id"] for p in folder.glob("*.json")) == ["r-1", "r-2"]
    assert not list(folder.glob(".claim-*"))
    assert sorted(i for _, i in ReportClaims(tmp_path).stored_ids()) == ["r-1", "r-1", "r-2", "r-2"]  # claims + files
