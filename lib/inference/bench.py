"""Forward latency of pruned models, dense against sparse, on the current device.

* ``make bench`` (section ``sparse_inference_speedup``, from :func:`synthetic`):
  synthetic weights of the GPT-2 124M and ResNet-18 shapes, each prunable tensor
  pruned to 50/70/90/95 % (its smallest |w|). Per GPT-2 Linear shape, the layer
  alone: dense ``F.linear`` against the sparse kernel (and torch's CSR product, the
  baseline); per model, the whole forward: dense against ``sparsify``'s choice
  (GPT-2: Linear layers by sparsity; ResNet-18: every layer by measurement). Batch
  1 and 512 tokens (GPT-2) or 128 images (ResNet-18).
* ``make bench-inference RUN=<run dir>`` (:func:`bench_run`): the run's exported (or
  best) model the same way; results in ``<run>/inference.json``.

Times are medians of ``repeats`` forwards after ``warmup``, dense and sparse taken in
turn so load from other processes falls on both. Peak memory: the peak resident set
(Linux VmHWM) of a forward in a child process that holds only that form of the model,
with the resident set just before it, and the bytes of the weights themselves.
On a CUDA GPU of compute capability >= 8.0 the Linear shapes are also timed with
2:4 semi-structured weights in bf16 (``semi_structured.py``).
"""
from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..params import prunable_parameters
from .sparse_linear import SparseLinear
from .sparsify import sparsify

SPARSITIES = (0.5, 0.7, 0.9, 0.95)


# ------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
          device: torch.device) -> dict[str, dict]:
    """Median/min/max ms of each fn, taken in turn (one call of each per round)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(1e3 * (time.perf_counter() - start))
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "n": len(v)}
            for k, v in samples.items()}


def _peak_rss() -> Optional[int]:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss() -> Optional[int]:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else None


def memory_child(spec: dict) -> dict:
    """In a fresh process (see :func:`peak_memory`): build the model of ``spec`` in one
    form, run one forward per batch, and return the resident set before it and at its peak."""
    import gc

    model = _model_from_source(spec["source"])
    if spec["swap"] is not None:
        _swap(model, set(spec["swap"]))
    gc.collect()
    out = {}
    with torch.no_grad():
        for batch in spec["batches"]:
            x = example_input(model, spec["kind"], batch)
            model(x)  # first call: kernel loading, allocator warm-up
            before = _rss()
            _reset_peak(torch.device("cpu"))
            model(x)
            out[str(batch)] = {"rss_before_forward_bytes": before, "peak_rss_bytes": _peak_rss()}
    return out


def peak_memory(source: dict, kind: str, batches: list[int], swap: Optional[list[str]]) -> dict:
    """Peak resident memory of a forward, per batch, measured in a child process that
    holds only this form of the model (dense, or with the ``swap`` layers sparse). glibc's
    mmap threshold is fixed so freed tensors leave the resident set at once."""
    import json
    import os
    import subprocess

    spec = {"source": source, "kind": kind, "batches": batches, "swap": swap}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run([sys.executable, "-m", "adamwprune.inference.bench", "--memory-child",
                           json.dumps(spec)], capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode:
        return {str(b): {"error": done.stderr.strip()[-300:]} for b in batches}
    return json.loads(done.stdout.strip().splitlines()[-1])


def module_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights as stored (dense tensors, or CSR values + indices)."""
    seen, total = set(), 0
    for m in model.modules():
        csr = getattr(m, "weight_csr", None)
        if csr is not None:
            total += csr.nbytes()
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- weights
@torch.no_grad()
def prune_smallest(weight: torch.Tensor, sparsity: float) -> None:
    """Zero exactly round(sparsity * numel) entries of smallest |w| (ties by index)."""
    k = round(sparsity * weight.numel())
    if k:
        order = torch.argsort(weight.abs().flatten(), stable=True)
        weight.view(-1)[order[:k]] = 0


@torch.no_grad()
def prune_model(model: nn.Module, sparsity: float) -> nn.Module:
    for _, _, p in prunable_parameters(model):
        prune_smallest(p, sparsity)
    return model


# ------------------------------------------------------------- the models
def _gpt(preset: str):
    def build():
        from ..models.gpt2 import GPT, gpt_config

        return GPT(gpt_config(preset))
    return build


def _resnet18():
    from ..models.resnet import resnet18_cifar

    return resnet18_cifar(num_classes=10)


def _lenet5():
    from ..models.lenet5 import LeNet5

    return LeNet5()


