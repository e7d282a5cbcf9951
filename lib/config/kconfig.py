"""Kconfig -> typed, frozen Config.

`.config` and defconfigs are read only through kconfiglib. Every assignment must
survive loading (an unknown symbol, an out-of-range int, an unmet dependency, a
malformed value or a float outside its range is an error naming the symbol, the
value asked for and why). Floats are Kconfig `string` symbols parsed and
range-checked here. Overrides from the make line go through the same checks.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import kconfiglib

from ..registry import DISTRIBUTIONS, MODELS, OPTIMIZERS, PATTERN_KINDS, PRUNERS, VARIANTS

from ..paths import ROOT  # the checkout (Kconfig lives here)
from .errors import ConfigError  # noqa: F401  (adamwprune.config.kconfig.ConfigError, as before)

# The matrix axes whose values are registry names: one MATRIX_<AXIS>_<NAME> selection each.
REGISTRY_AXES: dict[str, tuple[str, ...]] = {
    "model": MODELS, "optimizer": tuple(OPTIMIZERS), "pruning": tuple(PRUNERS),
    "pattern": tuple(PATTERN_KINDS), "distribution": tuple(sorted(DISTRIBUTIONS)),
    "variant": VARIANTS,
}


def _axis_fields(*axes: str) -> tuple["Field", ...]:
    """One selection per registry entry, read by cells.matrix_axes as matrix_<axis>_<name>."""
    return tuple(Field(f"matrix_{axis}_{name}", f"MATRIX_{axis.upper()}_{name.upper()}", "bool")
                 for axis in axes for name in REGISTRY_AXES[axis])


@dataclass(frozen=True)
class Field:
    """One Config field read from one Kconfig symbol (or named choice).

    kind: "int", "bool", "str", "float" (a string symbol) or "choice" (a named
    choice whose selected member, minus `prefix`, lower-cased, is the value).
    A field whose symbol is inactive (dependencies unmet) reads as None.
    """

    name: str
    symbol: str
    kind: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    prefix: str = ""


def _choice(name: str, symbol: str, prefix: Optional[str] = None) -> Field:
    return Field(name, symbol, "choice", prefix=prefix if prefix is not None else symbol + "_")


def _float(name: str, symbol: str, lo: float, hi: float, lo_open=False, hi_open=False) -> Field:
    return Field(name, symbol, "float", lo, hi, lo_open, hi_open)


FIELDS: tuple[Field, ...] = (
    # model and data
    _choice("model", "MODEL"),
    _choice("dataset", "DATASET"),
    Field("data_dir", "DATA_DIR", "str"),
    Field("data_download", "DATA_DOWNLOAD", "bool"),
    Field("val_size", "DATA_VAL_SIZE", "int"),
    Field("synthetic_size", "DATA_SYNTHETIC_SIZE", "int"),
    Field("resnet_channels_last", "RESNET_CHANNELS_LAST", "bool"),
    _choice("resnet50_stem", "RESNET50_STEM"),
    _choice("gpt2_size", "GPT2_SIZE"),
    Field("gpt2_block_size", "GPT2_BLOCK_SIZE", "int"),
    Field("gpt2_init_from", "GPT2_INIT_FROM", "str"),
    _float("gpt2_dropout", "GPT2_DROPOUT", 0.0, 1.0, hi_open=True),
    Field("gpt2_bias", "GPT2_BIAS", "bool"),
    Field("gpt2_text_source", "GPT2_TEXT_SOURCE", "str"),
    Field("gpt2_text_url", "GPT2_TEXT_URL", "str"),
    Field("gpt2_token_budget", "GPT2_TOKEN_BUDGET", "int"),
    _float("gpt2_val_fraction", "GPT2_VAL_FRACTION", 0.0, 0.5, lo_open=True),
    # training
    Field("epochs", "TRAIN_EPOCHS", "int"),
    Field("max_iters", "TRAIN_MAX_ITERS", "int"),
    Field("batch_size", "TRAIN_BATCH_SIZE", "int"),
    Field("grad_accum", "TRAIN_GRAD_ACCUM", "int"),
    _choice("lr_schedule", "LR_SCHEDULE"),
    Field("warmup_steps", "TRAIN_WARMUP_STEPS", "int"),
    _float("min_lr_ratio", "TRAIN_MIN_LR_RATIO", 0.0, 1.0),
    _float("grad_clip", "TRAIN_GRAD_CLIP", 0.0, 1e6),
    Field("eval_interval", "TRAIN_EVAL_INTERVAL", "int"),
    Field("eval_batches", "TRAIN_EVAL_BATCHES", "int"),
    Field("checkpoint_interval", "TRAIN_CHECKPOINT_INTERVAL", "int"),
    Field("log_interval", "TRAIN_LOG_INTERVAL", "int"),
    # runtime
    Field("seed", "RUN_SEED", "int"),
    Field("deterministic", "RUN_DETERMINISTIC", "bool"),
    _choice("device", "RUN_DEVICE", prefix="DEVICE_"),
    Field("amp", "RUN_AMP", "bool"),
    Field("compile", "RUN_COMPILE", "bool"),
    Field("nproc", "RUN_NPROC", "int"),
    Field("threads", "RUN_THREADS", "int"),
    Field("results_dir", "RUN_RESULTS_DIR", "str"),
    _float("monitor_interval", "RUN_MONITOR_INTERVAL", 0.0, 3600.0, lo_open=True),
    Field("tracker_trackio", "TRACKER_TRACKIO", "bool"),
    Field("tracker_wandb", "TRACKER_WANDB", "bool"),
    # optimizer
    _choice("optimizer", "OPTIMIZER"),
    Field("update_rule", "OPT_UPDATE", "str"),
    _float("lr", "OPT_LR", 0.0, 100.0, lo_open=True),
    _float("weight_decay", "OPT_WEIGHT_DECAY", 0.0, 100.0),
    _float("momentum", "OPT_MOMENTUM", 0.0, 1.0, hi_open=True),
    Field("nesterov", "OPT_NESTEROV", "bool"),
    _float("beta1", "OPT_BETA1", 0.0, 1.0, hi_open=True),
    _float("beta2", "OPT_BETA2", 0.0, 1.0, hi_open=True),
    _float("eps", "OPT_EPS", 0.0, 1.0, lo_open=True),
    Field("amsgrad", "OPT_AMSGRAD", "bool"),
    _float("spam_theta", "SPAM_THETA", 0.0, 1e12, lo_open=True),
    Field("spam_reset_interval", "SPAM_RESET_INTERVAL", "int"),
    Field("spam_warmup_steps", "SPAM_WARMUP_STEPS", "int"),
    Field("spam_clip_delay", "SPAM_CLIP_DELAY", "int"),
    _choice("adamwprune_base", "ADAMWPRUNE_BASE"),
    _choice("adamwprune_variant", "ADAMWPRUNE_VARIANT"),
    _float("adamwprune_budget_factor", "ADAMWPRUNE_BUDGET_FACTOR", 1.0, 100.0),
    # pruning
    _choice("pruning", "PRUNING"),
    _float("target_sparsity", "PRUNING_TARGET_SPARSITY", 0.0, 0.999),
    _choice("prune_schedule", "PRUNING_SCHEDULE"),
    _choice("prune_scope", "PRUNING_SCOPE"),
    _float("ramp_start", "PRUNING_RAMP_START", 0.0, 1.0),
    _float("ramp_end", "PRUNING_RAMP_END", 0.0, 1.0),
    Field("prune_interval", "PRUNING_INTERVAL", "int"),
    Field("prune_embeddings", "PRUNING_EMBEDDINGS", "bool"),
    Field("prune_dynamic", "PRUNING_DYNAMIC", "bool"),  # promptless: registry's `dynamic`, tested
    _choice("prune_pattern", "PRUNING_PATTERN"),
    Field("nm_n", "PRUNING_NM_N", "int"),
    Field("nm_m", "PRUNING_NM_M", "int"),
    _choice("prune_distribution", "PRUNING_DISTRIBUTION"),
    _float("drop_fraction", "PRUNING_DROP_FRACTION", 0.0, 1.0),
    _float("regrow_end", "PRUNING_REGROW_END", 0.0, 1.0, lo_open=True),
    _float("srste_decay", "SRSTE_DECAY", 0.0, 1e3),
    # test matrix
    Field("matrix", "MATRIX", "bool"),
    # one selection per registry entry (adamwprune.registry: the one list of names)
    *_axis_fields("model", "optimizer", "pruning", "pattern", "distribution"),
    *(Field(f"matrix_sparsity_{s}", f"MATRIX_SPARSITY_{s}", "bool") for s in (50, 70, 90, 95, 99)),
    *_axis_fields("variant"),
    Field("matrix_seeds", "MATRIX_SEEDS", "int"),
    Field("matrix_seed_list", "MATRIX_SEED_LIST", "str"),
    Field("matrix_sweep", "MATRIX_SWEEP", "str"),
    Field("matrix_tuned_from", "MATRIX_TUNED_FROM", "str"),
    Field("matrix_jobs", "MATRIX_JOBS", "int"),
    # where the cells run (Kconfig.launcher)
    _choice("launcher", "LAUNCHER"),
    Field("slurm_partition", "SLURM_PARTITION", "str"),
    Field("slurm_time_min", "SLURM_TIME_MIN", "int"),
    Field("slurm_signal_delay_s", "SLURM_SIGNAL_DELAY", "int"),
    Field("slurm_cpus_per_task", "SLURM_CPUS_PER_TASK", "int"),
    Field("slurm_gpus_per_task", "SLURM_GPUS_PER_TASK", "int"),
    Field("slurm_mem_gb", "SLURM_MEM_GB", "int"),
    Field("slurm_array_parallelism", "SLURM_ARRAY_PARALLELISM", "int"),
    Field("slurm_max_requeues", "SLURM_MAX_REQUEUES", "int"),
    Field("slurm_sbatch_extra", "SLURM_SBATCH_EXTRA", "str"),
)

FIELD_BY_NAME = {f.name: f for f in FIELDS}
FIELD_BY_SYMBOL = {f.symbol: f for f in FIELDS}

# Make-line shorthands -> symbol (or named choice, whose value picks a member).
SHORTHANDS: dict[str, str] = {
    "EPOCHS": "TRAIN_EPOCHS",
    "MAX_ITERS": "TRAIN_MAX_ITERS",
    "BATCH_SIZE": "TRAIN_BATCH_SIZE",
    "LR": "OPT_LR",
    "SEED": "RUN_SEED",
    "DEVICE": "RUN_DEVICE",
    "DATASET": "DATASET",
    "DATA_DIR": "DATA_DIR",
    "NPROC": "RUN_NPROC",
    "CHECKPOINT_INTERVAL": "TRAIN_CHECKPOINT_INTERVAL",
    "JOBS": "MATRIX_JOBS",
}

Config = dataclasses.make_dataclass(
    "Config",
    [(f.name, Any) for f in FIELDS],
    frozen=True,
    namespace={
        "__doc__": "The resolved, typed configuration of one run (see FIELDS).",
        "to_dict": lambda self: dataclasses.asdict(self),
        "replace": lambda self, **kw: dataclasses.replace(self, **kw),
    },
)


# --------------------------------------------------------------------- kconfig
def load_kconfig(root: Path = ROOT) -> kconfiglib.Kconfig:
    """Parse the Kconfig tree (no .config loaded: every symbol at its default)."""
    old = os.environ.get("srctree")
    os.environ["srctree"] = str(root)
    try:
        kconf = kconfiglib.Kconfig(str(root / "Kconfig"), warn_to_stderr=False)
    finally:
        if old is None:
            os.environ.pop("srctree", None)
        else:
            os.environ["srctree"] = old
    kconf.warn_assign_undef = True
    kconf.warn_assign_override = True
    kconf.warn_assign_redun = False
    return kconf


def _why_dropped(sym: kconfiglib.Symbol, asked: str) -> str:
    if sym.type in (kconfiglib.INT, kconfiglib.HEX):
        try:
            value = int(asked, 0)
        except ValueError:
            return f"not a valid {kconfiglib.TYPE_TO_STR[sym.type]}"
        for lo, hi, cond in sym.ranges:
            if kconfiglib.expr_value(cond):
                lo_v, hi_v = int(lo.str_value, 0), int(hi.str_value, 0)
                if not lo_v <= value <= hi_v:
                    return f"outside the range {lo_v}..{hi_v}"
    if sym.type in (kconfiglib.BOOL, kconfiglib.TRISTATE) and asked not in ("y", "n", "m"):
        return "not a valid bool (use y or n)"
    dep = sym.direct_dep
    if sym.choice is not None and kconfiglib.expr_value(sym.choice.direct_dep) == 0:
        dep = sym.choice.direct_dep  # a choice member: name what the choice depends on
    if kconfiglib.expr_value(dep) == 0:
        return f"its dependencies are not met (depends on {kconfiglib.expr_str(dep)})"
    if sym.choice is not None and asked == "y":
        return f"{sym.choice.name or 'its choice'} selected {sym.choice.selection.name if sym.choice.selection else 'nothing'}"
    return f"the value became {sym.str_value or 'unset'!r}"


def _asked_value(sym: kconfiglib.Symbol) -> Optional[str]:
    user = sym.user_value
    if user is None:
        return None
    if sym.type in (kconfiglib.BOOL, kconfiglib.TRISTATE):
        return kconfiglib.TRI_TO_STR[user]
    return str(user)


def dropped_assignments(kconf: kconfiglib.Kconfig, symbols: Optional[Iterable[str]] = None,
                        asked: Optional[Mapping[str, str]] = None) -> list[str]:
    """Problems for assignments that did not survive (user value != final value)."""
    problems = []
    names = symbols if symbols is not None else [s.name for s in kconf.unique_defined_syms]
    for name in names:
        sym = kconf.syms[name]
        want = (asked or {}).get(name, _asked_value(sym))
        if want is None:
            continue
        if sym.type in (kconfiglib.BOOL, kconfiglib.TRISTATE) and want == "n" and sym.str_value == "n":
            continue
        if want != sym.str_value:
            problems.append(f"CONFIG_{name}={want}: {_why_dropped(sym, want)}")
    return problems


def load_file(kconf: kconfiglib.Kconfig, path: Path, strict: bool = True) -> None:
    """Load a .config/defconfig into kconf; with strict, any dropped assignment is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file (run `make defconfig DEFCONFIG=<name>`, "
                          "`make list-defconfigs` lists them)")
    kconf.warnings.clear()
    kconf.load_config(str(path), replace=True)
    if not strict:
        return
    problems = [_clean_warning(w) for w in kconf.warnings]
    problems += dropped_assignments(kconf)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems) + " (fix the file or run `make menuconfig`)")


