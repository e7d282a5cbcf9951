"""Binding of ``adamwprune/native/sparse_linear.c`` (sparse x dense products for
pruned Linear layers).

:mod:`adamwprune.native` compiles the source once per machine; :func:`load`
returns None (and :func:`load_error` says why) where no compiler works;
``SparseLinear`` then uses torch's CSR product.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from adamwprune import native

TILE = 64  # tokens per tile of spmm_f32 (sparse_linear.c)


@dataclass(frozen=True)
class Kernels:
    lib: ctypes.CDLL
    path: Path

    def spmv(self, w, x: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor) -> None:
        assert x.is_contiguous() and y.is_contiguous()
        self.lib.spmv_f32(w.rows, w.row_ptr.data_ptr(), w.col.data_ptr(), w.val.data_ptr(),
                          x.data_ptr(), _ptr(bias), y.data_ptr(), torch.get_num_threads())

    def spmm(self, w, x: torch.Tensor, bias, y: torch.Tensor) -> None:
        """y = x @ W.T + bias for x [tokens, cols] (contiguous float32)."""
        assert x.is_contiguous() and y.is_contiguous()
        tokens = x.shape[0]
        work = torch.empty(-(-tokens // TILE) * w.cols * TILE, dtype=torch.float32)
        self.lib.spmm_f32(w.rows, w.cols, tokens, w.row_ptr.data_ptr(), w.col.data_ptr(),
                          w.val.data_ptr(), x.data_ptr(), work.data_ptr(), _ptr(bias),
                          y.data_ptr(), torch.get_num_threads())


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


_lock = threading.Lock()
_loaded: Optional[Kernels] = None
_error: Optional[str] = None


def load() -> Optional[Kernels]:
    """The kernels, compiled on first use; None where no C compiler/OpenMP works."""
    global _loaded, _error
    with _lock:
        if _loaded is None and _error is None:
            try:
                built = native.build("sparse_linear")
                _declare(built.lib)
                _loaded = Kernels(built.lib, built.path)
            except native.BuildError as exc:
                _error = str(exc)
        return _loaded


def load_error() -> Optional[str]:
    return _error


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.spmv_f32.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    lib.spmm_f32.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    for fn in (lib.spmv_f32, lib.spmm_f32):
        fn.restype = None
