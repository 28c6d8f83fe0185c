"""``python -m flashvit.bench``: see flashvit/bench/cli.py (bench/cli.py in the repository)."""

import time

_T0 = time.monotonic()  # the --budget counts from here, imports included

if __name__ == "__main__":
    import sys

    from flashvit.bench.cli import main

    sys.exit(main(t_start=_T0))
