"""The progress lines of ``vota flash`` and ``vota deploy``: rate and time left per ECU and in all."""

from __future__ import annotations

import io

from vota.cli.progress import ProgressBoard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_line_tells_the_rate_since_the_transfer_began_and_the_time_left_at_it() -> None:
    clock, out = Clock(), io.StringIO()
    board = ProgressBoard(["vcu"], out, clock=clock)
    board("vcu", "erase", 0, 1024 * 1024)
    board("vcu", "transfer_data", 64 * 1024, 1024 * 1024)  # the first block: the rate is measured from here
    clock.now += 8.0
    board("vcu", "transfer_data", 320 * 1024, 1024 * 1024)  # 256 KiB in 8 s: 32 KiB/s, 704 KiB left: 22 s
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("erase") and "KiB/s" not in lines[0]  # nothing sent yet: no rate, no guess
    assert "KiB/s" not in lines[1]  # one block in: too early to say
    assert "   32.0 KiB/s   0:22 left  transfer_data" in lines[2] and " 31.2%    320 KiB" in lines[2], lines[2]
    board("vcu", "done", 1024 * 1024, 1024 * 1024)
    assert out.getvalue().splitlines()[-1].endswith("1024 KiB  done")


def test_a_terminal_gets_every_ecu_and_the_total_redrawn_in_place() -> None:
    clock, out = Clock(), Terminal()
    board = ProgressBoard(["vcu", "bms"], out, clock=clock)
    board("vcu", "transfer_data", 10 * 1024, 100 * 1024)
    board("bms", "transfer_data", 10 * 1024, 100 * 1024)
    clock.now += 2.0
    board("vcu", "transfer_data", 50 * 1024, 100 * 1024)  # 20 KiB/s, 50 KiB left
    board("bms", "transfer_data", 30 * 1024, 100 * 1024)  # 10 KiB/s, 70 KiB left
    board.finish()  # redraws are at most ten a second: the last state is drawn at the end
    frame = out.getvalue().split("\x1b[3F")[-1]  # the last redraw: three lines back up, written again
    lines = [line.removeprefix("\x1b[2K") for line in frame.splitlines()]
    assert lines[0].startswith("vcu ") and "20.0 KiB/s   0:03 left" in lines[0], lines
    assert lines[1].startswith("bms ") and "10.0 KiB/s   0:07 left" in lines[1], lines
    assert lines[2].startswith("total") and " 40.0%     80 KiB" in lines[2] and "30.0 KiB/s   0:04 left" in lines[2], lines
