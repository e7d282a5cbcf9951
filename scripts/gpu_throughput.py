"""GPU throughput and memory of the shipped presets, measured with the real engine.

    python scripts/gpu_throughput.py [--out DIR] [--cases gpt2,resnet18,...] [--steps N]

Each case is a preset (``make defconfig``) run for a few steps on synthetic data
of the real shapes (``DATASET=synthetic``) through ``python -m adamwprune run``,
so the engine's GPU paths (bf16 autocast, torch.compile, channels-last, the
fused AdamWPrune kernels, the memory sampler) are the ones measured. Figures
come from each run's final.json: ``step_time_s`` (training steps only; the
compiling first step and evaluations are left out) and the CUDA allocator peak
of the training phase. GPT-2 also gets MFU: model FLOPs per token
(``GPT.flops_per_token``, nanoGPT's estimate) x tokens/s over the GPU's dense
bf16 peak (``--peak-tflops``, default 989 for an H100 SXM). Prints one table and
writes ``throughput.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (defconfig, Kconfig symbols on top of it); batch sizes are the presets' unless given.
# GPT-2: 64 sequences of 1,024 tokens per step in 4 micro-batches of 16.
GPT2_BATCH = {"TRAIN_BATCH_SIZE": "64", "TRAIN_GRAD_ACCUM": "4"}
CASES = {
    "gpt2-adamw": ("gpt2-finewebedu", GPT2_BATCH),
    "gpt2-adamwprune": ("gpt2-finewebedu-adamwprune", GPT2_BATCH),
    "gpt2-adamwprune-eager": ("gpt2-finewebedu-adamwprune", {**GPT2_BATCH, "RUN_COMPILE": "n"}),
    "resnet18-sgd": ("resnet18", {}),
    "resnet18-adamwprune": ("resnet18-adamwprune", {}),
    "resnet18-adamwprune-compile": ("resnet18-adamwprune", {"RUN_COMPILE": "y"}),
    "resnet50-sgd": ("resnet50", {}),
    "resnet50-adamwprune": ("resnet50-adamwprune", {}),
}


def run_case(name: str, steps: int, work: Path, device: str, extra: dict) -> dict:
    defconfig, overrides = CASES[name]
    cfg = work / f"{name}.config"
    results = work / name
    subprocess.run([sys.executable, "-m", "adamwprune.config.cli", "--config", str(cfg),
                    "defconfig", defconfig], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    sets = {"DATASET": "synthetic", "MAX_ITERS": str(steps), "DEVICE": device}
    symbols = {"RUN_RESULTS_DIR": str(results), "TRAIN_EVAL_INTERVAL": str(steps),
               "TRAIN_EVAL_BATCHES": "2", "TRAIN_CHECKPOINT_INTERVAL": str(steps),
               "DATA_SYNTHETIC_SIZE": "4096", **extra}
    symbols.update(overrides)
    argv = [sys.executable, "-m", "adamwprune", "run", "--config", str(cfg)]
    for key, value in sets.items():
        argv += ["--override", f"{key}={value}"]
    argv += ["--set", " ".join(f"{k}={v}" for k, v in symbols.items())]
    started = time.time()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    finals = sorted(results.rglob("final.json"))
    if proc.returncode != 0 or not finals:
        return {"case": name, "error": (proc.stdout + proc.stderr)[-3000:]}
    final = json.loads(finals[-1].read_text())
    config = json.loads((finals[-1].parent / "config.json").read_text())
    return {"case": name, "final": final, "config": config, "wall_s": time.time() - started}


def figures(result: dict, peak_tflops: float) -> dict:
    final, cfg = result["final"], result["config"]
    values = cfg["config"]
    step = final["step_time_s"]
    batch = int(values["batch_size"])
    out = {"case": result["case"], "status": final["status"], "step_ms": 1e3 * step,
           "batch": batch, "peak_gib": (final["cuda_allocator_peak_bytes"] or 0) / 2**30,
           "sparsity": final["final_sparsity"], "params": final["params_total"]}
    if final["task"].startswith("gpt2") or "gpt" in final["task"]:
        block = int(values["gpt2_block_size"])
        tokens = batch * block / step
        out["tokens_per_s"] = tokens
        from adamwprune.models.gpt2 import GPT, gpt_config
        with _meta_device():
            model = GPT(gpt_config(values["gpt2_size"], block_size=block))
        out["mfu"] = model.estimate_mfu(tokens, peak_tflops * 1e12)
    else:
        out["images_per_s"] = batch / step
    return out


class _meta_device:
    def __enter__(self):
        import torch
        self._ctx = torch.device("meta")
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "results" / "gpu"))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test)")
    p.add_argument("--set", default="", help='more Kconfig symbols for every case, e.g. '
                   '"RUN_COMPILE=n RESNET_CHANNELS_LAST=n"')
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(item.split("=", 1) for item in args.set.split())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            result = run_case(name, args.steps, Path(tmp), args.device, extra)
            if "error" in result:
                print(f"{name}: FAILED\n{result['error']}", flush=True)
                rows.append(result)
                continue
            row = figures(result, args.peak_tflops)
            rows.append({**row, "final": result["final"], "config": result["config"]})
            print(json.dumps(row), flush=True)
    (out / "throughput.json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"\n{'case':22} {'status':9} {'step ms':>9} {'batch':>6} {'tok/s | img/s':>14} "
          f"{'MFU':>6} {'peak GiB':>9} {'sparsity':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:22} FAILED")
            continue
        rate = r.get("tokens_per_s", r.get("images_per_s"))
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
        print(f"{r['case']:22} {r['status']:9} {r['step_ms']:9.1f} {r['batch']:6d} {rate:14,.0f} "
              f"{mfu:>6} {r['peak_gib']:9.2f} {r['sparsity']:8.3f}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
