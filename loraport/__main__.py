"""`python -m loraport`: the same entry as the `loraport` console script (Ctrl-C: loraport/interrupts.py)."""

try:
    from loraport.cli import main
except KeyboardInterrupt:  # loraport.cli handles its own; this covers a Ctrl-C that beat the handler
    from loraport.interrupts import interrupted

    interrupted()

main()
