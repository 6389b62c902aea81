"""`python -m trainer`: the trainer service for containers (same as `dlsr trainer run`)."""

from __future__ import annotations

import sys

from dlsr_monitor.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["trainer", "run", *sys.argv[1:]]))
