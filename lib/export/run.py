"""`make export RUN=<run dir>`: a run's best model as plain, compressed and (GPT-2)
Hugging Face files, measured.

Writes ``<run>/export/``:

  model.safetensors        plain state_dict keys, masks squashed (the effective weights),
                           tied tensors once (``safetensors.torch.load_model`` re-ties them)
  compressed/              the compressed-tensors copy: model.safetensors + config.json
  hf/                      GPT-2 only: a GPT2LMHeadModel folder (+ tokenizer for BPE data)
  export.json              bytes of every file and ratio to dense fp32, non-zeros and
                           sparsity per tensor, FLOPs per example (dense, non-zero), and
                           the test metric re-evaluated from the exported files

The folder is assembled under a temporary name and renamed into place, so an
interrupted export leaves the previous one (or none), never half of one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..run import checkpoint as ckpt
from ..config.kconfig import FIELDS, Config
from ..run.atomic import replace_directory
from ..params import prunable_parameters
from ..run.rundir import read_json, read_jsonl, write_json_atomic
from . import compressed as ct

EXPORT_DIR = "export"


class ExportError(ValueError):
    """A run that cannot be exported; the message names what is missing and the fix."""


# ------------------------------------------------------------------ loading
def config_from_dict(saved: dict) -> Config:
    """The Config of a checkpoint; fields it predates read as None (their "off" value)."""
    return Config(**{f.name: saved.get(f.name) for f in FIELDS})


def load_best(run_dir: Path) -> tuple[dict, Config]:
    best = Path(run_dir) / "best.pt"
    if not best.is_file():
        raise ExportError(f"{run_dir}: no best.pt to export (a run writes it at its first evaluation "
                          "at the final sparsity; finish the run with `make continue DIR=<run dir>`)")
    state = ckpt.load(best)
    return state, config_from_dict(state["config"])


def build_model(task, cfg: Config, weights: dict[str, torch.Tensor]) -> nn.Module:
    model = task.build_model(cfg)
    model.load_state_dict(weights)
    return model.eval()


def unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state_dict with each shared tensor once, and {dropped name: kept name}
    (GPT-2's lm_head.weight is transformer.wte.weight; safetensors refuses shared tensors)."""
    state, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        state[name] = tensor.detach().cpu().contiguous()
    return state, aliases


def load_exported(model: nn.Module, path: os.PathLike) -> nn.Module:
    """Load an exported model.safetensors into ``model`` (tied tensors re-tied)."""
    from safetensors.torch import load_model

    load_model(model, str(path), strict=True)
    return model


# --------------------------------------------------------------- measuring
def eval_device(run_dir: Path, cfg: Config) -> torch.device:
    """The run's device type where this machine has it (so the metric can match), else CPU."""
    env = read_json(Path(run_dir) / "env.json") or {}
    on_cuda = str(env.get("device", cfg.device or "cpu")).startswith("cuda")
    return torch.device("cuda" if on_cuda and torch.cuda.is_available() else "cpu")


def evaluate(task, cfg: Config, model: nn.Module, data, device: torch.device,
             run_dir: Path) -> tuple[float, float]:
    """(loss, metric) on the test split, computed as the training engine computes it."""
    from ..engine.trainer import Trainer

    trainer = Trainer(task, cfg, Path(run_dir))
    trainer.device, trainer.data, trainer.model = device, data, model.to(device)
    use_amp = bool(cfg.amp) and device.type == "cuda"
    trainer.amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    result = trainer.evaluate(data.test)
    model.eval()
    return result


def run_test_metric(run_dir: Path, step: int) -> Optional[float]:
    """The test metric the run logged at the checkpoint's step."""
    rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r.get("step") == step]
    if rows:
        return rows[-1].get("test_metric")
    final = read_json(Path(run_dir) / "final.json") or {}
    return final.get("test_metric_at_best")


def tensor_table(state: dict[str, torch.Tensor], prunable: set[str]) -> dict[str, dict]:
    table = {}
    for name, t in state.items():
        nonzero = int(torch.count_nonzero(t))
        table[name] = {"shape": list(t.shape), "numel": t.numel(), "nonzero": nonzero,
                       "sparsity": 1.0 - nonzero / t.numel() if t.numel() else 0.0,
                       "prunable": name in prunable}
    return table