def _clean_warning(w: str) -> str:
    # kconfiglib: "attempt to assign the value 'x' to the undefined symbol FOO"
    w = w.replace("warning: ", "").strip()
    if "undefined symbol" in w:
        name = w.rsplit(" ", 1)[-1]
        value = w.split("'")[1] if "'" in w else "?"
        return f"CONFIG_{name}={value}: unknown symbol (no Kconfig file defines it)"
    return w


# ------------------------------------------------------------------ overrides
def parse_set(text: str) -> dict[str, str]:
    """SET="SYMBOL=value SYMBOL2=value" -> {"SYMBOL": "value", ...}."""
    out = {}
    for item in shlex.split(text or ""):
        if "=" not in item:
            raise ConfigError(f"SET item {item!r} is not SYMBOL=value (example: SET=\"OPT_LR=0.01\")")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _choice_member(kconf: kconfiglib.Kconfig, choice_name: str, value: str) -> str:
    field = FIELD_BY_SYMBOL.get(choice_name)
    prefix = field.prefix if field else choice_name + "_"
    member = prefix + value.upper().replace("-", "_")
    choice = kconf.named_choices[choice_name]
    valid = [s.name[len(prefix):].lower() for s in choice.syms]
    if member not in kconf.syms or kconf.syms[member].choice is not choice:
        raise ConfigError(f"{choice_name}={value}: not a valid choice (valid: {', '.join(valid)})")
    return member


