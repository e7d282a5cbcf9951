"""Compare launch settings of AdamWPrune's GPU step kernel on real shapes.

    python scripts/gpu_kernel_variants.py [--shapes gpt2,resnet18] [--repeats 100]

For each setting of ``adamwprune.optim.gpu_kernels.SETTINGS`` (entries per
program, warps, IEEE vs fast division, alignment hints) it prints, next to
``torch.optim.AdamW(fused=True)`` on the same parameters and gradients:
the kernel's device time (CUDA events, median), the whole ``step()`` with a
synchronisation (median), the host time of ``step()`` with the launch left out,
the achieved bandwidth at 28 B/param, and the largest relative difference of
the weights from the plain path after 3 steps. Needs CUDA.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from adamwprune.bench import shape_models
from adamwprune.optim import gpu_kernels
from adamwprune.optim.adamwprune import AdamWPrune
from adamwprune.params import param_groups

VARIANTS = [
    {"block": 4096, "num_warps": 8, "exact": True, "hint": False},
    {"block": 1024, "num_warps": 4, "exact": True, "hint": True},   # the shipped setting
    {"block": 1024, "num_warps": 4, "exact": False, "hint": True},
    {"block": 2048, "num_warps": 8, "exact": True, "hint": True},
]


def events(fn, repeats: int) -> float:
    """Median device time of fn() in ms (CUDA events)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def host(fn, repeats: int) -> float:
    """Median host time of fn() with the kernel launches replaced by nothing."""
    launch = gpu_kernels.launch_tiles
    gpu_kernels.launch_tiles = lambda *a, **k: None
    try:
        return wall(fn, repeats)
    finally:
        gpu_kernels.launch_tiles = launch


def update_breakdown(name: str, repeats: int = 20) -> None:
    """Where an update step's time goes (each phase between synchronisations)."""
    from adamwprune.optim import adamwprune_gpu as awp_gpu

    torch.manual_seed(0)
    model = shape_models()[name]().cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = AdamWPrune(param_groups(model, 0.1), lr=1e-4, weight_decay=0.1, target_sparsity=0.9,
                     start_step=0, end_step=50 * 140, interval=50)
    times: dict = {}

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            times.setdefault(label, []).append(1e3 * (time.perf_counter() - t))
            return out
        return wrapper

    originals = (awp_gpu._gpu_bracket, awp_gpu._gpu_finish, gpu_kernels.launch_tiles,
                 gpu_kernels.scatter_zero)
    awp_gpu._gpu_bracket = timed("sample + bracket", awp_gpu._gpu_bracket)
    awp_gpu._gpu_finish = timed("finish (sync, sort, apply, scatter)", awp_gpu._gpu_finish)
    launch = gpu_kernels.launch_tiles
    gpu_kernels.launch_tiles = lambda *a, **k: timed(f"launch mode {a[5]}", launch)(*a, **k)
    gpu_kernels.scatter_zero = timed("scatter", gpu_kernels.scatter_zero)
    try:
        for u in range(1, 70):
            opt.pruning_step = 50 * u - 1
            step = timed("whole update step", opt.step) if u > 2 else opt.step
            step()
        for _ in range(repeats):
            opt.pruning_step = 50 * 70 + 1
            timed("normal step", opt.step)()
    finally:
        (awp_gpu._gpu_bracket, awp_gpu._gpu_finish, gpu_kernels.launch_tiles,
         gpu_kernels.scatter_zero) = originals
    print(f"\n{name} update step breakdown (ms, median over updates 3-69; paths "
          f"{dict(opt.update_paths)}):")
    for label, values in times.items():
        print(f"  {label:40} {statistics.median(values):8.3f}  (n={len(values)})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="gpt2,resnet18")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--default-only", action="store_true", help="only the shipped setting")
    args = p.parse_args()
    variants = [gpu_kernels.SETTINGS.copy()] if args.default_only else VARIANTS
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    for name in args.shapes.split(","):
        torch.manual_seed(0)
        model = shape_models()[name]().cuda()
        n = sum(p.numel() for p in model.parameters())
        grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        adamw = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, weight_decay=0.1,
                                  fused=True)
        for _ in range(3):
            adamw.step()
        t_adamw = events(adamw.step, args.repeats)
        w_adamw = wall(adamw.step, args.repeats)
        print(f"\n{name}: {n:,} parameters, {len(grads)} tensors")
        print(f"  {'setting':46} {'device ms':>9} {'step ms':>8} {'host ms':>8} {'GB/s':>6} "
              f"{'ratio':>6} {'max rel diff':>12}")
        print(f"  {'torch AdamW fused':46} {t_adamw:9.3f} {w_adamw:8.3f} {'':>8} "
              f"{28 * n / t_adamw / 1e6:6.0f} {1.0:6.3f}")
        for variant in variants:
            gpu_kernels.SETTINGS.update(variant)
            opts = []
            for fast in (None, False):
                torch.manual_seed(1)
                m = shape_models()[name]().cuda()
                for p, g in zip(m.parameters(), grads):
                    p.grad = g.clone()
                # masks in force (a ramp in progress), no update on the timed steps
                opts.append((m, AdamWPrune(param_groups(m, 0.1), lr=1e-4, weight_decay=0.1,
                                           target_sparsity=0.5, start_step=0, end_step=10 ** 6,
                                           interval=10 ** 5, fast=fast)))
            (m_fast, o_fast), (m_plain, o_plain) = opts
            for _ in range(3):
                o_fast.step()
                o_plain.step()
            diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                       for a, b in zip(m_fast.parameters(), m_plain.parameters()))
            plan = o_fast._gpu_plan
            scal = plan.scalars(o_fast.param_groups)
            kernel = lambda: gpu_kernels.launch_tiles(  # noqa: E731
                plan.rows, plan.gptrs, scal, plan.tile_rows, plan.tile_offs,
                gpu_kernels.MODE_STEP, aligned=plan.aligned)
            t = events(kernel, args.repeats)
            w = wall(o_fast.step, args.repeats)
            h = host(o_fast.step, args.repeats)
            label = ", ".join(f"{k}={v}" for k, v in variant.items())
            print(f"  {label:46} {t:9.3f} {w:8.3f} {h:8.3f} {28 * n / t / 1e6:6.0f} "
                  f"{w / w_adamw:6.3f} {diff:12.2e}  aligned={plan.aligned}", flush=True)
        gpu_kernels.SETTINGS.update(variants[0] if args.default_only else VARIANTS[1])
        update_breakdown(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