def dense_fp32_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the state as dense fp32 (integer buffers at their own size)."""
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in state.values())


def file_table(folder: Path, dense_bytes: int) -> dict[str, dict]:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size,
                                         "ratio_to_dense_fp32": p.stat().st_size / dense_bytes}
            for p in sorted(folder.rglob("*")) if p.is_file()}


_PACKED = ("shape", "compressed", "bitmask", "row_offsets")


def compressed_bytes_of(folder: Path, names: list[str]) -> int:
    """Bytes the compressed file spends on the tensors ``names`` (packed or left dense)."""
    from safetensors import safe_open

    modules = {n[: -len(".weight")] for n in names}
    total = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            owner, _, leaf = key.rpartition(".")
            if (owner in modules and leaf in _PACKED) or key in names:
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------ export
BPE_DATASETS = ("text", "finewebedu")  # tokenized with tiktoken's GPT-2 BPE


def export_run(run_dir: os.PathLike, quiet: bool = False) -> dict:
    """Export a run's best.pt into ``<run>/export/``; returns what export.json holds."""
    from ..engine.tasks import load_task

    run_dir = Path(run_dir)
    state, cfg = load_best(run_dir)
    task = load_task(cfg.model)
    model = build_model(task, cfg, state["model"])
    weights, aliases = unique_state(model)
    prunable = [n for n, _, _ in prunable_parameters(model, bool(cfg.prune_embeddings))]
    tmp = run_dir / f".{EXPORT_DIR}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        written = _write_files(tmp, run_dir, cfg, state, model, weights, aliases, prunable)
        report = _measure(tmp, run_dir, task, cfg, state, weights, prunable, written)
        write_json_atomic(tmp / "export.json", report)
        replace_directory(tmp, run_dir / EXPORT_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print_report(report, run_dir / EXPORT_DIR)
    return report


def _write_files(tmp: Path, run_dir: Path, cfg: Config, state: dict, model: nn.Module,
                 weights: dict, aliases: dict, prunable: list[str]) -> dict:
    import json

    from safetensors.torch import save_file

    save_file(weights, str(tmp / "model.safetensors"),
              metadata={"format": "pt", "model": cfg.model, "aliases": json.dumps(aliases)})
    pattern, why = ct.choose_pattern(state["config"], {n: weights[n] for n in prunable})
    info = ct.write_compressed(weights, prunable, tmp / "compressed", pattern, aliases,
                               extra={"model": cfg.model, "checkpoint_step": state["step"]})
    written = {"pattern": {"name": pattern, "source": why}, "compressed": info, "hf": None}
    from ..models.gpt2 import GPT

    if isinstance(model, GPT):
        from .hf_gpt2 import save_hf

        bpe = cfg.dataset in BPE_DATASETS
        _quiet_transformers()
        save_hf(model, tmp / "hf", tokenizer=bpe)
        written["hf"] = {"folder": "hf", "class": "GPT2LMHeadModel", "tokenizer": bpe}
    return written


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _measure(tmp: Path, run_dir: Path, task, cfg: Config, state: dict, weights: dict,
             prunable: list[str], written: dict) -> dict:
    from ..report.flops import example_flops

    device = eval_device(run_dir, cfg)
    data = task.build_data(cfg)
    exported = load_exported(task.build_model(cfg), tmp / "model.safetensors").eval()
    metrics = {"exported": evaluate(task, cfg, exported, data, device, run_dir)[1]}
    full = exported.state_dict()
    restored = ct.read_compressed(tmp / "compressed")
    identical = set(restored) == set(full) and all(
        torch.equal(restored[k].cpu(), full[k].cpu()) for k in full)
    decompressed = build_model(task, cfg, restored)
    metrics["decompressed"] = evaluate(task, cfg, decompressed, data, device, run_dir)[1]
    hf = None
    if written["hf"] is not None:
        hf = dict(written["hf"], **_hf_check(tmp / "hf", exported, task, cfg, data, device, run_dir))
        metrics["hf"] = hf.pop("test_metric")
    flops = example_flops(task, exported.cpu(), data.test, cfg, bool(cfg.prune_embeddings))
    return _report(tmp, run_dir, task, cfg, state, weights, prunable, written, metrics,
                   identical, flops, hf, device)


def _report(tmp, run_dir, task, cfg, state, weights, prunable, written, metrics, identical,
            flops, hf, device) -> dict:
    dense = dense_fp32_bytes(weights)
    pr_dense = 4 * sum(weights[n].numel() for n in prunable)
    pr_packed = compressed_bytes_of(tmp / "compressed", prunable)
    pr_nonzero = sum(int(torch.count_nonzero(weights[n])) for n in prunable)
    run_metric = run_test_metric(run_dir, state["step"])
    values = [run_metric, *metrics.values()]
    return {
        "run": str(run_dir), "model": cfg.model, "checkpoint_step": state["step"],
        "pattern": written["pattern"], "compressed_format": written["compressed"],
        "dense_fp32_bytes": dense, "files": file_table(tmp, dense),
        "prunable": {"tensors": len(prunable), "params": pr_dense // 4, "nonzero": pr_nonzero,
                     "sparsity": 1 - pr_nonzero / max(1, pr_dense // 4),
                     "dense_fp32_bytes": pr_dense, "compressed_bytes": pr_packed,
                     "compressed_ratio_to_dense_fp32": pr_packed / max(1, pr_dense)},
        "tensors": tensor_table(weights, set(prunable)),
        "flops_per_example": {**flops.to_dict(), "nonzero_over_dense": flops.nonzero / max(1, flops.dense)},
        "test_metric": {"name": task.metric_name, "run": run_metric, **metrics,
                        "device": str(device), "all_equal": len(set(values)) == 1},
        "round_trip": {"decompressed_tensors_identical": identical},
        "hf": hf,
    }


class _HFAdapter(nn.Module):
    """A GPT2LMHeadModel behind our GPT's forward(idx, targets) -> (logits, loss)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, idx, targets=None):
        import torch.nn.functional as F

        logits = self.hf(idx).logits
        loss = None if targets is None else F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


def _hf_check(folder: Path, model: nn.Module, task, cfg, data, device, run_dir) -> dict:
    """Load the HF folder as a user would (offline) and compare it with our model."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True).eval()
    x, _ = next(iter(task.eval_batches(data.test, cfg, 0, 1)))
    with torch.no_grad():
        ours = model.cpu()(x)[0]
        theirs = hf(x).logits
    diff = float((ours - theirs).abs().max())
    metric = evaluate(task, cfg, _HFAdapter(hf), data, device, run_dir)[1]
    return {"logits_max_abs_diff": diff, "logits_checked_on": list(x.shape), "test_metric": metric}


def print_report(report: dict, folder: Path) -> None:
    m, pr = report["test_metric"], report["prunable"]
    files = report["files"]
    print(f"exported {report['run']} (step {report['checkpoint_step']}) to {folder}")
    for name, f in files.items():
        print(f"  {name:32s} {f['bytes']:>12,d} B  {f['ratio_to_dense_fp32']:.3f}x dense fp32")
    print(f"  prunable tensors: sparsity {100 * pr['sparsity']:.2f}%, compressed "
          f"{pr['compressed_ratio_to_dense_fp32']:.3f}x their dense fp32 "
          f"({report['compressed_format']['format']}, pattern {report['pattern']['name']}: "
          f"{report['pattern']['source']})")
    fl = report["flops_per_example"]
    print(f"  FLOPs per example: {fl['dense']:,} dense, {fl['nonzero']:,} non-zero "
          f"({fl['nonzero_over_dense']:.3f}x)")
    others = ", ".join(f"{k} {m[k]:.6g}" for k in ("exported", "decompressed", "hf") if k in m)
    print(f"  test {m['name']}: run {m['run']}, re-evaluated on {m['device']}: {others} -> "
          + ("equal" if m["all_equal"] else "NOT equal"))
    if report["hf"]:
        print(f"  transformers GPT2LMHeadModel.from_pretrained('{folder / 'hf'}'): logits max |diff| "
              f"{report['hf']['logits_max_abs_diff']:.3g} against ours")
