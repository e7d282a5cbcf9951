"""python -m adamwprune.graphs: make update-graphs and the one-run plot."""
import sys

from .cli import main

sys.exit(main())
