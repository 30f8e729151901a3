"""An independent tester: scapy's own ISO-TP and UDS stacks (not can-isotp, not udsoncan)
against a running `vota ecu-sim` over python-can, exact bytes on the wire. What a HIL
engineer's tester would see: sessions, identification DIDs in one request, NRCs in ISO
14229-1's order, and a functional request answered in several frames whichever id the
tester sends its flow control from."""

from __future__ import annotations

from typing import Any, Iterator

import can
import pytest

from tests.conftest import Proc, ecu_entry, multicast_bus

pytestmark = pytest.mark.slow  # a separate simulator process

from scapy.config import conf  # noqa: E402  (scapy is a test dependency)

conf.contribs["CANSocket"] = {"use-python-can": True}  # python-can, so udp_multicast works as socketcan does
conf.contribs["ISOTP"] = {"use-can-isotp-kernel-module": False}

from scapy.contrib.automotive.uds import UDS  # noqa: E402
from scapy.contrib.cansocket_python_can import PythonCANSocket  # noqa: E402
from scapy.contrib.isotp import ISOTPSocket  # noqa: E402


@pytest.fixture
def ecu(tmp_path, write_config) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    bus = multicast_bus()
    config = write_config({"segments": {"pt": {"bus": bus}},
                           "ecus": {"bms": ecu_entry("bms", 0x7E1, 0x7E9, state_dir=str(tmp_path / "ecu"))}})
    sim = Proc("ecu-sim", "-c", str(config), log=tmp_path / "ecu.log")
    try:
        sim.wait_ready("ecu-sim ready")
        yield bus
    finally:
        sim.stop()
        assert "Traceback" not in sim.text(), sim.text()


def _ask(sock: ISOTPSocket, request: str) -> str | None:
    answer = sock.sr1(UDS(bytes.fromhex(request)), timeout=2, verbose=False)
    return None if answer is None else bytes(answer).hex()


def test_scapy_sees_iso_14229_behaviour(ecu: dict[str, Any]) -> None:
    bus = {k: v for k, v in ecu.items() if k != "fd"}
    can_sock = PythonCANSocket(**bus)
    try:
        with ISOTPSocket(can_sock, tx_id=0x7E1, rx_id=0x7E9, basecls=UDS, padding=True) as tester:
            assert _ask(tester, "1003") == "5003003201f4"
            assert _ask(tester, "22f187f189f18c") == "62f187" + b"BMS-1".hex() + "f189" + b"1.0.0".hex() + "f18c" + b"SN-bms".hex()
            assert _ask(tester, "22f180") == "62f18001" + b"BL-1.0".hex()  # numberOfModules, then the boot software
            assert _ask(tester, "22f15a") == "62f15a00000000"  # never programmed: zero fingerprint
            assert _ask(tester, "1004") == "7f1012"  # sub-function not supported before the length check
            assert _ask(tester, "100400") == "7f1012"
            assert _ask(tester, "31041234") == "7f3112"
            assert _ask(tester, "3e00") == "7e00"
            assert _ask(tester, "19") == "7f1911"
        # a functional request answered in several frames; scapy sends its flow control from 0x7DF
        sniffer = can.Bus(**bus)
        try:
            with ISOTPSocket(can_sock, tx_id=0x7DF, rx_id=0x7E9, basecls=UDS, padding=True) as functional:
                assert _ask(functional, "22f187f189f18c") == "62f187" + b"BMS-1".hex() + "f189" + b"1.0.0".hex() + "f18c" \
                    + b"SN-bms".hex()
            frames = []
            while (m := sniffer.recv(0.3)) is not None:
                frames.append((m.arbitration_id, bytes(m.data).hex()))
        finally:
            sniffer.shutdown()
        assert frames[0] == (0x7DF, "0722f187f189f18c") and frames[1][0] == 0x7E9 and frames[1][1].startswith("1017")
        assert frames[2][0] == 0x7DF and frames[2][1].startswith("30")
        assert [i for i, _ in frames[3:]] == [0x7E9] * 3
    finally:
        can_sock.close()
