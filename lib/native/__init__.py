"""The project's C kernels: their sources (``*.c``, ``*.h`` here) and the one build.

A library is compiled on first use with the system's C compiler (``$CC``, else
``gcc``, else ``cc``) and OpenMP (the process's runtime: torch's libgomp where torch
ships it), for the instruction set torch itself dispatches to on this CPU, into a
cache directory (``$ADAMWPRUNE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/adamwprune``,
else ``~/.cache/adamwprune``), keyed by a hash of the sources, flags and compiler and
renamed into place so concurrent processes can share it. The bindings
(``adamwprune.optim.cpu_kernels``, ``adamwprune.inference.cpu_kernels``) declare
the functions and fall back to plain torch where :func:`build` raises
:class:`BuildError`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

HERE = Path(__file__).resolve().parent
# -O3 with OpenMP; -fno-math-errno lets sqrt vectorise. Libraries add their own flags
# (the optimizer's kernels keep every rounding as written with -ffp-contract=off).
CFLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512vl", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}


class BuildError(RuntimeError):
    """No compiler, or the compiler failed; the message says which."""


@dataclass(frozen=True)
class Built:
    """A loaded library; ``compile_seconds`` is 0.0 when it came from the cache."""

    lib: ctypes.CDLL
    path: Path
    compile_seconds: float


def cache_dir() -> Path:
    explicit = os.environ.get("ADAMWPRUNE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adamwprune"


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise BuildError("no C compiler found (set CC, or install gcc)")
    return cc


def flags(extra: Sequence[str] = ()) -> list[str]:
    return CFLAGS + list(extra) + ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])


def _sources(name: str) -> list[Path]:
    main = HERE / f"{name}.c"
    if not main.is_file():
        raise BuildError(f"{main}: no such C source")
    return [main] + sorted(HERE.glob(f"{name}_*.h"))


def compile_to(name: str, out: Path, extra: Sequence[str] = ()) -> None:
    """Compile ``<name>.c`` (which may include ``<name>_*.h``) into ``out`` atomically."""
    cc = compiler()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        try:
            done = subprocess.run([cc, *flags(extra), str(HERE / f"{name}.c"), "-o", str(built),
                                   "-lm"], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BuildError(f"{cc} could not run: {exc}") from None
        if done.returncode:
            raise BuildError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(built, out)  # atomic: a concurrent build just replaces it


def build(name: str, extra: Sequence[str] = ()) -> Built:
    """The library ``<name>.c``, compiled once per machine (see the module docstring)."""
    cc, fl = compiler(), flags(extra)
    tag = "\0".join([*(p.read_text() for p in _sources(name)), cc, *fl, platform.machine()])
    path = cache_dir() / f"adamwprune_{name}_{hashlib.sha256(tag.encode()).hexdigest()[:16]}.so"
    seconds = 0.0
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BuildError(f"cannot create the kernel cache {path.parent}: {exc}") from None
        started = time.perf_counter()
        compile_to(name, path, extra)
        seconds = time.perf_counter() - started
    try:
        return Built(ctypes.CDLL(str(path)), path, seconds)
    except OSError as exc:
        raise BuildError(f"{path}: cannot be loaded ({exc})") from None


def fresh_compile_seconds(name: str, extra: Sequence[str] = ()) -> float:
    """Seconds a compilation from scratch takes here (into a temporary directory): the
    one-time cost a machine pays before the disk cache holds the library."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        compile_to(name, Path(tmp) / f"{name}.so", extra)
        return time.perf_counter() - started