def resolve_override(kconf: kconfiglib.Kconfig, key: str, value: str) -> tuple[str, str]:
    """Map a shorthand, choice name or (CONFIG_)SYMBOL onto (symbol, value)."""
    key = key.strip()
    if key.startswith("CONFIG_"):
        key = key[len("CONFIG_"):]
    key = SHORTHANDS.get(key, key)
    if key in kconf.named_choices:
        return _choice_member(kconf, key, value), "y"
    if key not in kconf.syms or not kconf.syms[key].nodes:
        raise ConfigError(f"{key}={value}: unknown symbol (not defined in any Kconfig file; "
                          "see `make menuconfig` for the list)")
    return key, value


def expand_tracker(value: str) -> list[tuple[str, str]]:
    """TRACKER=none|trackio|wandb|trackio,wandb -> one TRACKER_<NAME> bool per tracker."""
    from ..report.tracking import TRACKERS, parse_tracker_names

    try:
        names = parse_tracker_names(value)
    except ValueError as exc:
        raise ConfigError(f"TRACKER={value}: {exc}") from None
    return [(f"TRACKER_{t.upper()}", "y" if t in names else "n") for t in TRACKERS]


def apply_overrides(kconf: kconfiglib.Kconfig, overrides: Mapping[str, str]) -> dict[str, str]:
    """Apply overrides in order; returns {symbol: value} actually asked for."""
    asked: dict[str, str] = {}
    pairs: list[tuple[str, str]] = []
    for key, value in overrides.items():
        pairs += expand_tracker(str(value)) if key == "TRACKER" else [(key, value)]
    for key, value in pairs:
        sym_name, val = resolve_override(kconf, key, str(value))
        kconf.syms[sym_name].set_value(val)
        asked[sym_name] = val
    # A float outside its range is reported as such, even where its dependencies
    # are unmet too (PRUNING_TARGET_SPARSITY=1.5 on a dense preset).
    ranged = {sym: _float_problem(sym, val) for sym, val in asked.items()}
    ranged = {sym: why for sym, why in ranged.items() if why}
    problems = list(ranged.values()) + dropped_assignments(kconf, [s for s in asked if s not in ranged], asked)
    if problems:
        raise ConfigError("override " + "; ".join(problems))
    return asked


