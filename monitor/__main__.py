"""`python -m monitor`: the streaming monitor for containers (same as `dlsr monitor`)."""

import sys

from dlsr_monitor.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["monitor", *sys.argv[1:]]))
