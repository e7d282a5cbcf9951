"""python -m adamwprune.monitor: gputop."""
import sys

from .gputop import main

sys.exit(main())
