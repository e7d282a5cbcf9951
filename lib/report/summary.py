"""Summary tables of a matrix of runs, always rebuilt from the run directories.

A matrix directory (``results/<timestamp>_<name>/``) holds ``matrix.json`` and
one run directory per cell; see docs/architecture.md for a run directory.
Nothing here is cached: every table is derived from ``final.json``,
``config.json`` and ``cell.json`` each time, so it can be deleted and rebuilt.

    collect(dir)        one record per cell (a plain dict, see `read_record`)
    summarize(records)  one row per configuration, statistics over seeds
    best_methods(rows)  per (model, target sparsity): the best method chosen on
                        the *validation* metric, so the test set never selects
    write_summary(dir)  summary.csv and summary.md in the matrix directory

Run ``python -m adamwprune.report.summary [DIR]`` to print the table of DIR (default:
the newest directory under results/ that has a matrix.json).
"""
from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from pathlib import Path
from typing import Iterable, Optional

from . import stats
from . import sections
from ..run.atomic import write_text_atomic
from ..run.rundir import latest_matrix, read_json
from ..config.sweep import label as sweep_label

from ..paths import ROOT
MIB = 1 << 20
COMPLETED = "completed"
PENDING = "pending"
FAILED_STATUSES = ("diverged", "failed")
# Components of adamwprune.memory.memory_report, in the order they are shown.
COMPONENTS = ("parameters", "gradients", "optimizer_state", "pruning_buffers", "total")
# What makes two runs the same configuration (seeds are what varies inside one). AdamWPrune's
# base optimizer is not an axis of a matrix (it comes from .config), and a pending cell has no
# config.json to read it from, so it is carried along but does not split configurations.
# "sweep" holds the (symbol, value) pairs of a cell's MATRIX_SWEEP axes (() without any).
CONFIG_KEY = ("model", "optimizer", "pruning", "target_sparsity", "pattern", "distribution", "variant", "sweep")
# What final.json says a trained model costs (adamwprune.report.costs), averaged over seeds.
COST_KEYS = ("compression_ratio", "flops_per_example", "flops_per_example_nonzero", "params_prunable_nonzero")
# Run directories live in a matrix directory beside these, which are not cells.
NOT_CELLS = ("graphs",)


# ------------------------------------------------------------------ records
def is_matrix(path: Path) -> bool:
    return (Path(path) / "matrix.json").is_file()


def is_run_dir(path: Path) -> bool:
    return any((Path(path) / name).is_file() for name in ("final.json", "config.json", "cell.json"))


def _cells(matrix_dir: Path) -> list[tuple[Path, Optional[dict]]]:
    """(run directory, matrix.json cell or None), in matrix order, then unlisted run dirs."""
    matrix = read_json(matrix_dir / "matrix.json") or {}
    listed = [(matrix_dir / str(c["id"]), c) for c in matrix.get("cells", [])]
    known = {p.name for p, _ in listed}
    extra = sorted(p for p in matrix_dir.iterdir()
                   if p.is_dir() and p.name not in known and p.name not in NOT_CELLS and is_run_dir(p))
    return listed + [(p, None) for p in extra]


