"""A matrix's cells: the valid combinations of a configuration's selections (models x
optimizers x methods x operating points x variants x seeds, the MATRIX_SWEEP values and
the MATRIX_TUNED_FROM values), in a stable order. Which combinations are valid is in
the registry records; run/matrix.py runs the cells."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from .rundir import run_name


@dataclass(frozen=True)
class Cell:
    id: str
    model: str
    optimizer: str
    pruning: str
    sparsity: float
    variant: Optional[str]
    seed: int
    overrides: tuple = field(default=())
    pattern: str = "unstructured"      # or "N:M"
    distribution: Optional[str] = None  # dynamic sparse training's layer densities
    sweep: tuple = field(default=())   # (symbol, value) pairs of the MATRIX_SWEEP axes
    tuned: tuple = field(default=())   # (symbol, value) pairs taken from MATRIX_TUNED_FROM

    def __post_init__(self):
        for name in ("overrides", "sweep", "tuned"):  # JSON gives lists of lists
            object.__setattr__(self, name, tuple(tuple(p) for p in getattr(self, name)))


def _picked(pairs) -> list:
    return [name for name, on in pairs if on]


def matrix_axes(cfg) -> dict:
    """The selected values of each axis. Optimizers, pruning methods, patterns and
    distributions are the registry's (adamwprune.registry): one selection symbol each."""
    from ..config.kconfig import REGISTRY_AXES

    seeds = ([int(s) for s in cfg.matrix_seed_list.split()] if cfg.matrix_seed_list
             else [cfg.seed + i for i in range(cfg.matrix_seeds or 1)])
    picked = lambda axis: [n for n in REGISTRY_AXES[axis] if getattr(cfg, f"matrix_{axis}_{n}")]
    return {
        "models": picked("model"), "optimizers": picked("optimizer"), "prunings": picked("pruning"),
        "patterns": picked("pattern"), "distributions": picked("distribution"),
        "nm": (cfg.nm_n or 2, cfg.nm_m or 4),
        "sparsities": _picked([(0.5, cfg.matrix_sparsity_50), (0.7, cfg.matrix_sparsity_70),
                               (0.9, cfg.matrix_sparsity_90), (0.95, cfg.matrix_sparsity_95),
                               (0.99, cfg.matrix_sparsity_99)]),
        "variants": picked("variant"),
        "seeds": seeds,
    }


def _valid(optimizer: str, pruning: str) -> bool:
    """A cell is valid when the pruner accepts the optimizer and an optimizer that prunes
    by itself is not paired with a second, external pruner (it would be AdamW plus one)."""
    from ..registry import OPTIMIZERS, PRUNERS

    need = PRUNERS[pruning].requires_optimizer
    if need is not None:
        return optimizer in need
    return not (OPTIMIZERS[optimizer].prunes_itself and PRUNERS[pruning].prunes)


def _operating_points(info, a) -> list[tuple[float, str, Optional[str]]]:
    """(sparsity, pattern, distribution) of one pruning method's cells, from its record:
    dense training once at 0 %; unstructured at every selected sparsity; N:M once, at
    1 - N/M; a dynamic method once per selected distribution."""
    if not info.prunes:
        return [(0.0, "unstructured", None)]
    points = []
    distributions = a["distributions"] if info.dynamic else [None]
    if "unstructured" in info.patterns and "unstructured" in a["patterns"]:
        points += [(s, "unstructured", d) for s in a["sparsities"] for d in distributions]
    if "nm" in info.patterns and "nm" in a["patterns"]:
        n, m = a["nm"]
        points += [(1.0 - n / m, f"{n}:{m}", d) for d in distributions]
    return points


def expand(cfg, tuning_table=None) -> list[Cell]:
    """The valid cells of cfg's matrix, in a stable order: the selections' cells, each once
    per combination of the MATRIX_SWEEP values, with the MATRIX_TUNED_FROM values applied
    (``tuning_table``: the loaded table, False for none, None to load it)."""
    from ..config import sweep
    from ..config import tuning
    from ..config.kconfig import ConfigError

    combos = sweep.combinations(sweep.parse(cfg.matrix_sweep))
    loaded = tuning.load_table(cfg) if tuning_table is None else tuning_table
    cells = []
    for base in expand_base(cfg):
        tuned = tuning.tuned_for(cfg, loaded[1], base.model, base.optimizer) if loaded else ()
        for pairs in combos:
            clash = {s for s, _ in pairs} & {s for s, _ in tuned}
            if clash:
                raise ConfigError(f"MATRIX_SWEEP and MATRIX_TUNED_FROM both set {', '.join(sorted(clash))}; "
                                  "sweep it or take it from the grid, not both")
            name = run_name(base.model, base.optimizer, base.pruning, base.sparsity, base.variant, base.seed,
                            extra=sweep.id_part(pairs), pattern=base.pattern, distribution=base.distribution)
            overrides = base.overrides[:-1] + tuned + pairs + base.overrides[-1:]
            cells.append(replace(base, id=name, overrides=overrides, sweep=pairs, tuned=tuned))
    return cells


def expand_base(cfg) -> list[Cell]:
    """The cells of the model x optimizer x method x operating point (sparsity, pattern,
    distribution) x variant x seed selections; which apply to a method is in its record."""
    from ..registry import PRUNERS

    a = matrix_axes(cfg)
    cells = []
    for model in a["models"]:
        for opt in a["optimizers"]:
            for pruning in a["prunings"]:
                if not _valid(opt, pruning):
                    continue
                info = PRUNERS[pruning]
                variants = a["variants"] if info.uses_variant else [None]
                for s, pattern, dist in _operating_points(info, a):
                    for v in variants:
                        for seed in a["seeds"]:
                            pairs = [("MODEL", model), ("OPTIMIZER", opt), ("PRUNING", pruning)]
                            if info.patterns:
                                kind = "unstructured" if pattern == "unstructured" else "nm"
                                pairs.append(("PRUNING_PATTERN", kind))
                                if kind == "nm":
                                    pairs += [("PRUNING_NM_N", str(a["nm"][0])), ("PRUNING_NM_M", str(a["nm"][1]))]
                            if info.prunes and pattern == "unstructured":
                                pairs.append(("PRUNING_TARGET_SPARSITY", f"{s:g}"))
                            if dist is not None:
                                pairs.append(("PRUNING_DISTRIBUTION", dist))
                            if v is not None:
                                pairs.append(("ADAMWPRUNE_VARIANT", v))
                            pairs.append(("SEED", str(seed)))
                            name = run_name(model, opt, pruning, s, v, seed, pattern=pattern, distribution=dist)
                            cells.append(Cell(name, model, opt, pruning, s, v, seed, tuple(pairs),
                                              pattern=pattern, distribution=dist))
    return cells


def is_matrix(cfg) -> bool:
    return bool(cfg.matrix) and len(expand(cfg)) > 1