def _float_problem(sym: str, value: str) -> Optional[str]:
    f = FIELD_BY_SYMBOL.get(sym)
    return _parse_float(f, value)[1] if f is not None and f.kind == "float" else None


# --------------------------------------------------------------- typed config
def _read(kconf: kconfiglib.Kconfig, f: Field) -> tuple[Any, Optional[str]]:
    if f.kind == "choice":
        choice = kconf.named_choices.get(f.symbol)
        if choice is None:
            raise KeyError(f"Kconfig defines no choice named {f.symbol}")
        if choice.selection is None:
            return None, None
        return choice.selection.name[len(f.prefix):].lower(), None
    sym = kconf.syms.get(f.symbol)
    if sym is None or not sym.nodes:
        raise KeyError(f"Kconfig defines no symbol {f.symbol}")
    raw = sym.str_value
    if f.kind == "bool":
        return raw == "y", None
    if raw == "" and f.kind != "str":
        return None, None  # inactive: dependencies not met
    if f.kind == "int":
        return int(raw, 0), None
    if f.kind == "str":
        return (raw if sym.visibility or kconfiglib.expr_value(sym.direct_dep) else None), None
    return _parse_float(f, raw)


def _parse_float(f: Field, raw: str) -> tuple[Optional[float], Optional[str]]:
    try:
        value = float(raw)
    except ValueError:
        return None, f"CONFIG_{f.symbol}=\"{raw}\": not a number"
    if value != value or value in (float("inf"), float("-inf")):
        return None, f"CONFIG_{f.symbol}=\"{raw}\": not a finite number"
    lo_bad = value <= f.lo if f.lo_open else value < f.lo
    hi_bad = value >= f.hi if f.hi_open else value > f.hi
    if lo_bad or hi_bad:
        lo_b = "(" if f.lo_open else "["
        hi_b = ")" if f.hi_open else "]"
        return None, f"CONFIG_{f.symbol}=\"{raw}\": outside the range {lo_b}{f.lo:g}, {f.hi:g}{hi_b}"
    return value, None


