#!/usr/bin/env python3
"""Check a tracker's set-up with a short fake run: `make trackio-test` / `make wandb-test`.

    python scripts/tracker_test.py trackio|wandb [--dir DIR] [--steps N]

Logs N steps (default 20) of a decaying loss, a rising accuracy, a cubic sparsity
ramp and a cosine learning rate under the same keys a training run uses, then the
end-of-run keys, and prints where it all went. DIR is the results directory
(default: results/); the fake run's directory is DIR/<timestamp>_tracker-test-<tracker>
and trackio's store DIR/trackio (or $TRACKIO_DIR), as for a real run.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from adamwprune.report.tracking import (ROOT, TRACKERS, TrackerError, TrackerUnavailable, build_trackers,
                                 final_to_metrics, project_name, row_to_metrics)

TARGET_SPARSITY = 0.9


def fake_row(step: int, steps: int) -> dict:
    """One metrics.jsonl-shaped row of a run that learns and prunes as real ones do."""
    frac = step / steps
    loss = 2.3 * math.exp(-5 * frac) + 0.1
    return {"step": step, "epoch": frac, "train_loss": loss, "val_loss": loss * 1.05,
            "val_metric": 100 * (1 - math.exp(-5 * frac)) * 0.98, "test_loss": loss * 1.06,
            "test_metric": 100 * (1 - math.exp(-5 * frac)) * 0.975,
            "sparsity": TARGET_SPARSITY * (1 - (1 - frac) ** 3),
            "lr": 1e-3 * 0.5 * (1 + math.cos(math.pi * frac)), "elapsed_s": 0.01 * step}


def fake_final(rows: list[dict]) -> dict:
    best = max(rows, key=lambda r: r["val_metric"])
    return {"status": "completed", "best_val_metric": best["val_metric"], "best_step": best["step"],
            "test_metric_at_best": best["test_metric"], "final_sparsity": rows[-1]["sparsity"],
            "steps": rows[-1]["step"], "wall_time_s": rows[-1]["elapsed_s"], "step_time_s": 0.01,
            "peak_memory_bytes": 64 << 20,
            "memory": {"parameters": {"bytes": 1 << 20}, "optimizer_state": {"bytes": 2 << 20},
                       "total": {"bytes": 4 << 20}}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tracker", choices=TRACKERS)
    p.add_argument("--dir", type=Path, default=ROOT / "results", help="results directory")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    run_name = f"{time.strftime('%Y%m%d-%H%M%S')}_tracker-test-{args.tracker}"
    run_dir = args.dir.resolve() / run_name
    project = project_name("tracker-test")
    config = {"model": "tracker-test", "metric_name": "accuracy"}
    try:
        tracker = build_trackers([args.tracker], project=project, run_name=run_name,
                                 group="tracker-test", config=config, directory=run_dir)
    except (TrackerUnavailable, TrackerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tracker.log_config({"total_steps": args.steps})  # as a run adds what it learns at set-up
    rows = [fake_row(step, args.steps) for step in range(1, args.steps + 1)]
    for row in rows:
        tracker.log(row_to_metrics(row), step=row["step"])
    tracker.log(final_to_metrics(fake_final(rows)), step=rows[-1]["step"])
    store = tracker.trackers[0].store if args.tracker == "trackio" and tracker.trackers else None
    tracker.finish("completed")
    if tracker.failed:
        print(f"error: {args.tracker} failed (see above)", file=sys.stderr)
        return 1
    print(f"logged {args.steps} steps to {args.tracker}: project {project}, run {run_name}")
    if store is not None:
        print(f"view them with: make trackio-view  (or python -m adamwprune.report.tracking view "
              f"--project {project} --dir {store})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
