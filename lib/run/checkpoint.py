"""Atomic checkpoints: last.pt (everything needed to resume) and best.pt (the model)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .atomic import write_atomic


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message says how to recover."""


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, then rename over `path`
    (a full disk is one DiskFullError line and leaves no temporary file)."""
    write_atomic(path, lambda fh: torch.save(obj, fh), binary=True)


def load(path: Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by save_atomic, with one clear error if it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there (was the run started? `make status` lists runs)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt files
        hint = ("delete it and `make continue` restarts the run from scratch" if path.name == "last.pt"
                else "delete it; it cannot be read")
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {str(exc)[:80]}); "
                              f"{hint}") from None


def load_weights(model, weights: dict, where: Path) -> None:
    """load_state_dict, with one line for names or shapes that do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or unexpected or shapes:
        from ..config.errors import ConfigError

        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]
        raise ConfigError(f"{where}: its weights do not fit the {type(model).__name__} model of the run: "
                          f"{', '.join(parts)} of {len(own)} names")
    model.load_state_dict(weights)
