"""`python -m loraport`: the same entry as the `loraport` console script (Ctrl-C handling lives in cli.py)."""

import sys

try:
    from loraport.cli import main
except KeyboardInterrupt:  # loraport.cli catches its own; this covers the instant before its first line runs
    sys.stderr.write("error: interrupted; nothing was written\n")
    raise SystemExit(130) from None

main()
