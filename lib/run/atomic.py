"""Atomic file writes: every file the project writes goes through here.

A file is written to a temporary name in the same directory, flushed and fsynced,
then renamed over the target (os.replace), so a reader or a crash sees the old
file or the new one, never a partial one. On any error the temporary file is
removed (a full disk must not keep the space a user frees), and a full disk
(ENOSPC) or a missing quota (EDQUOT) becomes one :class:`DiskFullError` line that
names the file.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Callable, IO, Optional

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space left (or quota exceeded) while writing a file; the message is one line."""


def disk_error(path: Path, exc: OSError) -> OSError:
    """`exc` as a one-line DiskFullError naming `path` when the disk is full, else `exc`."""
    if isinstance(exc, DiskFullError) or exc.errno not in _FULL:
        return exc
    return DiskFullError(exc.errno, f"{path}: cannot write, {os.strerror(exc.errno).lower()} "
                                    "(free some space, then `make continue` resumes from the last checkpoint)")


def temp_path(path: Path) -> Path:
    """The temporary name beside `path` (hidden, unique to this process)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomic(path: Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call `write(fh)` on a temporary file beside `path`, fsync, rename over `path`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise disk_error(path, exc) from None
        raise


def write_file_atomic(path: Path, make: Callable[[Path], None]) -> None:
    """For writers that want a path (kconfiglib, matplotlib): `make(tmp)` writes the
    temporary file, which is then fsynced and renamed over `path`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        make(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise disk_error(path, exc) from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda fh: fh.write(text))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda fh: fh.write(data), binary=True)


def jsonable(x: Any) -> Any:
    """JSON for what runs record besides plain values: paths, and tensors (a number or a list)."""
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "numel") and hasattr(x, "tolist"):  # a torch.Tensor, without importing torch here
        return x.item() if x.numel() == 1 else x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json_atomic(path: Path, obj: Any, default: Optional[Callable[[Any], Any]] = jsonable) -> None:
    def dump(fh):
        json.dump(obj, fh, indent=2, sort_keys=True, default=default)
        fh.write("\n")

    write_atomic(path, dump)


def append_line(path: Path, line: str) -> None:
    """Append one line (a JSON-lines row); a full disk is one DiskFullError line."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line if line.endswith("\n") else line + "\n")
            fh.flush()
    except OSError as exc:
        raise disk_error(path, exc) from None


def replace_directory(tmp: Path, final: Path) -> None:
    """Put the finished directory ``tmp`` at ``final`` (a sibling), replacing what is
    there: the old one is renamed aside first and removed after, so ``final`` is at
    every moment either the old directory or the new one, never half of either."""
    import shutil

    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
