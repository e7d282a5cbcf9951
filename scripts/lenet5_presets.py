"""Train every single-run LeNet-5 preset once and print the table of docs/lenet5.md.

    .venv/bin/python scripts/lenet5_presets.py [--out results/lenet5-presets]

Each preset runs as `make defconfig DEFCONFIG=<preset> && make` would (its own
.config under OUT, its run directory under OUT); the table is read from each
run's final.json and metrics.jsonl. A preset whose run directory already holds a
final.json is not run again (delete OUT to start over).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("lenet5", "lenet5-adamw", "lenet5-magnitude", "lenet5-movement", "lenet5-sgd",
           "lenet5-adamwadv", "lenet5-adamwspam")


def run_preset(preset: str, out: Path) -> Path:
    config, run_dir = out / f"{preset}.config", out / preset
    if (run_dir / "final.json").is_file():
        return run_dir
    py = [sys.executable, "-m"]
    subprocess.run(py + ["adamwprune.config.cli", "--config", str(config), "defconfig", preset],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(py + ["adamwprune", "run", "--config", str(config), "--run-dir", str(run_dir)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return run_dir


def row(preset: str, run_dir: Path) -> str:
    final = json.loads((run_dir / "final.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    at_best = next(m for m in metrics if m["step"] == final["best_step"])
    bpp = final["memory"]["total"]["bytes_per_param"]
    return (f"| `{preset}` | {final['best_val_metric']:.2f} ({final['best_step']}) | "
            f"{final['test_metric_at_best']:.2f} | {100 * at_best['sparsity']:.2f} % | "
            f"{100 * final['final_sparsity']:.2f} % | {metrics[-1]['test_metric']:.2f} | "
            f"{1000 * final['step_time_s']:.1f} | {bpp:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "lenet5-presets")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| preset | best val acc (step) | test acc at best val | sparsity at best val step | "
             "final sparsity | test acc at the last step | ms/step | counted B/param |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for preset in PRESETS:
        print(f"[presets] {preset}", file=sys.stderr, flush=True)
        lines.append(row(preset, run_preset(preset, args.out)))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
