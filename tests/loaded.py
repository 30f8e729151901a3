"""The whole suite on a busy machine: both cores kept busy by spinning processes (as CI's shared
machine may be) while pytest runs. ``make test-loaded``; the exit code is pytest's."""

from __future__ import annotations

import os
import subprocess
import sys

SPIN = "while True: pass"


def main() -> int:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(os.cpu_count() or 2)]
    try:
        return subprocess.call([sys.executable, "-m", "pytest", "-q", *sys.argv[1:]])
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


if __name__ == "__main__":
    sys.exit(main())
