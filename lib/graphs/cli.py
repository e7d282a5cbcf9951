"""python -m adamwprune.graphs: the command line of make update-graphs and the run plot."""
from __future__ import annotations

import argparse
from pathlib import Path


from ..report import summary as S
from .report import latest_run, plot_run, update_graphs


# ---------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adamwprune.graphs",
                                     description="draw the figures of a matrix of runs, or of one run")
    parser.add_argument("dir", nargs="?", metavar="DIR",
                        help="matrix directory (default: newest under results/ with a matrix.json)")
    parser.add_argument("--run", nargs="?", const="", metavar="RUN_DIR",
                        help="plot one run instead (no value: the run that finished last)")
    parser.add_argument("--out", metavar="PNG", help="with --run: output file (default RUN_DIR/run.png)")
    parser.add_argument("--images-root", default="images",
                        help="copies go to IMAGES_ROOT/<model>/ (relative to the project root)")
    args = parser.parse_args(argv)
    if args.run is not None:
        run = Path(args.run) if args.run else latest_run()
        if run is None or not run.is_dir():
            where = args.run or "with a final.json under results/"
            raise SystemExit(f"no run directory {where}; pass --run RUN_DIR")
        print(plot_run(run, Path(args.out) if args.out else run / "run.png"))
        return 0
    if args.out:
        parser.error("--out only goes with --run")
    path = S.resolve_dir(args.dir)
    for png in update_graphs(path, args.images_root):
        print(png)
    print(path / "graphs" / "report.md")
    return 0
