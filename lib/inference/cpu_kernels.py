"""Build and bind ``sparse_cpu.c`` (sparse x dense products for pruned Linear layers).

The C source is compiled once per machine with the system's C compiler (``$CC``,
else ``gcc``, else ``cc``) and OpenMP, for the instruction set torch dispatches to
on this CPU, into the cache directory AdamWPrune's optimizer kernels use
(``$ADAMWPRUNE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/adamwprune``, else
``~/.cache/adamwprune``), keyed by a hash of source, flags and compiler, and renamed
into place so concurrent processes can share it. :func:`load` returns None (and
:func:`load_error` says why) where no compiler works; ``SparseLinear`` then uses
torch's CSR product.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

SOURCE_PATH = Path(__file__).with_name("sparse_cpu.c")
CFLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
TILE = 64  # tokens per tile of spmm_f32 (sparse_cpu.c)
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512vl", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}


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
                _loaded = _build()
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                _error = f"{type(exc).__name__}: {exc}"
        return _loaded


def load_error() -> Optional[str]:
    return _error


def cache_dir() -> Path:
    explicit = os.environ.get("ADAMWPRUNE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adamwprune"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    return cc


def _flags() -> list[str]:
    return CFLAGS + ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])


def _build() -> Kernels:
    cc, flags, source = _compiler(), _flags(), SOURCE_PATH.read_text()
    tag = "\0".join([source, cc, *flags, platform.machine()]).encode()
    path = cache_dir() / f"adamwprune_sparse_{hashlib.sha256(tag).hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            done = subprocess.run([cc, *flags, str(SOURCE_PATH), "-o", str(built)],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
            os.replace(built, path)
    lib = ctypes.CDLL(str(path))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.spmv_f32.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    lib.spmm_f32.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    for fn in (lib.spmv_f32, lib.spmm_f32):
        fn.restype = None
    return Kernels(lib, path)
