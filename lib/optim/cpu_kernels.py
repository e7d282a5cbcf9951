"""Binding of AdamWPrune's fused CPU kernels (``adamwprune/native/adamwprune.c``).

The C source says what each kernel does; :mod:`adamwprune.native` compiles it once
per machine. :func:`load` returns the bound library, or None (and :func:`load_error`
says why) where no C compiler or OpenMP works; the optimizer then takes its plain
path.
"""
from __future__ import annotations

import ctypes
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from adamwprune import native

# Flag bits of a tensor in the adam_* kernels.
MASKED, AMSGRAD, COUPLED, MAXIMIZE, STEP_F64, PRUNABLE = 1, 2, 4, 8, 16, 32
NBINS = 65536
HYPER = 6  # doubles per group in `hyper`: lr, beta1, beta2, eps, weight_decay, gradient scale
PTRS_PER_TENSOR = 6  # adam_*: w, g, m, v, max_exp_avg_sq or 0, step; prune_*: w, m, v, 3 more
CODE_BITS = 40  # a candidate or undo entry is (prunable tensor ordinal << 40) | index
# N:M groups the kernels take: M divides their 512-entry sub-blocks, at most 64.
NM_GROUPS = (2, 4, 8, 16, 32, 64)


def _addr(buf) -> int:
    return buf.buffer_info()[0] if isinstance(buf, array) else buf.data_ptr()


