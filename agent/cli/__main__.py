"""``python -m agent.cli``: the same as the installed ``vota`` command."""

import sys

from agent.cli import main

sys.exit(main())