def to_config(kconf: kconfiglib.Kconfig) -> "Config":
    """Build the typed Config from kconf; all problems are collected into one error."""
    values, problems = {}, []
    for f in FIELDS:
        value, problem = _read(kconf, f)
        values[f.name] = value
        if problem:
            problems.append(problem)
    if not problems:
        problems += _cross_checks(values)
    if not problems and values["matrix"] and values["matrix_sweep"]:
        from .sweep import problems as sweep_problems  # each swept value, checked like an override

        problems += sweep_problems(kconf, Config(**values))
    if problems:
        raise ConfigError("; ".join(problems) + " (fix the value in the defconfig, with SET=, or in `make menuconfig`)")
    return Config(**values)


def _cross_checks(v: Mapping[str, Any]) -> list[str]:
    problems = []
    if v["ramp_start"] is not None and v["ramp_end"] is not None and v["ramp_start"] > v["ramp_end"]:
        problems.append(f"CONFIG_PRUNING_RAMP_START={v['ramp_start']:g} is after CONFIG_PRUNING_RAMP_END="
                        f"{v['ramp_end']:g}")
    per_step = v["grad_accum"] * v["nproc"]
    if v["batch_size"] % per_step:
        problems.append(f"CONFIG_TRAIN_BATCH_SIZE={v['batch_size']}: not divisible by TRAIN_GRAD_ACCUM x "
                        f"RUN_NPROC = {per_step}")
    return problems


