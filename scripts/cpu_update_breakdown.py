"""Where AdamWPrune's fused CPU mask update spends its time, on real shapes.

    .venv/bin/python scripts/cpu_update_breakdown.py [--shapes resnet18|gpt2|gpt2-mini]
                                                     [--sample-scale N] [--pattern 2:4]

Runs the benchmark's ramp (cubic to 0.9 over ``RAMP_UPDATES`` updates at the
default interval) with random gradients and times each call into the CPU
kernels (``adamwprune.optim.cpu_kernels``): the sample and its k-th keys that
bracket the threshold, the step with the pruning fused in, and the final
selection among the candidates. Prints the mean per update step next to the
plain step's kernel on normal steps, and which path made each update.
``--sample-scale N`` takes N times the shipped sample (a tighter bracket, fewer
candidates) to compare the trade-off. ``--pattern 2:4`` runs the N:M update instead
(target 0.5, as the bench's ``adamwprune_2:4`` row): the step, then the group pass
``nm_hist`` and the pruning pass ``nm_apply``.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from adamwprune.bench import RAMP_UPDATES, TARGET, shape_models
from adamwprune.optim import adamwprune_cpu as awp_cpu
from adamwprune.optim.adamwprune import AdamWPrune
from adamwprune.params import param_groups
from adamwprune.pruning.patterns import nm_sparsity

KERNEL_CALLS = ("adam_sample", "kth", "adam_step_prune", "prune_finish", "adam_step", "nm_hist",
                "nm_apply")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="resnet18", choices=sorted(shape_models()))
    parser.add_argument("--interval", type=int, default=50)
    parser.add_argument("--sample-scale", type=int, default=1)
    parser.add_argument("--pattern", default="unstructured", help="unstructured or N:M (2:4)")
    args = parser.parse_args()
    if args.sample_scale != 1:
        low, high = awp_cpu.FUSED_SAMPLE_RUNS
        awp_cpu.FUSED_SAMPLE_RUNS = (low * args.sample_scale, high * args.sample_scale)
        awp_cpu.FUSED_SAMPLE_STRIDE = max(1, awp_cpu.FUSED_SAMPLE_STRIDE // args.sample_scale)
    torch.manual_seed(0)
    model = shape_models()[args.shapes]()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    interval = args.interval
    target = TARGET if args.pattern == "unstructured" else nm_sparsity(args.pattern)
    opt = AdamWPrune(param_groups(model, 0.1), lr=1e-4, weight_decay=0.1, variant="bitter0",
                     target_sparsity=target, start_step=0, end_step=interval * RAMP_UPDATES,
                     interval=interval, pattern=args.pattern)
    opt.pruning_step = 1
    opt.step()  # allocates the state and builds (or loads) the kernels
    kernels = opt._kernels()
    if kernels is None:
        raise SystemExit("the CPU kernels are not available here (no C compiler?)")
    seconds: dict[str, float] = collections.defaultdict(float)
    for name in (name for name in KERNEL_CALLS if hasattr(kernels, name)):
        def timed(*a, _call=getattr(kernels, name), _name=name, **k):
            start = time.perf_counter()
            try:
                return _call(*a, **k)
            finally:
                seconds[_name] += time.perf_counter() - start
        object.__setattr__(kernels, name, timed)  # Kernels is a frozen dataclass

    def ramp(offset: int) -> tuple[dict, float]:
        seconds.clear()
        total = 0.0
        for u in range(1, RAMP_UPDATES + 1):
            opt.pruning_step = u * interval + offset
            start = time.perf_counter()
            opt.step()
            total += time.perf_counter() - start
        return {k: v / RAMP_UPDATES * 1e3 for k, v in seconds.items()}, total / RAMP_UPDATES * 1e3

    update, update_ms = ramp(-1)   # the step before u * interval: an update step
    normal, normal_ms = ramp(+1)   # one after: a normal step, masks in force
    print(f"{args.shapes}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{RAMP_UPDATES} updates, {args.pattern}, sample x{args.sample_scale}, paths {dict(opt.update_paths)}")
    print(f"  update step {update_ms:.2f} ms: " + ", ".join(f"{k} {v:.2f}" for k, v in update.items()))
    print(f"  normal step {normal_ms:.2f} ms: " + ", ".join(f"{k} {v:.2f}" for k, v in normal.items()))
    print(f"  mask update amortised over {interval} steps: "
          f"{100 * (update_ms - normal_ms) / (interval * normal_ms):.2f} % of the step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
