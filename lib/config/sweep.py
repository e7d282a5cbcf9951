"""Matrix axes over any Kconfig symbol: ``MATRIX_SWEEP="OPT_LR=0.0003,0.001 OPT_WEIGHT_DECAY=0,0.1"``.

Each item is ``SYMBOL=v1,v2,...`` (a symbol, a named choice such as LR_SCHEDULE, or
a make-line shorthand such as LR); the matrix runs every cell once per combination
of the listed values (their product, in the order given). A swept value goes to
the cell as one more override, so it is validated like every override: the
symbol must exist, and each value must be valid for every kind of cell of the
matrix (type, range, dependencies). Problems are found when the configuration is
built (``make defconfig``, ``make dry-run``, ``make``), all in one error.

The axes the matrix selections already span (model, optimizer, pruning method,
target sparsity, AdamWPrune variant, seed) and the MATRIX_* symbols cannot be
swept: they have their own selections.
"""
from __future__ import annotations

import itertools
import re
import tempfile
from pathlib import Path
from typing import Optional

Pairs = tuple[tuple[str, str], ...]

# Spanned by the matrix's own selections (matrix.expand): sweeping them would clash.
OWN_AXES = ("MODEL", "OPTIMIZER", "PRUNING", "PRUNING_TARGET_SPARSITY", "ADAMWPRUNE_VARIANT", "RUN_SEED")
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]")


class SweepError(ValueError):
    """A malformed MATRIX_SWEEP; the message names the item."""


def normalise_key(key: str) -> str:
    from .kconfig import SHORTHANDS

    key = key.strip()
    key = key[len("CONFIG_"):] if key.startswith("CONFIG_") else key
    return SHORTHANDS.get(key, key)


def parse(text: Optional[str]) -> list[tuple[str, list[str]]]:
    """``"A=1,2 B=x"`` -> ``[("A", ["1", "2"]), ("B", ["x"])]``; syntax errors raise SweepError."""
    axes: list[tuple[str, list[str]]] = []
    for item in (text or "").split():
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise SweepError(f"MATRIX_SWEEP item {item!r} is not SYMBOL=v1,v2,... "
                             "(example: MATRIX_SWEEP=\"OPT_LR=0.0003,0.001,0.003\")")
        symbol = normalise_key(key)
        vals = [v.strip() for v in values.split(",")]
        if any(v == "" for v in vals):
            raise SweepError(f"MATRIX_SWEEP item {item!r} has an empty value")
        if len(set(vals)) != len(vals):
            raise SweepError(f"MATRIX_SWEEP item {item!r} lists a value twice")
        if symbol in OWN_AXES or symbol.startswith("MATRIX"):
            raise SweepError(f"MATRIX_SWEEP cannot sweep {symbol}: use the matrix's own selections "
                             "(MATRIX_MODEL_*, MATRIX_OPTIMIZER_*, ...) for it")
        if symbol in (s for s, _ in axes):
            raise SweepError(f"MATRIX_SWEEP names {symbol} twice")
        axes.append((symbol, vals))
    return axes


def combinations(axes: list[tuple[str, list[str]]]) -> list[Pairs]:
    """Every combination of the swept values, as (symbol, value) pairs; [()] without a sweep."""
    names = [s for s, _ in axes]
    return [tuple(zip(names, combo)) for combo in itertools.product(*(v for _, v in axes))]


def label(pairs: Pairs) -> str:
    """``OPT_LR=0.001 OPT_WEIGHT_DECAY=0.1`` (empty without a sweep)."""
    return " ".join(f"{s}={v}" for s, v in pairs)


def id_part(pairs: Pairs) -> str:
    """The piece of a cell id that names the swept values: ``opt_lr-0.001_opt_weight_decay-0.1``."""
    return "_".join(f"{s.lower()}-{_UNSAFE.sub('_', v)}" for s, v in pairs)


def problems(kconf, cfg) -> list[str]:
    """Every way MATRIX_SWEEP of cfg is wrong, checked against each kind of cell of the matrix.

    A swept value is applied, as a cell would apply it, on top of the minimal form of
    ``kconf`` plus the (model, optimizer, pruning method, variant) of every distinct
    cell of the matrix, and must survive into a valid configuration.
    """
    from . import kconfig as C
    from ..run.cells import expand_base

    try:
        axes = parse(cfg.matrix_sweep)
    except SweepError as exc:
        return [str(exc)]
    if not axes:
        return []
    kinds = list(dict.fromkeys(c.overrides[:-1] for c in expand_base(cfg)))  # all but the seed
    fresh = C.load_kconfig()
    found: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        minimal = Path(d) / "defconfig"
        minimal.write_text(C.minimal_text(kconf))
        for symbol, values in axes:
            for value in values:
                why = _first_problem(C, fresh, minimal, kinds, symbol, value)
                if why:
                    found.append(f"MATRIX_SWEEP {symbol}={value}: {why}")
    return found


def _first_problem(C, kconf, minimal, kinds, symbol: str, value: str) -> Optional[str]:
    for kind in kinds:
        kconf.load_config(str(minimal), replace=True)
        try:
            C.apply_overrides(kconf, {**dict(kind), "MATRIX": "n", symbol: value})
            C.to_config(kconf)
        except C.ConfigError as exc:
            cell = ", ".join(v for _, v in kind)
            why = str(exc).removeprefix("override ").split(" (fix the value in the defconfig")[0]
            return f"{why} (in the {cell} cells)"
    return None