# name -> (build, kind, batch sizes); kind "tokens": batch = tokens, "images": images.
MODELS: dict[str, tuple[Callable[[], nn.Module], str, tuple[int, int]]] = {
    "gpt2": (_gpt("gpt2"), "tokens", (1, 512)),
    "resnet18": (_resnet18, "images", (1, 128)),
    "gpt2-mini": (_gpt("mini"), "tokens", (1, 512)),
    "lenet5": (_lenet5, "images", (1, 128)),
}


def example_input(model: nn.Module, kind: str, batch: int, seed: int = 0) -> torch.Tensor:
    """tokens: ``batch`` tokens as sequences of up to block_size; images: ``batch`` images."""
    g = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        seq = min(batch, model.config.block_size)
        return torch.randint(0, model.config.vocab_size, (max(1, batch // seq), seq), generator=g)
    size = getattr(model, "input_size", 32)
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    return torch.randn(batch, channels, size, size, generator=g)


def gpt_linear_shapes(n_embd: int) -> dict[str, tuple[int, int]]:
    """(out, in) of a GPT-2 block's Linear layers."""
    c = n_embd
    return {"attn.c_attn": (3 * c, c), "attn.c_proj": (c, c), "mlp.c_fc": (4 * c, c),
            "mlp.c_proj": (c, 4 * c)}


# -------------------------------------------------------------- measuring
def _ratio(times: dict, base: str, other: str) -> float:
    return times[base]["median_ms"] / times[other]["median_ms"]


@torch.no_grad()
def bench_linear(shape: tuple[int, int], sparsity: float, tokens: int, repeats: int,
                 warmup: int) -> dict:
    """One Linear layer on the CPU: dense, the sparse kernel, torch's CSR product."""
    out_f, in_f = shape
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    prune_smallest(lin.weight, sparsity)
    sparse, baseline = SparseLinear(lin), SparseLinear(lin, use_kernel=False)
    x = torch.randn(tokens, in_f)
    times = timed({"dense": lambda: lin(x), "sparse": lambda: sparse(x),
                   "torch_csr": lambda: baseline(x)}, repeats, warmup, torch.device("cpu"))
    return {"times": times, "speedup": _ratio(times, "dense", "sparse"),
            "torch_csr_speedup": _ratio(times, "dense", "torch_csr"), "sparse_path": sparse.path,
            "weight_bytes": {"dense": lin.weight.numel() * 4, "sparse": sparse.weight_csr.nbytes()}}


@torch.no_grad()
def bench_model(source: dict, kind: str, batches: tuple[int, ...], device: torch.device,
                repeats: int, warmup: int) -> dict:
    """Whole forward, dense against sparsify's choice, per batch size (CPU); ``source``
    says how to build the model ({"model": name, "sparsity": s} or {"run": dir})."""
    dense = _model_from_source(source).to(device)
    out, sparse_by_sparsity = {}, None
    for batch in batches:
        x = example_input(dense, kind, batch).to(device)
        if kind == "images":  # convolutions: chosen by measurement on this input
            sparse = copy.deepcopy(dense)
            choices = sparsify(sparse, lambda: sparse(x))
        else:
            if sparse_by_sparsity is None:
                sparse_by_sparsity = copy.deepcopy(dense)
                choices = sparsify(sparse_by_sparsity)
            sparse = sparse_by_sparsity
        times = timed({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, repeats, warmup, device)
        out[str(batch)] = {
            "input_shape": list(x.shape), "times": times, "speedup": _ratio(times, "dense", "sparse"),
            "sparse_layers": sum(c.sparse for c in choices), "layers": len(choices),
            "swapped": [c.name for c in choices if c.sparse],
            "memory": {"dense": {"weights_bytes": module_bytes(dense)},
                       "sparse": {"weights_bytes": module_bytes(sparse)}}}
    _add_peaks(out, source, kind)
    return out


def _add_peaks(out: dict, source: dict, kind: str) -> None:
    """Peak memory per batch, one child process per form of the model."""
    forms = {"dense": {None: list(out)}, "sparse": {}}
    for batch, r in out.items():
        forms["sparse"].setdefault(tuple(r["swapped"]), []).append(batch)
    for form, groups in forms.items():
        for swap, batches in groups.items():
            peaks = peak_memory(source, kind, [int(b) for b in batches],
                                None if swap is None else list(swap))
            for b in batches:
                out[b]["memory"][form].update(peaks[b])


def _model_from_source(source: dict) -> nn.Module:
    if "run" in source:
        return _run_model(Path(source["run"]))[0]
    torch.manual_seed(0)
    return prune_model(MODELS[source["model"]][0](), source["sparsity"]).eval()


def _run_model(run_dir: Path):
    """(model, where its weights came from, cfg) of a run: export/model.safetensors, else best.pt."""
    from ..engine.tasks import load_task
    from ..export.run import EXPORT_DIR, build_model, load_best, load_exported

    state, cfg = load_best(run_dir)
    task = load_task(cfg.model)
    exported = Path(run_dir) / EXPORT_DIR / "model.safetensors"
    if exported.is_file():
        return load_exported(task.build_model(cfg), exported).eval(), str(exported), cfg
    return build_model(task, cfg, state["model"]), str(Path(run_dir) / "best.pt"), cfg


def _swap(model: nn.Module, names: set[str]) -> None:
    from .sparse_linear import SparseConv2d
    from .sparsify import _candidates

    for name, parent, child_name, child in _candidates(model):
        if name in names:
            make = SparseLinear if isinstance(child, nn.Linear) else SparseConv2d
            setattr(parent, child_name, make(child))


# ----------------------------------------------------------------- sections
def environment(device: torch.device) -> dict:
    from ..run.rundir import environment as machine
    from . import cpu_kernels, semi_structured

    kernels = cpu_kernels.load()
    return {**machine(device), "sparse_kernel": str(kernels.path) if kernels else cpu_kernels.load_error(),
            "two_four_gpu": semi_structured.available()[1]}


def synthetic(device: torch.device, models: list[str], sparsities=SPARSITIES, repeats: int = 7,
              warmup: int = 2) -> dict:
    """``make bench``'s section: Linear shapes and whole models at each sparsity."""
    from . import semi_structured

    result: dict = {"environment": environment(device), "sparsities": list(sparsities),
                    "linear": {}, "models": {}, "two_four_gpu": None}
    for name in models:
        build, kind, batches = MODELS[name]
        print(f"[bench] sparse inference: {name} ...", file=sys.stderr, flush=True)
        if kind == "tokens" and device.type == "cpu":
            n_embd = build().config.n_embd
            result["linear"][name] = {
                layer: {str(s): {str(t): bench_linear(shape, s, t, repeats, warmup) for t in batches}
                        for s in sparsities}
                for layer, shape in gpt_linear_shapes(n_embd).items()}
        if device.type == "cpu":
            result["models"][name] = {str(s): bench_model({"model": name, "sparsity": s}, kind,
                                                          batches, device, repeats, warmup)
                                      for s in sparsities}
        elif kind == "tokens" and semi_structured.available(device)[0]:
            n_embd = build().config.n_embd
            shapes = {k: v for k, v in gpt_linear_shapes(n_embd).items() if k.startswith("mlp")}
            result["two_four_gpu"] = {layer: {str(t): bench_two_four(
                shape, t, repeats, warmup) for t in (batches[1], 4 * batches[1])}
                for layer, shape in shapes.items()}
    result["headline"] = headline(result)
    return result


def headline(result: dict) -> dict:
    """Median speed-ups: per model, sparsity and batch (whole forward), and per GPT-2
    Linear shape at 90 %, the figures docs/performance.md quotes."""
    out = {"models": {m: {s: {b: r["speedup"] for b, r in per.items()} for s, per in by.items()}
                      for m, by in result["models"].items()}}
    out["linear_at_90"] = {m: {layer: {t: r["speedup"] for t, r in by["0.9"].items()}
                               for layer, by in shapes.items() if "0.9" in by}
                           for m, shapes in result["linear"].items()}
    if result.get("two_four_gpu"):
        out["two_four_gpu"] = {layer: {t: r["speedup"] for t, r in by.items()}
                               for layer, by in result["two_four_gpu"].items()}
    return out


def print_synthetic(result: dict) -> None:
    env = result["environment"]
    print(f"\nsparse inference on {env['device']} ({env['torch_threads']} threads); forward ms, "
          "median (min-max); speed-up = dense / sparse")
    for model, shapes in result["linear"].items():
        print(f"\n{model} Linear layers alone (dense | sparse kernel | torch CSR):")
        for layer, by in shapes.items():
            for s, per in by.items():
                cells = [f"{t} tok: {r['times']['dense']['median_ms']:.3f} | "
                         f"{r['times']['sparse']['median_ms']:.3f} | "
                         f"{r['times']['torch_csr']['median_ms']:.3f} -> {r['speedup']:.2f}x "
                         f"(CSR {r['torch_csr_speedup']:.2f}x)" for t, r in per.items()]
                print(f"  {layer:12s} {float(s):4.0%}  " + "   ".join(cells))
    for model, by in result["models"].items():
        print(f"\n{model} whole forward (dense -> sparse, layers swapped):")
        for s, per in by.items():
            print(f"  {float(s):4.0%}  " + "   ".join(_model_cell(b, r) for b, r in per.items()))
    if result.get("two_four_gpu"):
        print("\n2:4 semi-structured on the GPU (bf16):")
        for layer, by in result["two_four_gpu"].items():
            print(f"  {layer}: " + ", ".join(f"{t} tok {r['speedup']:.2f}x" for t, r in by.items()))


def _model_cell(batch: str, r: dict) -> str:
    t = r["times"]
    mem = r["memory"]
    peak = {k: v.get("peak_rss_bytes") for k, v in mem.items()}
    fmt = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB"
    return (f"batch {batch}: {t['dense']['median_ms']:.2f} -> {t['sparse']['median_ms']:.2f} ms "
            f"({r['speedup']:.2f}x, {r['sparse_layers']}/{r['layers']}), weights "
            f"{fmt(mem['dense']['weights_bytes'])} -> {fmt(mem['sparse']['weights_bytes'])}, "
            f"peak {fmt(peak['dense'])} -> {fmt(peak['sparse'])}")


# ---------------------------------------------------------------- one run
def bench_run(run_dir: Path, repeats: int = 7, warmup: int = 2) -> dict:
    """`make bench-inference RUN=`: the run's exported model (else best.pt), on the CPU."""
    from ..models.gpt2 import GPT
    from ..run.rundir import write_json_atomic

    model, source, cfg = _run_model(Path(run_dir))
    kind = "tokens" if isinstance(model, GPT) else "images"
    batches = (1, 512) if kind == "tokens" else (1, 128)
    device = torch.device("cpu")
    sparsity = 1 - sum(int(torch.count_nonzero(p)) for _, _, p in prunable_parameters(model)) / max(
        1, sum(p.numel() for _, _, p in prunable_parameters(model)))
    result = {"run": str(run_dir), "weights": source, "model": cfg.model,
              "prunable_sparsity": sparsity, "environment": environment(device),
              "batches": bench_model({"run": str(Path(run_dir).resolve())}, kind, batches, device,
                                     repeats, warmup)}
    write_json_atomic(Path(run_dir) / "inference.json", result)
    print(f"\n{cfg.model} from {source} (prunable sparsity {100 * sparsity:.2f}%), CPU, "
          f"{result['environment']['torch_threads']} threads:")
    for batch, r in result["batches"].items():
        print("  " + _model_cell(batch, r))
    print(f"wrote {Path(run_dir) / 'inference.json'}")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adamwprune.inference.bench", description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, help="a run directory (make bench-inference RUN=)")
    p.add_argument("--models", default="gpt2,resnet18", help="synthetic: " + ", ".join(MODELS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: see peak_memory
    args = p.parse_args(argv)
    if args.memory_child:
        import json

        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    try:
        if args.run is not None:
            bench_run(args.run, args.repeats, args.warmup)
            return 0
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # incl. CheckpointError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print_synthetic(synthetic(device, [m for m in args.models.split(",") if m], SPARSITIES,
                              args.repeats, args.warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())


@torch.no_grad()
def bench_two_four(shape: tuple[int, int], tokens: int, repeats: int, warmup: int,
                   dtype: torch.dtype = torch.bfloat16) -> dict:
    """One Linear layer on the GPU in ``dtype``: dense against 2:4 semi-structured."""
    from torch.sparse import to_sparse_semi_structured

    from .semi_structured import to_two_four

    device = torch.device("cuda")
    out_f, in_f = shape
    torch.manual_seed(0)
    w = to_two_four(torch.randn(out_f, in_f, device=device)).to(dtype)
    packed = to_sparse_semi_structured(w)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    err = (F.linear(x, packed) - F.linear(x, w)).abs().max().item()
    times = timed({"dense": lambda: F.linear(x, w), "two_four": lambda: F.linear(x, packed)},
                  repeats, warmup, device)
    return {"times": times, "speedup": times["dense"]["median_ms"] / times["two_four"]["median_ms"],
            "max_abs_diff_vs_dense": err, "dtype": str(dtype).replace("torch.", "")}
