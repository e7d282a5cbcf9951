import sys

from .engine import signals
from .cli import main

# A command-line process keeps its stop handlers until it exits, then ignores stop
# signals while the interpreter shuts down (see adamwprune.engine.signals).
signals.install()
code = main()
signals.ignore_from_now()
sys.exit(code)