def load(config_path: Optional[Path] = None, overrides: Optional[Mapping[str, str]] = None,
         root: Path = ROOT) -> tuple["Config", dict[str, str], kconfiglib.Kconfig]:
    """Read a .config (strictly) plus overrides -> (Config, applied overrides, kconf)."""
    kconf = load_kconfig(root)
    if config_path is not None:
        load_file(kconf, Path(config_path), strict=True)
    if overrides:
        # Overrides act on the minimal form of the file, as if given at defconfig
        # time: a value the file holds only because it was the default (the lr of
        # the old optimizer, say) follows the new choices instead of sticking.
        kconf = _reload_minimal(kconf, root)
    asked = apply_overrides(kconf, overrides or {})
    return to_config(kconf), asked, kconf


def minimal_text(kconf: kconfiglib.Kconfig) -> str:
    """The savedefconfig form of kconf: only values that differ from their defaults."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "defconfig"
        kconf.write_min_config(str(path))
        return path.read_text()


def _reload_minimal(kconf: kconfiglib.Kconfig, root: Path) -> kconfiglib.Kconfig:
    import tempfile

    fresh = load_kconfig(root)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "defconfig"
        path.write_text(minimal_text(kconf))
        fresh.load_config(str(path), replace=True)
    return fresh


def write_config(kconf: kconfiglib.Kconfig, path: Path, defconfig: Optional[str] = None) -> None:
    """Write a full .config atomically (temp file + rename); the header names its defconfig."""
    from ..run.atomic import write_file_atomic

    header = "# Generated by AdamWPrune (kconfiglib); edit with `make menuconfig`\n"
    if defconfig:
        header += f"# defconfig: {defconfig}\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # CONFIG=/tmp/new/dir/.config works
    write_file_atomic(Path(path), lambda tmp: kconf.write_config(str(tmp), header=header, save_old=False))


def find_defconfig(name: str, root: Path = ROOT) -> Path:
    """defconfigs/<name> or <model>/defconfigs/<name>."""
    candidates = [root / "defconfigs" / name] + sorted(root.glob(f"*/defconfigs/{name}"))
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"no defconfig named {name!r} in defconfigs/ or <model>/defconfigs/ "
                      "(`make list-defconfigs` lists them)")


def list_defconfigs(root: Path = ROOT) -> list[Path]:
    files = list((root / "defconfigs").glob("*")) + list(root.glob("*/defconfigs/*"))
    return sorted((p for p in files if p.is_file()), key=lambda p: p.name)


def resolve_path(path: str) -> Path:
    """Relative paths in a config are relative to the project root (where Kconfig is)."""
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else ROOT / p
