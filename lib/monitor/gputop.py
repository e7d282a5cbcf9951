"""gputop: the live terminal view of devices and of a matrix of runs (`make gputop`)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


from .backends import BACKENDS, GIB, MIB, NOT_RUNS, Device, PsutilBackend, detect_backend, make_backend

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# gputop


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.0f} MiB"


def _format_value(value, unit: str) -> str:
    return "-" if value is None else f"{value:.0f}{unit}"


def render_devices(backend_name: str, devices: list[Device]) -> list[str]:
    if backend_name == "psutil":
        host = devices[0]
        return [f"host  memory {format_bytes(host['used_bytes'])} / "
                f"{format_bytes(host['total_bytes'])}   cpu {_format_value(host['util_pct'], '%')}"]
    lines = [f"{'GPU':<4}{'used / total':>24}{'util':>7}{'power':>8}{'temp':>7}{'ours':>11}"]
    for d in devices:
        used = f"{format_bytes(d['used_bytes'])} / {format_bytes(d['total_bytes'])}"
        lines.append(
            f"{d['index']:<4}{used:>24}{_format_value(d['util_pct'], '%'):>7}"
            f"{_format_value(d['power_w'], ' W'):>8}{_format_value(d['temp_c'], ' C'):>7}"
            f"{format_bytes(d['process_bytes']):>11}")
    return lines


def _last_record(path: Path) -> dict | None:
    """The last complete JSON line of a (possibly growing) jsonl file."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 65536))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def scan_matrix(results_dir) -> list[dict]:
    """One entry per cell of the matrix: name, status (done / running / pending, as
    adamwprune.run.matrix.cell_state judges it), the last metrics.jsonl row, and seconds
    since metrics.jsonl last changed."""
    from ..run.matrix import cell_state, load_cells

    path = Path(results_dir)
    try:
        names = [c.id for c in load_cells(path)[1]]
    except FileNotFoundError:  # not a matrix: every subfolder with a run in it
        names = sorted(p.name for p in path.iterdir() if (p / "config.json").exists())
    summary = {"done": "done", "diverged": "done", "running": "running", "interrupted": "running"}
    cells = []
    for name in names:
        cell = path / name
        metrics = cell / "metrics.jsonl"
        status = summary.get(cell_state(cell), "pending")
        last = _last_record(metrics) if metrics.exists() else None
        age = time.time() - metrics.stat().st_mtime if metrics.exists() else None
        cells.append({"name": name, "status": status, "last": last, "age_s": age})
    return cells


def render_matrix(results_dir) -> list[str]:
    path = Path(results_dir)
    if not path.is_dir():
        return [f"results: {path} is not a directory"]
    cells = scan_matrix(path)
    counts = {s: sum(c["status"] == s for c in cells) for s in ("done", "running", "pending")}
    lines = [f"matrix {path.name}: {counts['done']} done, {counts['running']} running, "
             f"{counts['pending']} pending"]
    for cell in (c for c in cells if c["status"] == "running"):
        last = cell["last"] or {}
        step = last.get("step", "-")
        metric = last.get("val_metric")
        age = "-" if cell["age_s"] is None else f"{cell['age_s']:.0f}s ago"
        extra = "" if metric is None else f"  val {metric:.4g}"
        lines.append(f"  running {cell['name']}  step {step}{extra}  (updated {age})")
    return lines


def newest_results_dir(results_root) -> Path | None:
    """The most recently modified run or matrix directory under `results_root` (by
    time: names sort by when a run was *created*, not by when it last wrote)."""
    root = Path(results_root)
    found = [p for p in root.iterdir() if p.is_dir() and p.name not in NOT_RUNS] if root.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def render_frame(backend, results_dir=None) -> str:
    """One screen of gputop as text; a failing backend falls back to psutil."""
    try:
        name, note, devices = backend.name, "", backend.read(set())
    except Exception as exc:
        name, note = "psutil", f" ({backend.name} failed: {exc})"
        devices = PsutilBackend().read(set())
    lines = [f"gputop  {time.strftime('%Y-%m-%d %H:%M:%S')}  backend {name}{note}", ""]
    lines += render_devices(name, devices)
    if results_dir is not None:
        lines += [""] + render_matrix(results_dir)
    return "\n".join(lines)


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m adamwprune.monitor",
        description="gputop: live device memory (or host RSS) and matrix progress")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--results", metavar="DIR",
                        help="a matrix dir, results/<timestamp>_<name>/, one subfolder per cell "
                             "(default: the newest directory under --results-root)")
    parser.add_argument("--results-root", metavar="DIR", default="results")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto")
    args = parser.parse_args(argv)
    if args.results is None:
        args.results = newest_results_dir(args.results_root)
    if not args.interval > 0:
        parser.error(f"--interval must be > 0 seconds, got {args.interval}")
    return args


def _live(backend, args) -> None:
    try:
        from rich.live import Live
        from rich.text import Text
    except ImportError:
        Live = None
    if Live is not None and sys.stdout.isatty():
        with Live(Text(render_frame(backend, args.results)), auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(Text(render_frame(backend, args.results)), refresh=True)
    else:
        # home + clear screen on a terminal; a pipe gets one frame after another
        clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
        while True:
            print(clear + render_frame(backend, args.results), flush=True)
            time.sleep(args.interval)


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        backend = detect_backend() if args.backend == "auto" else make_backend(args.backend)
    except Exception as exc:
        print(f"gputop: backend {args.backend} unavailable: {exc}", file=sys.stderr)
        return 2
    try:
        if args.once:
            print(render_frame(backend, args.results))
        else:
            _live(backend, args)
    except KeyboardInterrupt:
        pass
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
