"""Property-based fuzzing of every external input (hypothesis): UDS requests to the ECU
simulator and the deploy server, raw CAN frames into a live exchange, MQTT payloads into the
TBOX and the collector, campaign envelopes and content bundles into verification, traces into
the diagnosis. Each target checks, for every input: no exception escapes, nothing is logged
as an internal error, a reason is given, nothing already stored is lost or changed
(``tests/fuzz_targets.py``). Example counts are bounded here; ``benchmarks/fuzz.py`` runs the
same targets for as long as asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz_targets import TARGETS

pytestmark = pytest.mark.slow  # about a minute in all; the inner loop (-m "not slow") stays fast

EXAMPLES = {"ecu-uds": 300, "deploy-uds": 300, "can-frames": 25, "tbox-inbound": 300, "collector": 400,
            "campaign-verify": 400, "bundle-verify": 200, "diagnosis": 400, "key-lists": 200,
            "signed-reports": 300, "delta-patches": 300, "install-manifests": 400, "image-files": 400,
            "flash-profiles": 300, "cloud-acks": 300, "deploy-secoc": 200,
            "hmi-socket": 200, "evidence-packs": 300, "doip-stream": 200}


def run(name: str, tmp: Path, examples: int) -> None:
    target = TARGETS[name]()
    target.open(tmp)
    try:
        @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(target.strategy)
        def check(example):  # type: ignore[no-untyped-def]
            target.feed(example)

        check()
    finally:
        target.close()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_no_input_stops_a_component_or_changes_what_it_stored(name: str, tmp_path: Path) -> None:
    run(name, tmp_path, EXAMPLES[name])


def test_a_suppress_bit_flipped_on_an_authenticated_request_is_refused(tmp_path: Path) -> None:
    """Found by this fuzzer: the server takes the suppressPosRspMsgIndicationBit off a request
    before its handler sees it, and the authenticator was checked after that, so a request with
    that one bit flipped in transit was carried out (silently). Every bit as sent is checked now."""
    target = TARGETS["deploy-secoc"]()
    target.open(tmp_path)
    try:  # the cancel routine with its sub-function's top bit flipped: refused 0x3A, nothing done
        target.feed([(b"\x31\x01\x03\x04c-1\x00x", "flip", 3487, b"")])  # 21 bytes: byte 1, bit 7
    finally:
        target.close()
