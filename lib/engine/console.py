"""What a run prints: the progress bar (or log lines off a terminal) and the end-of-run summary."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Progress:
    """Progress bar on a terminal, a log line every so often otherwise."""

    total: int
    start: int
    enabled: bool
    every: int
    bar: Any = None
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, unit="step", dynamic_ncols=True)

    def update(self, step: int, **stats) -> None:
        self.stats.update({k: v for k, v in stats.items() if v is not None})
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            if step % self.every == 0 or step == self.total:
                self.bar.set_postfix_str(self._fmt(), refresh=False)
                self.bar.refresh()
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} {self._fmt()}", flush=True)

    def _fmt(self) -> str:
        s = self.stats
        parts = [f"loss {s['loss']:.4f}" if "loss" in s else None,
                 f"{s['metric_name']} {s['metric']:.2f}" if "metric" in s else None,
                 f"sparsity {100 * s['sparsity']:.1f}%" if "sparsity" in s else None,
                 f"lr {s['lr']:.2e}" if "lr" in s else None]
        return " | ".join(p for p in parts if p)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _shape_note(final: dict) -> str:
    """What the target means for an N:M run: 1 - N/M of the tensors the pattern fits."""
    dense = final.get("dense_tensors") or []
    if final.get("pattern") in (None, "unstructured"):
        return ""
    return f" = {final['pattern']}" + (f"; left dense, M does not divide: {', '.join(dense)}" if dense else "")

def print_summary(final: dict, path: Path) -> None:
    """The one-screen end-of-run summary."""
    name = final["metric_name"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    mem = final.get("peak_memory_bytes")
    lines = [
        "",
        f"== {final['task']} run {final['status'].upper()} ==",
        f"  best validation {name}: {fmt(final['best_val_metric'])} (step {final['best_step']}"
        + (f", loss {final['best_val_loss']:.4f})" if final.get("best_val_loss") is not None else ")"),
        f"  test {name} at the best checkpoint: {fmt(final['test_metric_at_best'])}",
        f"  sparsity (measured from the weights): {100 * final['final_sparsity']:.2f}% "
        f"(target {100 * final['target_sparsity']:.1f}%{_shape_note(final)})",
        f"  parameters: {final['params_total']:,} total, {final['params_prunable']:,} prunable",
        *([f"  compression {final['compression_ratio']:.2f}x; forward FLOPs per example "
           f"{final['flops_per_example']:,} dense, {final['flops_per_example_nonzero']:,} non-zero"]
          if final.get("compression_ratio") else []),
        f"  steps: {final['steps']}/{final['total_steps']} in {final['wall_time_s']:.1f} s"
        + (f" ({1000 * final['step_time_s']:.1f} ms/step)" if final.get("step_time_s") else ""),
        f"  peak memory: {mem / 2**20:.1f} MiB" if mem else "  peak memory: n/a",
        f"  run directory: {path}",
    ]
    if final.get("message"):
        lines.append(f"  {final['message']}")
    print("\n".join(lines), flush=True)
