"""Redraw the figures the docs show from the study matrices and copy them into docs/images/.

    .venv/bin/python scripts/docs_figures.py [--results results]

For each study preset, the newest ``<timestamp>_<preset>`` matrix under the results
directory is redrawn with ``make update-graphs`` (adamwprune.graphs.update_graphs)
and the figures below are copied to ``docs/images/<model>/<preset>_<figure>.png``.
A study that has not been run is reported and skipped; nothing is drawn from anything
but run directories.
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from adamwprune.report.claims import matrix_of
from adamwprune.config.kconfig import ROOT, ConfigError, resolve_path
from adamwprune.graphs import update_graphs

FIGURES = {
    "lenet5-lr-grid": ["lenet5_sweep.png"],
    "lenet5-compare": ["lenet5_final_vs_sparsity.png"],
    "lenet5-patterns-dst": ["lenet5_final_vs_sparsity.png"],
    "gpt2-char-lr-grid": ["gpt2_sweep.png"],
    "gpt2-char-bitter-lesson": ["gpt2_final_vs_sparsity.png", "gpt2_adamwprune_vs_base.png"],
    "gpt2-char-patterns-dst": ["gpt2_final_vs_sparsity.png", "gpt2_val_curves.png"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--dest", default=str(ROOT / "docs" / "images"))
    args = ap.parse_args(argv)
    results, dest = resolve_path(args.results), Path(args.dest)
    missing = 0
    for preset, names in FIGURES.items():
        try:
            mdir = matrix_of(preset, results)
        except ConfigError as e:
            print(f"skipped {preset}: {e}", file=sys.stderr)
            missing += 1
            continue
        with tempfile.TemporaryDirectory() as tmp:
            update_graphs(mdir, tmp)
        for name in names:
            src = mdir / "graphs" / name
            if not src.is_file():
                print(f"skipped {preset}/{name}: {mdir.name} has no such figure", file=sys.stderr)
                missing += 1
                continue
            model, fig = name.split("_", 1)
            out = dest / model / f"{preset}_{fig}"
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
            print(f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}  <- {src}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
