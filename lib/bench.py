"""`make bench`: AdamWPrune's cost against AdamW, magnitude and movement pruning, measured.

Four figures, measured side by side in one process on the current device:

* step ratio: one optimizer step (plus the pruner's ``step()``) of each method /
  ``torch.optim.AdamW`` at its fastest setting (``fused=True``), on the
  parameter shapes of GPT-2 124M and ResNet-18. AdamWPrune is timed during the
  ramp (masks in force, between mask updates) and after it. Every method owns
  its optimizer state; all share one set of parameters and gradients, and one
  repetition times one step of every method in turn, so load from other
  processes falls on all of them alike. Magnitude and movement pruning also
  cost something in backward (a gradient mask; the score accumulation) and
  movement in forward (the mask): that is reported apart, as ``hooks``.
* extra state bytes per parameter: optimizer state + pruning buffers of the
  method, minus AdamW's optimizer state, over the model's parameter count
  (``adamwprune.memory``).
* with clipping: the same steps preceded by gradient-norm clipping
  (``adamwprune.clip_grad_norm_``, max norm CLIP_NORM, active at every step),
  AdamWPrune against AdamW + clipping. AdamWPrune's clipping sees the masked
  gradient (the norm of the entries it keeps), as a baseline pruner's does.
* mask update fraction: (mean time of the ramp's update steps - time of a
  normal step) / (interval x normal step time), the share of the step time the
  mask updates take when amortised at the default interval (Kconfig
  ``PRUNING_INTERVAL``), over a cubic ramp of RAMP_UPDATES updates. Exact top-k
  (k = round(s * N)) for every method; no sampling decides what is pruned.
* engine ratio: steps/s of ``adamwprune.engine.trainer.Trainer`` (memory sampler,
  progress output, metrics and checkpoints at its evaluation, tracker none) /
  steps/s of a bare PyTorch loop over the same task, model, data, optimizer
  and pruner. The engine's rate is differential (two runs of different
  length), so set-up and the final evaluation cancel out.

Timings are medians after warm-up, with min-max. Results go to
``results/bench/<timestamp>.json``. On CUDA the step's achieved bandwidth is
reported against the 28 bytes per parameter an fp32 AdamW step moves (read w,
g, m, v; write w, m, v).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .config import kconfig
from .run.atomic import write_text_atomic
from .memory import optimizer_state_bytes, pruning_buffer_bytes
from .optim import cpu_kernels
from .optim.adamwprune import AdamWPrune
from .optim.clipping import clip_grad_norm_
from .params import param_groups
from .pruning import MagnitudePruner, MovementPruner, StatePruner

ADAMW_BYTES_PER_PARAM = 28  # fp32: read w, g, m, v (16 B), write w, m, v (12 B)
TARGET = 0.9
# Mask updates in the bench's cubic ramp from 0 to TARGET: the shipped GPT-2 configs
# (10,000 steps, ramp from 10 % to 80 % of them, PRUNING_INTERVAL 50) have 140; the
# ResNet-18 ones about 1,100, each pruning less. AdamWPrune runs and times every update
# (its cost grows with the entries an update prunes); magnitude and movement pruning,
# whose update ranks all scores whatever changed, run and time BASELINE_UPDATES of
# them, evenly spread (each then prunes what the skipped ones would have).
RAMP_UPDATES = 140
BASELINE_UPDATES = 20
# Max gradient norm of the clipping rows: below the bench gradients' norm (entries of
# N(0, 1e-6)), so every step clips.
CLIP_NORM = 0.01


# ------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def summary(seconds: list[float]) -> dict:
    """Median, min and max in milliseconds (and the number of samples)."""
    ms = [1e3 * s for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


# ----------------------------------------------------------------- methods
@dataclass
class Method:
    """One optimizer + pruner over its own copy of the weights; ``set_counter``
    sets the number of steps already taken (so a step lands on or off an update)."""

    name: str
    optimizer: torch.optim.Optimizer
    pruner: object
    set_counter: Callable[[int], None]
    hooks: Optional[Callable[[], None]] = None
    every_update: bool = True
    # Gradient-norm clipping before the step (max norm), and the method the step is
    # compared with; a method that does not prune has no mask updates to time.
    clip: Optional[float] = None
    baseline: str = "adamw"
    prunes: bool = True
    # Untimed, after each mask update: what training's hooks keep true between updates
    # (magnitude: masked entries get no gradient, so their weights stay 0).
    after_update: Optional[Callable[[], None]] = None
    normal: list = field(default_factory=list)
    after: list = field(default_factory=list)
    update: list = field(default_factory=list)

    def step(self) -> None:
        if self.clip is not None:
            clip_grad_norm_(self.optimizer, self.clip)
        self.optimizer.step()
        self.pruner.step()


def _fastest_adamw(groups: list) -> torch.optim.Optimizer:
    """AdamW fused where torch supports it on this device, else foreach."""
    try:
        return torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.1, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.1, foreach=True)


def build_methods(model: nn.Module, device: torch.device, interval: int,
                  plain: bool) -> list[Method]:
    """Each method trains its own copy of ``model`` (pruning methods would otherwise
    prune each other's weights); the gradients are shared, except with the plain
    AdamWPrune path, which masks its gradients in place."""
    end = interval * RAMP_UPDATES
    sched = dict(target_sparsity=TARGET, start_step=0, end_step=end, interval=interval)
    methods = [Method("adamw", _fastest_adamw(param_groups(_copy(model), 0.1)),
                      _NullPruner(), lambda t: None, prunes=False)]
    for name, fast in (("adamwprune", None), ("adamwprune_plain", False))[:2 if plain else 1]:
        own = _copy(model, share_grads=fast is not False)
        opt = AdamWPrune(param_groups(own, 0.1), lr=1e-4, weight_decay=0.1, variant="bitter0",
                         fast=fast, **sched)
        pruner = StatePruner(own, TARGET, 0, end, interval, optimizer=opt)
        methods.append(Method(name, opt, pruner, _counter(opt, pruner)))
    # AdamWPrune at 2:4 (its target is the pattern's 0.5): the same masked step, and the
    # N:M mask update (two passes over the groups in the CPU kernels).
    own = _copy(model)
    nm_sched = dict(sched, target_sparsity=0.5)
    opt = AdamWPrune(param_groups(own, 0.1), lr=1e-4, weight_decay=0.1, variant="bitter0",
                     pattern="2:4", **nm_sched)
    pruner = StatePruner(own, 0.5, 0, end, interval, optimizer=opt, pattern="2:4")
    methods.append(Method("adamwprune_2:4", opt, pruner, _counter(opt, pruner)))
    # Clipping scales (and AdamWPrune's masks) the gradients in place: own copies.
    methods.append(Method("adamw_clip", _fastest_adamw(param_groups(_copy(model, False), 0.1)),
                          _NullPruner(), lambda t: None, clip=CLIP_NORM, baseline="adamw_clip",
                          prunes=False))
    own = _copy(model, share_grads=False)
    opt = AdamWPrune(param_groups(own, 0.1), lr=1e-4, weight_decay=0.1, variant="bitter0", **sched)
    pruner = StatePruner(own, TARGET, 0, end, interval, optimizer=opt)
    methods.append(Method("adamwprune_clip", opt, pruner, _counter(opt, pruner), clip=CLIP_NORM,
                          baseline="adamw_clip"))
    for name, cls in (("magnitude", MagnitudePruner), ("movement", MovementPruner)):
        # Magnitude pruning masks its own gradients (its hooks' effect, see after_update).
        masks_gradients = cls is MagnitudePruner
        own = _copy(model, share_grads=not masks_gradients)
        opt = _fastest_adamw(param_groups(own, 0.1))
        pruner = cls(own, TARGET, 0, end, interval, optimizer=opt)
        methods.append(Method(name, opt, pruner, _counter(None, pruner), _hook_cost(pruner),
                              every_update=False,
                              after_update=_mask_own_gradients(pruner) if masks_gradients else None))
    return methods


def _mask_own_gradients(pruner: MagnitudePruner) -> Callable[[], None]:
    @torch.no_grad()
    def mask() -> None:
        for name, _, p in pruner.prunable:
            p.grad.masked_fill_(pruner.masks[name], 0)
    return mask


def _copy(model: nn.Module, share_grads: bool = True) -> nn.Module:
    """A copy of the model's weights; its gradients are the original's tensors (or copies)."""
    clone = copy.deepcopy(model)
    for mine, theirs in zip(clone.parameters(), model.parameters()):
        mine.grad = theirs.grad if share_grads else theirs.grad.clone()
    return clone


class _NullPruner:
    def step(self) -> None:
        pass


def _counter(optimizer: Optional[AdamWPrune], pruner) -> Callable[[int], None]:
    def set_counter(t: int) -> None:
        pruner.t = t
        if optimizer is not None:
            optimizer.pruning_step = t
    return set_counter


def _hook_cost(pruner) -> Callable[[], None]:
    """What the pruner adds to forward/backward, applied to the current gradients:
    magnitude masks each gradient; movement masks each weight (forward) and adds
    -g * w to its scores (backward)."""
    if isinstance(pruner, MagnitudePruner):
        hooks = [(p, pruner._gradient_masker(name)) for name, _, p in pruner.prunable]

        def magnitude() -> None:
            for p, hook in hooks:
                hook(p.grad)
        return magnitude
    masks = [(p, pruner._masks[name]) for name, _, p in pruner.prunable]

    @torch.no_grad()
    def movement() -> None:
        for p, masker in masks:
            p.masked_fill(masker.mask, 0)
            masker.scores.sub_(p.grad * p)
    return movement


# ----------------------------------------------------------- measurements
def _round(methods: list[Method], device: torch.device, t: int, bucket: str) -> None:
    for m in methods:
        m.set_counter(t)
        getattr(m, bucket).append(_timed(m.step, device))


def measure_steps(methods: list[Method], device: torch.device, interval: int, repeats: int,
                  warmup: int) -> None:
    """The ramp's update steps in order (see RAMP_UPDATES), normal steps at mid-ramp
    (one step of every method per round), and steps after the ramp."""
    for m in methods:  # first step: the optimizer state is allocated
        m.set_counter(0)
        m.step()
    stride = max(1, RAMP_UPDATES // BASELINE_UPDATES)
    for u in range(1, RAMP_UPDATES + 1):
        for m in (m for m in methods if m.prunes):
            if u == 1:  # untimed: one-time costs (GPU kernels compiled on first use)
                m.set_counter(interval - 1)
                m.step()
            elif m.every_update or u % stride == 0 or u == RAMP_UPDATES:
                m.set_counter(u * interval - 1)
                m.update.append(_timed(m.step, device))
            else:
                continue
            if m.after_update is not None:
                m.after_update()
        if u == RAMP_UPDATES // 2:
            for i in range(warmup + repeats):
                _round(methods, device, u * interval + 1 + i % (interval - 2), "normal")
            for m in methods:
                del m.normal[:warmup]
    end = interval * RAMP_UPDATES
    for i in range(warmup + repeats):
        _round(methods, device, end + 1 + i, "after")
    for m in methods:
        del m.after[:warmup]


def measure_hooks(methods: list[Method], device: torch.device, repeats: int) -> dict:
    out = {}
    for m in methods:
        if m.hooks is not None:
            m.hooks()
            out[m.name] = summary([_timed(m.hooks, device) for _ in range(repeats)])
    return out


def extra_bytes(methods: list[Method], n_params: int) -> dict:
    """(state + pruning buffers - AdamW's state) / parameters, per method."""
    base = sum(optimizer_state_bytes(methods[0].optimizer).values())
    out = {}
    for m in (m for m in methods if m.prunes):
        state = sum(optimizer_state_bytes(m.optimizer).values())
        buffers = sum(pruning_buffer_bytes(m.optimizer, m.pruner).values())
        out[m.name] = (state + buffers - base) / n_params
    return out


# ------------------------------------------------------------- shape sets
def shape_models() -> dict[str, Callable[[], nn.Module]]:
    from .models.gpt2 import GPT, gpt_config
    from .models.resnet import resnet18_cifar

    return {"gpt2": lambda: GPT(gpt_config("gpt2")), "resnet18": resnet18_cifar,
            "gpt2-mini": lambda: GPT(gpt_config("mini"))}


def bench_shapes(name: str, device: torch.device, interval: int, repeats: int, warmup: int,
                 plain: bool) -> dict:
    torch.manual_seed(0)
    model = shape_models()[name]().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    methods = build_methods(model, device, interval, plain)
    measure_steps(methods, device, interval, repeats, warmup)
    hooks = measure_hooks(methods, device, repeats)
    return _shape_result(name, methods, hooks, n_params, interval, device)


def _shape_result(name: str, methods: list[Method], hooks: dict, n_params: int, interval: int,
                  device: torch.device) -> dict:
    by_name = {m.name: m for m in methods}
    steps, ratios, fractions = {}, {}, {}
    for m in methods:
        normal, after = statistics.median(m.normal), statistics.median(m.after)
        base = by_name[m.baseline]
        steps[m.name] = {"ramp": summary(m.normal), "after": summary(m.after)}
        if m.prunes:
            # Amortised: the mean extra time of the ramp's update steps, over `interval` steps.
            extra = statistics.mean(m.update) - normal
            steps[m.name]["update"] = summary(m.update)
            fractions[m.name] = extra / (interval * normal)
        if m is not base:
            ratios[f"{m.name}_ramp"] = normal / statistics.median(base.normal)
            ratios[f"{m.name}_after"] = after / statistics.median(base.after)
            if m.name in hooks:
                ratios[f"{m.name}_with_hooks"] = ((normal + hooks[m.name]["median_ms"] / 1e3)
                                                  / statistics.median(base.normal))
    result = {"parameters": n_params, "steps": steps, "hooks": hooks, "step_ratio_vs_adamw": ratios,
              "mask_update_fraction": fractions,
              "extra_state_bytes_per_param": extra_bytes(methods, n_params),
              # What the timed steps did: the sparsity each method reached (zeros of the
              # effective weights, after the ramp) and which code made AdamWPrune's updates.
              "sparsity_after_ramp": {m.name: float(m.pruner.current_sparsity())
                                      for m in methods if m.prunes},
              "update_paths": {m.name: dict(m.optimizer.update_paths) for m in methods
                               if isinstance(m.optimizer, AdamWPrune)}}
    if device.type == "cuda":
        result["achieved_bandwidth_gbps"] = {
            m.name: ADAMW_BYTES_PER_PARAM * n_params / statistics.median(m.normal) / 1e9
            for m in methods}
    return result


# ------------------------------------------------------------------ engine
ENGINE_SETTINGS = {"MODEL": "lenet5", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "4096",
                   "BATCH_SIZE": "128", "OPTIMIZER": "adamwprune", "PRUNING": "state",
                   "PRUNING_TARGET_SPARSITY": "0.5", "TRACKER": "none", "TRAIN_EVAL_BATCHES": "2"}


def _engine_cfg(device: torch.device, steps: int):
    overrides = dict(ENGINE_SETTINGS, MAX_ITERS=str(steps), TRAIN_EVAL_INTERVAL=str(steps),
                     DEVICE=device.type)
    cfg, _, _ = kconfig.load(None, overrides)
    return cfg


def _engine_seconds(device: torch.device, steps: int) -> float:
    from .engine.tasks import load_task
    from .engine.trainer import Trainer

    cfg = _engine_cfg(device, steps)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(load_task(cfg.model), cfg, Path(tmp) / "run", config_text="")
        start = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - start


def _bare_seconds(device: torch.device, first: int, steps: int) -> float:
    """A plain loop on the engine's own objects: same task, model, data, optimizer, pruner."""
    from .engine.tasks import load_task
    from .engine.trainer import Budget, seed_everything
    from .registry import build_optimizer, build_pruner

    cfg = _engine_cfg(device, first + steps)
    task = load_task(cfg.model)
    seed_everything(cfg.seed, cfg.deterministic, device)
    data = task.build_data(cfg)
    model = task.build_model(cfg).to(device)
    budget = Budget.from_config(cfg, data.train.steps_per_epoch(cfg.batch_size))
    opt = build_optimizer(cfg.optimizer, param_groups(model, cfg.weight_decay or 0.0), cfg,
                          budget.schedule, cfg.pruning)
    pruner = build_pruner(cfg.pruning, model, opt, budget.schedule, cfg.optimizer)

    def loop(lo: int, hi: int) -> None:
        for step in range(lo, hi):
            x, y = data.train.train_batch(step, cfg.batch_size, cfg.seed, 0, 1)
            task.loss(model, (x.to(device), y.to(device))).backward()
            opt.step()
            pruner.step()
            opt.zero_grad(set_to_none=True)

    loop(0, first)
    return _timed(lambda: loop(first, first + steps), device)


def bench_engine(device: torch.device, short: int, long: int, rounds: int) -> dict:
    """Steps/s of the engine (differential: long - short runs) and of the bare loop."""
    engine, bare = [], []
    _engine_seconds(device, short)  # first-use imports and caches, not counted
    _bare_seconds(device, short, 1)
    for _ in range(rounds):
        seconds = _engine_seconds(device, long) - _engine_seconds(device, short)
        engine.append((long - short) / seconds)
        bare.append((long - short) / _bare_seconds(device, short, long - short))
    return {"task": dict(ENGINE_SETTINGS), "steps": [short, long], "rounds": rounds,
            "engine_steps_per_s": engine, "bare_steps_per_s": bare,
            "engine_overhead_ratio": statistics.median(engine) / statistics.median(bare)}


# ------------------------------------------------------------------ report
def environment(device: torch.device) -> dict:
    from .run.rundir import environment as machine

    kernels = cpu_kernels.load()
    return {**machine(device), "kernels": str(kernels.path) if kernels else cpu_kernels.load_error(),
            "kernel_compile_seconds": cpu_kernels.fresh_compile_seconds() if kernels else None}


def _fmt(s: dict) -> str:
    return f"{s['median_ms']:9.2f} ({s['min_ms']:.2f}-{s['max_ms']:.2f})"


def print_table(result: dict) -> None:
    print(f"\nAdamWPrune bench on {result['environment']['device']} "
          f"({result['environment']['torch_threads']} threads, torch {result['environment']['torch']}); "
          "times in ms: median (min-max)")
    for name, r in result["shapes"].items():
        print(f"\n{name}: {r['parameters']:,} parameters")
        print(f"  {'method':18s} {'step, ramp':>24s} {'step, after':>24s} {'ratio':>6s} "
              f"{'after':>6s} {'update':>24s} {'mask upd':>8s} {'+B/param':>8s}")
        for method, s in r["steps"].items():
            ratio = r["step_ratio_vs_adamw"].get(f"{method}_ramp", 1.0)
            after = r["step_ratio_vs_adamw"].get(f"{method}_after", 1.0)
            frac = r["mask_update_fraction"].get(method)
            extra = r["extra_state_bytes_per_param"].get(method, 0.0)
            update = _fmt(s["update"]) if "update" in s else ""
            print(f"  {method:18s} {_fmt(s['ramp']):>24s} {_fmt(s['after']):>24s} {ratio:6.3f} "
                  f"{after:6.3f} {update:>24s} {'' if frac is None else f'{100 * frac:7.2f}%':>8s} "
                  f"{extra:8.3f}")
        for method, s in r["hooks"].items():
            print(f"  {method} forward/backward hooks: {_fmt(s)} ms per step -> ratio with hooks "
                  f"{r['step_ratio_vs_adamw'][f'{method}_with_hooks']:.3f}")
        print(f"  sparsity after the ramp (target {TARGET}): " + ", ".join(
            f"{k} {v:.4f}" for k, v in r["sparsity_after_ramp"].items())
              + "; AdamWPrune's updates: " + ", ".join(
                  f"{k} {dict(v)}" for k, v in r["update_paths"].items()))
        if "achieved_bandwidth_gbps" in r:
            print("  achieved bandwidth (28 B/param): " + ", ".join(
                f"{k} {v:.0f} GB/s" for k, v in r["achieved_bandwidth_gbps"].items()))
    if "engine" in result:
        e = result["engine"]
        print(f"\nengine: {statistics.median(e['engine_steps_per_s']):.1f} steps/s vs bare loop "
              f"{statistics.median(e['bare_steps_per_s']):.1f} steps/s -> ratio "
              f"{e['engine_overhead_ratio']:.3f}")


def headline(result: dict) -> dict:
    """The four figures the issue asks for, per shape set where they depend on it."""
    shapes = result["shapes"]
    out = {"step_ratio_vs_adamw": {k: v["step_ratio_vs_adamw"] for k, v in shapes.items()},
           "extra_state_bytes_per_param": {k: v["extra_state_bytes_per_param"]
                                           for k, v in shapes.items()},
           "mask_update_fraction": {k: v["mask_update_fraction"] for k, v in shapes.items()}}
    if "engine" in result:
        out["engine_overhead_ratio"] = result["engine"]["engine_overhead_ratio"]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adamwprune.bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="gpt2,resnet18",
                   help="comma list of: " + ", ".join(shape_models()))
    p.add_argument("--repeats", type=int, default=15, help="timed steps per method and phase")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--plain", action="store_true",
                   help="also time AdamWPrune's plain path (fast=False)")
    p.add_argument("--engine-steps", default="50,450", help="short,long engine runs (0,0 to skip)")
    p.add_argument("--engine-rounds", type=int, default=5)
    p.add_argument("--inference-models", default="gpt2,resnet18",
                   help="sparse_inference_speedup section (adamwprune.inference.bench); '' skips it")
    p.add_argument("--inference-repeats", type=int, default=7)
    p.add_argument("--inference-sparsities", default="0.5,0.7,0.9,0.95")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    interval = _engine_cfg(device, 1).prune_interval  # Kconfig's default PRUNING_INTERVAL
    result = {"environment": environment(device), "interval": interval, "shapes": {}}
    for name in [s for s in args.shapes.split(",") if s]:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        result["shapes"][name] = bench_shapes(name, device, interval, args.repeats, args.warmup,
                                              args.plain)
    short, long = (int(x) for x in args.engine_steps.split(","))
    if long > short > 0:
        print("[bench] engine ...", file=sys.stderr, flush=True)
        result["engine"] = bench_engine(device, short, long, args.engine_rounds)
    inference = [m for m in args.inference_models.split(",") if m]
    if inference:
        from .inference import bench as inference_bench

        result["sparse_inference_speedup"] = inference_bench.synthetic(
            device, inference, [float(s) for s in args.inference_sparsities.split(",")],
            repeats=args.inference_repeats)
    if hasattr(os, "getloadavg"):
        result["environment"]["load_average_at_end"] = list(os.getloadavg())
    result = {**headline(result), **result}
    print_table(result)
    if inference:
        inference_bench.print_synthetic(result["sparse_inference_speedup"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