def collect(matrix_dir) -> list[dict]:
    """One record per cell of a matrix directory; a single run directory gives one record."""
    path = Path(matrix_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass a matrix or run directory")
    if not is_matrix(path) and is_run_dir(path):
        return [read_record(path)]
    return [read_record(run, cell) for run, cell in _cells(path)]


def _info(pruning: Optional[str]):
    from ..registry import PRUNERS

    return PRUNERS.get(pruning or "")


def _variant(optimizer: Optional[str], pruning: Optional[str], cfg: dict) -> Optional[str]:
    # As in cli.cell_id: the importance score only means something where a method ranks by it.
    info = _info(pruning)
    return cfg.get("adamwprune_variant") if info is not None and info.uses_variant else None


def _pattern(pruning: Optional[str], cell: dict, final: dict, cfg: dict) -> Optional[str]:
    """"unstructured" or "N:M" for a pruning run; None for dense training."""
    info = _info(pruning)
    if info is not None and not info.prunes:
        return None
    for value in (cell.get("pattern"), final.get("pattern")):
        if value:
            return value
    if cfg.get("prune_pattern") == "nm":
        return f"{cfg.get('nm_n')}:{cfg.get('nm_m')}"
    return "unstructured"


def _distribution(pruning: Optional[str], cell: dict, final: dict, cfg: dict) -> Optional[str]:
    info = _info(pruning)
    if info is None or not info.dynamic:
        return None
    return cell.get("distribution") or final.get("distribution") or cfg.get("prune_distribution")


def _target(pruning: Optional[str], cell: dict, final: dict, cfg: dict) -> float:
    for value in (cell.get("sparsity"), final.get("target_sparsity")):
        if value is not None:
            return float(value)
    if pruning in (None, "none"):
        return 0.0
    return float(cfg.get("target_sparsity") or 0.0)


def _memory(final: dict) -> dict:
    sampled = final.get("sampled_memory") or {}
    report = final.get("memory") or {}
    peak = sampled.get("peak_bytes")
    return {
        "peak_memory_bytes": peak if peak is not None else final.get("peak_memory_bytes"),
        "mean_memory_bytes": sampled.get("mean_bytes"),
        "memory_source": "/".join(str(sampled[k]) for k in ("backend", "metric") if sampled.get(k)) or None,
        "allocator_peak_bytes": final.get("cuda_allocator_peak_bytes"),
        "bytes_per_param": {c: (report.get(c) or {}).get("bytes_per_param") for c in COMPONENTS},
    }


def _last_line(text: Optional[str]) -> Optional[str]:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


def read_record(run_dir, cell: Optional[dict] = None) -> dict:
    """What one cell is and how it went, from its files (any of which may be missing)."""
    run_dir, cell = Path(run_dir), cell or {}
    final = read_json(run_dir / "final.json") or {}
    cfg = (read_json(run_dir / "config.json") or {}).get("config") or {}
    state = read_json(run_dir / "cell.json") or {}
    fcfg = final.get("config") or {}
    pick = lambda key: cell.get(key) if cell.get(key) is not None else cfg.get(key, fcfg.get(key))
    optimizer, pruning = pick("optimizer"), pick("pruning")
    variant = cell["variant"] if "variant" in cell else _variant(optimizer, pruning, cfg)
    record = {
        "id": cell.get("id") or run_dir.name, "path": str(run_dir),
        "model": pick("model"), "optimizer": optimizer,
        "base": cfg.get("adamwprune_base") if optimizer == "adamwprune" else None,
        "pruning": pruning, "target_sparsity": _target(pruning, cell, final, cfg),
        "variant": variant, "seed": pick("seed"),
        "pattern": _pattern(pruning, cell, final, cfg),
        "distribution": _distribution(pruning, cell, final, cfg),
        "dense_tensors": final.get("dense_tensors") or [],
        "status": final.get("status") or state.get("status") or PENDING,
        "exit_code": state.get("exit_code"),
        "message": final.get("message") or _last_line(state.get("log_tail")),
        "metric_name": final.get("metric_name"), "higher_is_better": final.get("higher_is_better"),
        "best_val_metric": final.get("best_val_metric"), "best_step": final.get("best_step"),
        "test_metric": final.get("test_metric_at_best"),
        "final_sparsity": final.get("final_sparsity"),
        "steps": final.get("steps"), "total_steps": final.get("total_steps"),
        "step_time_s": final.get("step_time_s"), "wall_time_s": final.get("wall_time_s"),
        "params_total": final.get("params_total"), "weight_decay": cfg.get("weight_decay"),
        "sweep": _pairs(cell.get("sweep")), "tuned": _pairs(cell.get("tuned")),
        **{k: final.get(k) for k in COST_KEYS},
    }
    record.update(_memory(final))
    return record


def _pairs(value) -> tuple:
    return tuple(tuple(p) for p in value or ())


def method_label(rec: dict) -> str:
    """A method's readable name: optimizer (with AdamWPrune's base) + pruning (+ variant)."""
    opt = rec["optimizer"] or "?"
    if rec.get("base"):
        opt = f"{opt}[{rec['base']}]"
    label = f"{opt} + {rec['pruning'] or '?'}"
    if rec.get("pattern") and rec["pattern"] != "unstructured":
        label = f"{label} {rec['pattern']}"
    if rec.get("distribution"):
        label = f"{label} {rec['distribution']}"
    label = f"{label} ({rec['variant']})" if rec.get("variant") else label
    return f"{label} [{sweep_label(rec['sweep'])}]" if rec.get("sweep") else label


# --------------------------------------------------------------- statistics
def mean_std(values: Iterable[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (0 for one value); (None, None) for none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _mean(values: Iterable[Optional[float]], scale: float = 1.0) -> Optional[float]:
    m, _ = mean_std(values)
    return None if m is None else m / scale


def _row(group: list[dict]) -> dict:
    first = group[0]
    done = [r for r in group if r["status"] == COMPLETED]
    named = next((r for r in group if r["metric_name"]), first)
    row = {k: first.get(k) for k in CONFIG_KEY}
    row["base"] = next((r["base"] for r in group if r["base"]), None)
    row.update(method=method_label(row), metric_name=named["metric_name"],
               higher_is_better=named["higher_is_better"], runs=len(group), n_seeds=len(done),
               failed=sum(r["status"] in FAILED_STATUSES for r in group),
               unfinished=sum(r["status"] not in (COMPLETED, *FAILED_STATUSES) for r in group),
               seeds=[r["seed"] for r in done])
    row["val_mean"], row["val_std"] = mean_std(r["best_val_metric"] for r in done)
    row["test_mean"], row["test_std"] = mean_std(r["test_metric"] for r in done)
    # the per-seed values, for Welch's t-test (adamwprune.report.stats)
    row["val_values"] = [r["best_val_metric"] for r in done if r["best_val_metric"] is not None]
    row["test_values"] = [r["test_metric"] for r in done if r["test_metric"] is not None]
    row["tuned"] = next((r.get("tuned") for r in group if r.get("tuned")), ())
    for k in COST_KEYS:
        row[k] = _mean(r.get(k) for r in done)
    row["sparsity_mean"] = _mean(r["final_sparsity"] for r in done)
    row["peak_mib"] = _mean((r["peak_memory_bytes"] for r in done), MIB)
    row["mean_mib"] = _mean((r["mean_memory_bytes"] for r in done), MIB)
    row["allocator_peak_mib"] = _mean((r["allocator_peak_bytes"] for r in done), MIB)
    row["memory_source"] = next((r["memory_source"] for r in done if r["memory_source"]), None)
    for c in COMPONENTS:
        row[f"bpp_{c}"] = _mean(r["bytes_per_param"][c] for r in done)
    step = _mean(r["step_time_s"] for r in done)
    row["step_ms"] = None if step is None else step * 1000.0
    return row


def config_key(rec: dict) -> tuple:
    return tuple(rec.get(k) for k in CONFIG_KEY)


def group_records(records: Iterable[dict]) -> dict[tuple, list[dict]]:
    """Records by configuration, in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(config_key(rec), []).append(rec)
    return groups


def summarize(records: Iterable[dict]) -> list[dict]:
    """One row per configuration (model, optimizer, pruning, target sparsity, variant)."""
    return [_row(group) for group in group_records(records).values()]


def best_methods(rows: Iterable[dict]) -> list[dict]:
    """Per (model, target sparsity) the method with the best mean *validation* metric.

    The test metric of the chosen method is reported but never used to choose.
    `exceeds_spread` is whether the margin to the runner-up is larger than the
    larger of the two seed-to-seed standard deviations (False for a tie); None
    when either has a single seed (or there is no runner-up), with the reason in
    `verdict`.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["n_seeds"] and row["val_mean"] is not None:
            groups.setdefault((row["model"], row["target_sparsity"]), []).append(row)
    out = []
    for (model, target), group in groups.items():
        hib = group[0]["higher_is_better"]
        if any(r["higher_is_better"] != hib for r in group):
            raise ValueError(f"{model} at sparsity {target}: runs disagree on whether higher is better")
        ranked = sorted(group, key=lambda r: r["val_mean"], reverse=bool(hib))
        best = ranked[0]
        runner = ranked[1] if len(ranked) > 1 else None
        entry = {"model": model, "target_sparsity": target, "metric_name": best["metric_name"],
                 "higher_is_better": hib, "best": best["method"],
                 "best_val_mean": best["val_mean"], "best_val_std": best["val_std"],
                 "best_test_mean": best["test_mean"], "best_test_std": best["test_std"],
                 "best_n_seeds": best["n_seeds"], "runner_up": None, "runner_up_val_mean": None,
                 "margin": None, "exceeds_spread": None}
        if runner is None:
            entry["verdict"] = "n/a (one method)"
        else:
            margin = abs(best["val_mean"] - runner["val_mean"])
            entry.update(runner_up=runner["method"], runner_up_val_mean=runner["val_mean"], margin=margin)
            if margin == 0:
                entry.update(exceeds_spread=False, verdict="no (tie)")
            elif min(best["n_seeds"], runner["n_seeds"]) < 2:
                entry["verdict"] = "n/a (1 seed)"
            else:
                entry["exceeds_spread"] = margin > max(best["val_std"], runner["val_std"])
                entry["verdict"] = "yes" if entry["exceeds_spread"] else "no"
        out.append(entry)
    return sorted(out, key=lambda e: (str(e["model"]), e["target_sparsity"]))


# ----------------------------------------------------------------- writing
CSV_FIELDS = (*CONFIG_KEY, "tuned", "base", "method", "metric_name", "higher_is_better", "runs", "n_seeds",
              "failed", "unfinished", "val_mean", "val_std", "test_mean", "test_std", "sparsity_mean",
              "best_on_val", "p_vs_best", "verdict_vs_best", "p_vs_dense", *COST_KEYS,
              "peak_mib", "mean_mib", "allocator_peak_mib", "memory_source",
              *(f"bpp_{c}" for c in COMPONENTS), "step_ms", "seeds")
METRIC_UNITS = {"accuracy": "%", "perplexity": ""}


def is_process_rss(row: dict) -> bool:
    """Memory sampled as the process's resident set: a CPU run, where it holds torch,
    Python and the data, and differences between methods are noise."""
    return (row.get("memory_source") or "").endswith("process_rss")


def fmt_num(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def fmt_pm(mean, std) -> str:
    return "–" if mean is None else f"{mean:.2f} ± {std:.2f}"


def fmt_pct(fraction) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f}%"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(cells) + " |" for cells in lines]


def results_table(rows: list[dict]) -> list[str]:
    """The markdown table of `summarize` rows (mean ± std over completed seeds)."""
    alloc = any(r["allocator_peak_mib"] is not None for r in rows)
    sampled = [r for r in rows if r["peak_mib"] is not None]
    rss = " (process RSS)" if sampled and all(is_process_rss(r) for r in sampled) else ""
    header = ["model", "method", "target sparsity", "seeds", "failed", "metric",
              "best val (mean ± std)", "test at best val (mean ± std)", "measured sparsity",
              f"peak MiB{rss}", f"mean MiB{rss}", *(["allocator peak MiB"] if alloc else []),
              "B/param params", "B/param grads", "B/param optimizer state", "B/param pruning buffers",
              "B/param total", "ms/step"]
    lines = []
    for r in rows:
        unit = METRIC_UNITS.get(r["metric_name"], "")
        lines.append([str(r["model"]), r["method"], fmt_pct(r["target_sparsity"]), str(r["n_seeds"]),
                      str(r["failed"]), f"{r['metric_name'] or '–'}{f' ({unit})' if unit else ''}",
                      fmt_pm(r["val_mean"], r["val_std"]), fmt_pm(r["test_mean"], r["test_std"]),
                      fmt_pct(r["sparsity_mean"]), fmt_num(r["peak_mib"], 1), fmt_num(r["mean_mib"], 1),
                      *([fmt_num(r["allocator_peak_mib"], 1)] if alloc else []),
                      *(fmt_num(r[f"bpp_{c}"]) for c in COMPONENTS), fmt_num(r["step_ms"], 1)])
    return _table(header, lines)


def best_table(best: list[dict]) -> list[str]:
    header = ["model", "target sparsity", "best method (by validation)", "val (mean ± std)",
              "test (mean ± std)", "runner-up", "margin (val)", "margin > seed spread?"]
    lines = [[str(b["model"]), fmt_pct(b["target_sparsity"]), b["best"],
              fmt_pm(b["best_val_mean"], b["best_val_std"]), fmt_pm(b["best_test_mean"], b["best_test_std"]),
              b["runner_up"] or "–", fmt_num(b["margin"]), b["verdict"]] for b in best]
    return _table(header, lines)


def _sources(rows: list[dict]) -> str:
    found = sorted({r["memory_source"] for r in rows if r["memory_source"]})
    return ", ".join(found) if found else "no samples"


def _changes_note(changes: list[dict]) -> list[str]:
    """Configuration changes accepted on resume: cells finished before them ran otherwise."""
    lines = []
    for c in changes:
        what = ", ".join(f"{sym} {old} -> {new}" for sym, old, new in c.get("changes", []))
        lines.append(f"**Configuration changed on resume** ({c.get('time')}, `make continue "
                     f"ACCEPT_CONFIG_CHANGES=1`): {what}, for {len(c.get('cells', []))} unfinished cell(s); "
                     "cells finished before ran with the old values.")
    return lines + [""] if lines else []


def render_markdown(name: str, records: list[dict], rows: list[dict], meta: Optional[dict] = None) -> str:
    done = sum(r["status"] == COMPLETED for r in records)
    failed = sum(r["status"] in FAILED_STATUSES for r in records)
    lines = [f"# Summary of {name}", "",
             f"{len(records)} cells: {done} completed, {failed} diverged or failed, "
             f"{len(records) - done - failed} unfinished.", "",
             "Statistics are over the completed seeds of each configuration (sample standard "
             "deviation; 0 for one seed). The test metric is the one at the step of the best "
             "validation metric. Memory is the peak and mean sampled during training "
             f"({_sources(rows)}), in MiB (2^20 bytes); bytes/param per component are counted "
             "from the tensors at the end of the run.", ""]
    lines += _changes_note((meta or {}).get("config_changes") or [])
    if any(is_process_rss(r) for r in rows):
        lines += ["On CPU the sampled memory is the resident set of the whole process (Python, torch "
                  "and the data included): it does not measure a method's cost, and its differences "
                  "between methods are noise. Compare the bytes/param columns instead.", ""]
    lines += results_table(rows)
    lines += ["", "## Best method per model and sparsity", "",
              "Chosen on the mean best *validation* metric; the test metric is reported, never "
              "used to choose. The margin counts when it exceeds the larger seed-to-seed standard "
              "deviation of the two methods.", ""]
    best = best_methods(rows)
    lines += best_table(best) if best else ["No completed runs yet."]
    lines += sections.extra_sections(rows, meta)
    notes = method_notes(records)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    bad = [r for r in records if r["status"] != COMPLETED]
    if bad:
        lines += ["", "## Cells that did not complete", ""]
        lines += _table(["cell", "status", "exit code", "last message"],
                        [[r["id"], r["status"], "–" if r["exit_code"] is None else str(r["exit_code"]),
                          (r["message"] or "–").replace("|", "\\|")] for r in bad])
    return "\n".join(lines) + "\n"


def method_notes(records: list[dict]) -> list[str]:
    """What a reader must know to read some cells (measured effects, docs/pruning.md)."""
    from ..registry import OPTIMIZERS

    coupled = sorted({r["optimizer"] for r in records if r["pruning"] == "movement"
                      and r["optimizer"] in OPTIMIZERS and OPTIMIZERS[r["optimizer"]].coupled_decay
                      and (r.get("weight_decay") or 0) > 0})
    if not coupled:
        return []
    return [f"Movement pruning with coupled L2 decay ({', '.join(coupled)}): the optimizer "
            "normalises lambda * w, so the dense weights under the mask shrink by about lr per "
            "step and few masked entries come back (LeNet-5, lambda = 0.1: mean |w| under the "
            "mask 0.0104 -> 0.0008 in 300 steps, against 0.0233 -> 0.0226 with AdamW; half as "
            "many entries let back; `scripts/movement_coupled_decay.py`, docs/pruning.md). "
            "Its movement rows measure that, not movement pruning under decoupled decay."]


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "seeds": " ".join(str(s) for s in r["seeds"]),
                         "sweep": sweep_label(r.get("sweep") or ()), "tuned": sweep_label(r.get("tuned") or ())})
    return buf.getvalue()


def write_summary(matrix_dir) -> tuple[Path, Path]:
    """Rebuild summary.csv and summary.md in `matrix_dir` from its run directories."""
    path = Path(matrix_dir)
    records = collect(path)
    rows = summarize(records)
    stats.annotate(rows)
    csv_path, md_path = path / "summary.csv", path / "summary.md"
    write_text_atomic(csv_path, to_csv(rows))
    write_text_atomic(md_path, render_markdown(path.name, records, rows, read_json(path / "matrix.json")))
    return csv_path, md_path


# ---------------------------------------------------------------------- CLI
def resolve_dir(arg: Optional[str]) -> Path:
    """DIR from the command line, or the newest matrix; raises SystemExit with a one-line reason."""
    if arg:
        path = Path(arg)
        if not path.is_dir():
            raise SystemExit(f"{path} is not a directory; pass a matrix directory "
                             "(results/<timestamp>_<name>)")
        return path
    path = latest_matrix(ROOT / "results")
    if path is None:
        raise SystemExit(f"no directory with a matrix.json under {ROOT / 'results'}; pass DIR")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adamwprune.report.summary",
                                     description="rebuild summary.csv and summary.md of a matrix of runs")
    parser.add_argument("dir", nargs="?", metavar="DIR",
                        help="matrix directory (default: newest under results/ with a matrix.json)")
    args = parser.parse_args(argv)
    path = resolve_dir(args.dir)
    csv_path, md_path = write_summary(path)
    print(md_path.read_text())
    print(f"wrote {csv_path}\nwrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
