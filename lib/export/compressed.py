"""The compressed copy of an export, in the compressed-tensors formats.

* ``sparse-bitmask`` (unstructured): per tensor the non-zero values, a bitmask
  (1 bit per entry, packed along rows) and one row offset per row.
* ``sparse-24-bitmask`` (2:4): per tensor exactly half the values (two of every
  group of four along the reduction dimension) and the same bitmask.

Both are written by the ``compressed-tensors`` package itself into
``model.safetensors``, with its configuration (``quantization_config`` /
``sparsity_config``, as ``ModelCompressor.update_config`` writes it) in
``config.json``. A tensor of more than two dimensions (a Conv2d weight
``[out, in, kh, kw]``) is compressed as its ``[out, in*kh*kw]`` matrix: those are
the rows along which both formats pack (row offsets of a 4-D tensor would be one
8-byte integer per kernel row, more than the weights), and for 2:4 the groups run
along the flattened reduction dimension as the pattern defines. ``config.json``
keeps each such tensor's shape under ``adamwprune.shapes``, and names the tensors
left out because they are tied to another (``adamwprune.aliases``).
:func:`read_compressed` gives back the dense state_dict, bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

FORMATS = {"unstructured": "sparse-bitmask", "2:4": "sparse-24-bitmask"}
# A model whose 2:4-eligible tensors all have >= 2 zeros in every group of 4 is read as a
# 2:4 model only up to this sparsity: beyond it the pattern can hold by chance (a small
# model at 95 % unstructured) and sparse-bitmask is the smaller file anyway.
INFER_24_MAX_SPARSITY = 0.6


def matrix(t: torch.Tensor) -> torch.Tensor:
    """The 2-D view both formats pack: rows are output units, columns the reduction."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def two_four_eligible(t: torch.Tensor) -> bool:
    """A tensor the 2:4 pattern applies to: its reduction dimension is a multiple of 4."""
    return t.dim() >= 2 and matrix(t).shape[1] % 4 == 0


def follows_two_four(t: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive entries along the reduction."""
    groups = matrix(t).reshape(-1, 4)
    return bool(((groups != 0).sum(dim=1) <= 2).all())


def choose_pattern(run_config: dict, prunable: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(pattern, why): the run's configured pattern where it names one, else read from
    the weights (see INFER_24_MAX_SPARSITY)."""
    named = run_config.get("pattern")
    if named:
        return str(named), "named by the run's configuration"
    eligible = [t for t in prunable.values() if two_four_eligible(t)]
    if eligible:
        zeros = sum(int((t == 0).sum()) for t in eligible)
        sparsity = zeros / sum(t.numel() for t in eligible)
        if sparsity <= INFER_24_MAX_SPARSITY and all(follows_two_four(t) for t in eligible):
            return "2:4", "read from the weights: every group of 4 has at least 2 zeros"
    return "unstructured", "read from the weights (no 2:4 structure)"


def _config(pattern: str, targets: list[str], ignore: list[str], sparsity: float):
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    if pattern == "2:4":
        return Sparse24BitMaskConfig(targets=targets, ignore=ignore, global_sparsity=sparsity,
                                     sparsity_structure="2:4")
    # N:M other than 2:4 has no format of its own: the bitmask holds any pattern.
    return BitmaskConfig(targets=targets, ignore=ignore or None, global_sparsity=sparsity,
                         sparsity_structure=pattern)


def write_compressed(state: dict[str, torch.Tensor], prunable: list[str], folder: Path,
                     pattern: str, aliases: Optional[dict[str, str]] = None,
                     extra: Optional[dict] = None) -> dict:
    """Compress the prunable weights of ``state`` (dense tensors, no tied duplicates) into
    ``folder``; returns what was written (format, targets, shapes)."""
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from safetensors.torch import save_file

    if pattern == "2:4":
        targets = [n for n in prunable if two_four_eligible(state[n]) and follows_two_four(state[n])]
    else:
        targets = list(prunable)
    ignore = [n[: -len(".weight")] for n in prunable if n not in targets]
    shapes = {n: list(state[n].shape) for n in targets if state[n].dim() != 2}
    flat = {n: (matrix(t).contiguous() if n in shapes else t.contiguous()) for n, t in state.items()}
    numel = sum(state[n].numel() for n in targets)
    sparsity = sum(int((state[n] == 0).sum()) for n in targets) / numel if numel else 0.0
    config = _config(pattern, [n[: -len(".weight")] for n in targets], ignore, sparsity)
    compressor = BaseCompressor.load_from_registry(config.format, config=config)
    packed = compressor.compress(flat, compression_targets={n[: -len(".weight")] for n in targets})
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in packed.items()}, str(folder / "model.safetensors"))
    ModelCompressor(sparsity_config=config).update_config(str(folder))
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["adamwprune"] = {"shapes": shapes, "aliases": aliases or {}, **(extra or {})}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return {"format": config.format, "targets": len(targets), "left_dense": ignore,
            "sparsity_of_targets": sparsity}


def read_compressed(folder: Path) -> dict[str, torch.Tensor]:
    """The dense state_dict of a folder written by :func:`write_compressed` (tied
    tensors restored as the same tensor under each name)."""
    from compressed_tensors.compressors import ModelCompressor

    folder = Path(folder)
    data = json.loads((folder / "config.json").read_text())
    compressor = ModelCompressor.from_compression_config(data["quantization_config"])
    state = dict(compressor.sparsity_compressor.decompress(str(folder)))
    ours = data.get("adamwprune", {})
    for name, shape in ours.get("shapes", {}).items():
        state[name] = state[name].reshape(shape)
    for alias, name in ours.get("aliases", {}).items():
        state[alias] = state[name]
    return state