@dataclass(frozen=True)
class Kernels:
    """The loaded library; ``compile_seconds`` is 0.0 when it came from the cache."""

    lib: ctypes.CDLL
    path: Path
    compile_seconds: float

    def _fn(self, name: str, dtype: torch.dtype):
        return getattr(self.lib, f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")

    def undo_bytes(self, dtype: torch.dtype) -> int:
        return int(self._fn("undo_bytes", dtype)())

    def adam_step(self, dtype: torch.dtype, ptrs: array, numel: array, hyper: array,
                  group: array, flags: array) -> None:
        """One Adam(W) step of ``len(numel)`` tensors (layout in the C source)."""
        if self._fn("adam_step", dtype)(len(numel), _addr(ptrs), _addr(numel), _addr(hyper),
                                        _addr(group), _addr(flags), torch.get_num_threads()):
            raise MemoryError("adam_step could not allocate its work list")

    def masked_sqnorm(self, dtype: torch.dtype, ptrs: array, numel: array, flags: array) -> float:
        """Sum of squares of the masked gradients (zeroed in memory where pruned)."""
        total = self._fn("masked_sqnorm", dtype)(len(numel), _addr(ptrs), _addr(numel),
                                                 _addr(flags), torch.get_num_threads())
        if total < 0:
            raise MemoryError("masked_sqnorm could not allocate its work list")
        return float(total)

    def adam_sample(self, dtype: torch.dtype, ptrs: array, numel: array, hyper: array,
                    group: array, flags: array, variant: int, total: int,
                    nblocks: int) -> tuple[array, int]:
        """Keys of the next step's scores at ``nblocks`` runs of 16 entries (unsorted),
        and how many of them are 0 (already pruned)."""
        out, zeros = array("Q", bytes(8 * 16 * nblocks)), array("q", [0])
        n = self._fn("adam_sample", dtype)(len(numel), _addr(ptrs), _addr(numel), _addr(hyper),
                                           _addr(group), _addr(flags), variant, total, nblocks,
                                           _addr(out), _addr(zeros), torch.get_num_threads())
        if n < 0:
            raise MemoryError("adam_sample could not allocate its run table")
        del out[n:]
        return out, zeros[0]

    def kth(self, keys: array, k: int) -> int:
        """The k-th smallest (0-based) of ``keys`` (reorders them)."""
        return int(self.lib.kth_u64(_addr(keys), len(keys), k))

    def adam_step_prune(self, dtype: torch.dtype, ptrs: array, numel: array, hyper: array,
                        group: array, flags: array, ordinal: array, variant: int, lo: int,
                        hi: int, undo: torch.Tensor, cap_undo: int, cand: torch.Tensor,
                        cap_cand: int) -> list[int]:
        """The fused step; returns [already pruned, zeroed, candidates, overflow, stored]."""
        stats = array("q", [0, 0, 0, 0, 0])
        if self._fn("adam_step_prune", dtype)(
                len(numel), _addr(ptrs), _addr(numel), _addr(hyper), _addr(group), _addr(flags),
                _addr(ordinal), variant, lo, hi, _addr(undo), cap_undo, _addr(cand), cap_cand,
                _addr(stats), torch.get_num_threads()):
            raise MemoryError("adam_step_prune could not allocate its lists")
        return stats.tolist()

    def prune_finish(self, dtype: torch.dtype, pptrs: array, cand: torch.Tensor, n_cand: int,
                     r: int, lo: int, hi: int, undo: torch.Tensor, n_undo: int,
                     restore: bool) -> bool:
        """Zero the r smallest candidates (False if that would reach a NaN score: nothing
        done), or restore the undo log."""
        nan_key = (1 << 64) - 1 if dtype == torch.float64 else (1 << 32) - 1
        status = self._fn("prune_finish", dtype)(_addr(pptrs), _addr(cand), n_cand, r, lo, hi,
                                                 _addr(undo), n_undo, int(restore), nan_key,
                                                 torch.get_num_threads())
        if status < 0:
            raise MemoryError("prune_finish could not allocate its histogram")
        return status == 0

    def prune_hist(self, dtype: torch.dtype, ptrs: array, numel: array, eps: array,
                   variant: int) -> torch.Tensor:
        """Histogram (int64[NBINS]) of the score keys' top 16 bits; bin 0 = already pruned."""
        hist = torch.zeros(NBINS, dtype=torch.int64)
        if self._fn("prune_hist", dtype)(len(numel), _addr(ptrs), _addr(numel), _addr(eps),
                                         variant, _addr(hist), torch.get_num_threads()):
            raise MemoryError("prune_hist could not allocate its histograms")
        return hist

    def nm_hist(self, dtype: torch.dtype, ptrs: array, numel: array, eps: array, offsets: array,
                variant: int, n: int, m: int, bins: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Histogram of the top 16 bits of every N:M group's cost key; bin 0 = groups
        already N:M. ``bins`` (int16, one per group, or None): each group's bin, for
        nm_apply."""
        hist = torch.zeros(NBINS, dtype=torch.int64)
        status = self._fn("nm_hist", dtype)(len(numel), _addr(ptrs), _addr(numel), _addr(eps),
                                           _addr(offsets), variant, n, m, _addr(hist),
                                           0 if bins is None else _addr(bins),
                                           torch.get_num_threads())
        if status == -2:
            raise ValueError(f"groups of {m} are not in the kernels' range {NM_GROUPS}")
        if status:
            raise MemoryError("nm_hist could not allocate its histograms")
        return hist

    def nm_apply(self, dtype: torch.dtype, ptrs: array, numel: array, eps: array,
                 offsets: array, variant: int, n: int, m: int, bin_: int, ncand: int,
                 r: int, bins: Optional[torch.Tensor] = None) -> None:
        """Make N:M every group below ``bin_`` and the ``r`` cheapest of its ``ncand``;
        with nm_hist's ``bins`` only those groups are scored again."""
        found = self._fn("nm_apply", dtype)(len(numel), _addr(ptrs), _addr(numel), _addr(eps),
                                            _addr(offsets), variant, n, m, bin_, ncand, r,
                                            0 if bins is None else _addr(bins),
                                            torch.get_num_threads())
        if found < 0:
            raise MemoryError(f"nm_apply could not allocate {ncand} candidates")
        assert found == ncand, "the scores changed between the two passes"

    def prune_apply(self, dtype: torch.dtype, ptrs: array, numel: array, eps: array,
                    offsets: array, variant: int, bin_: int, ncand: int, r: int) -> None:
        """Zero the entries below ``bin_`` and the ``r`` smallest of its ``ncand``."""
        found = self._fn("prune_apply", dtype)(len(numel), _addr(ptrs), _addr(numel), _addr(eps),
                                               _addr(offsets), variant, bin_, ncand, r,
                                               torch.get_num_threads())
        if found < 0:
            raise MemoryError(f"prune_apply could not allocate {ncand} candidates")
        assert found == ncand, "the scores changed between the two passes"


# -ffp-contract=off keeps every rounding as written; -fno-trapping-math only lets the
# compiler if-convert the mask select into a vector blend (results are unchanged).
EXTRA_FLAGS = ["-fno-trapping-math", "-ffp-contract=off"]

_lock = threading.Lock()
_loaded: Optional[Kernels] = None
_error: Optional[str] = None


def load() -> Optional[Kernels]:
    """The kernels, compiled on first use; None where no C compiler/OpenMP works."""
    global _loaded, _error
    with _lock:
        if _loaded is None and _error is None:
            try:
                built = native.build("adamwprune", EXTRA_FLAGS)
                _declare(built.lib)
                _loaded = Kernels(built.lib, built.path, built.compile_seconds)
            except native.BuildError as exc:
                _error = str(exc)
        return _loaded


def load_error() -> Optional[str]:
    """Why :func:`load` returned None (None if it has not failed)."""
    return _error


def fresh_compile_seconds() -> float:
    """Seconds a compilation from scratch takes here (the one-time cost per machine)."""
    return native.fresh_compile_seconds("adamwprune", EXTRA_FLAGS)


def _declare(lib: ctypes.CDLL) -> None:
    i64, u64, ptr, i32 = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int
    signatures = {
        "undo_bytes": ([], i64),
        "adam_step": ([i64, ptr, ptr, ptr, ptr, ptr, i32], i32),
        "adam_sample": ([i64, ptr, ptr, ptr, ptr, ptr, i32, i64, i64, ptr, ptr, i32], i64),
        "adam_step_prune": ([i64, ptr, ptr, ptr, ptr, ptr, ptr, i32, u64, u64, ptr, i64, ptr,
                             i64, ptr, i32], i32),
        "prune_finish": ([ptr, ptr, i64, i64, u64, u64, ptr, i64, i32, u64, i32], i32),
        "prune_hist": ([i64, ptr, ptr, ptr, i32, ptr, i32], i32),
        "prune_apply": ([i64, ptr, ptr, ptr, ptr, i32, i64, i64, i64, i32], i64),
        "masked_sqnorm": ([i64, ptr, ptr, ptr, i32], ctypes.c_double),
        "nm_hist": ([i64, ptr, ptr, ptr, ptr, i32, i64, i64, ptr, ptr, i32], i32),
        "nm_apply": ([i64, ptr, ptr, ptr, ptr, i32, i64, i64, i64, i64, i64, ptr, i32], i64),
    }
    for suffix in ("f32", "f64"):
        for name, (args, result) in signatures.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = args, result
    lib.kth_u64.argtypes, lib.kth_u64.restype = [ptr, i64, i64], u64
