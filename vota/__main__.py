"""``python -m vota``: the same as the installed ``vota`` command."""

import sys

from vota.cli import main

sys.exit(main())
