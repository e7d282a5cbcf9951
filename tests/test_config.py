"""Kconfig loading, strictness, overrides and the typed config."""
import dataclasses
import re
import subprocess
import sys

import kconfiglib
import pytest

from adamwprune.config import kconfig as C
from adamwprune.config.kconfig import ConfigError, ROOT


def write(tmp_path, text, name="defconfig"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_load_into_a_frozen_typed_config():
    cfg, _, _ = C.load(None, {})
    assert cfg.model == "lenet5" and isinstance(cfg.epochs, int) and isinstance(cfg.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


@pytest.mark.parametrize("path", C.list_defconfigs(), ids=lambda p: p.name)
def test_every_shipped_defconfig_loads_cleanly(path):
    kconf = C.load_kconfig()
    C.load_file(kconf, path, strict=True)
    cfg = C.to_config(kconf)
    assert cfg.model in ("lenet5", "resnet18", "resnet50", "gpt2")


def test_unknown_symbol_is_refused_with_its_name(tmp_path):
    p = write(tmp_path, "CONFIG_MODEL_LENET5=y\nCONFIG_NOT_A_SYMBOL=3\n")
    with pytest.raises(ConfigError, match=r"CONFIG_NOT_A_SYMBOL=3: unknown symbol"):
        C.load(p)


def test_out_of_range_int_is_refused_with_range(tmp_path):
    p = write(tmp_path, "CONFIG_TRAIN_EPOCHS=0\n")
    with pytest.raises(ConfigError, match=r"CONFIG_TRAIN_EPOCHS=0: outside the range 1\.\.100000"):
        C.load(p)


def test_unmet_dependency_is_refused(tmp_path):
    p = write(tmp_path, "CONFIG_OPTIMIZER_ADAMW=y\nCONFIG_OPT_MOMENTUM=\"0.8\"\n")
    with pytest.raises(ConfigError, match=r"CONFIG_OPT_MOMENTUM=0.8: its dependencies are not met"):
        C.load(p)


def test_choice_member_with_unmet_dependency_is_refused(tmp_path):
    p = write(tmp_path, "CONFIG_OPTIMIZER_ADAMW=y\nCONFIG_PRUNING_STATE=y\n")
    with pytest.raises(ConfigError, match=r"CONFIG_PRUNING_STATE=y"):
        C.load(p)


def test_bad_int_type_is_refused(tmp_path):
    p = write(tmp_path, "CONFIG_TRAIN_EPOCHS=ten\n")
    with pytest.raises(ConfigError, match=r"TRAIN_EPOCHS"):
        C.load(p)


@pytest.mark.parametrize("value, why", [("abc", "not a number"), ("1.5", "outside the range"),
                                        ("nan", "not a finite number")])
def test_bad_float_is_refused(tmp_path, value, why):
    p = write(tmp_path, f'CONFIG_PRUNING_TARGET_SPARSITY="{value}"\n')
    with pytest.raises(ConfigError, match=rf'CONFIG_PRUNING_TARGET_SPARSITY="{value}": {why}'):
        C.load(p)


def test_all_problems_are_collected_into_one_error(tmp_path):
    p = write(tmp_path, "CONFIG_TRAIN_EPOCHS=0\nCONFIG_NOPE=y\n")
    with pytest.raises(ConfigError) as e:
        C.load(p)
    assert "TRAIN_EPOCHS" in str(e.value) and "NOPE" in str(e.value) and "\n" not in str(e.value)


def test_shorthand_overrides_go_through_validation():
    cfg, asked, _ = C.load(None, {"EPOCHS": "3", "LR": "0.01", "DEVICE": "cpu", "DATASET": "synthetic",
                                  "SEED": "7", "MAX_ITERS": "5", "BATCH_SIZE": "16"})
    assert (cfg.epochs, cfg.lr, cfg.device, cfg.dataset, cfg.seed, cfg.max_iters, cfg.batch_size) == \
        (3, 0.01, "cpu", "synthetic", 7, 5, 16)
    assert asked["TRAIN_EPOCHS"] == "3" and asked["DEVICE_CPU"] == "y"
    with pytest.raises(ConfigError, match="TRAIN_EPOCHS=0"):
        C.load(None, {"EPOCHS": "0"})
    with pytest.raises(ConfigError, match="not a valid choice"):
        C.load(None, {"DEVICE": "tpu"})
    with pytest.raises(ConfigError, match="OPT_LR"):
        C.load(None, {"LR": "-1"})


def test_set_accepts_symbols_choices_and_config_prefix():
    pairs = C.parse_set('CONFIG_OPT_BETA2=0.99 OPTIMIZER=adamw PRUNING=magnitude PRUNING_TARGET_SPARSITY=0.5')
    cfg, _, _ = C.load(None, pairs)
    assert (cfg.beta2, cfg.optimizer, cfg.pruning, cfg.target_sparsity) == (0.99, "adamw", "magnitude", 0.5)
    with pytest.raises(ConfigError, match="BOGUS=1: unknown symbol"):
        C.load(None, C.parse_set("BOGUS=1"))


def test_missing_config_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="make defconfig"):
        C.load(tmp_path / "nope")


def _code_text():
    files = list((ROOT / "lib").rglob("*.py")) + list(ROOT.glob("*/train.py"))
    return "\n".join(f.read_text() for f in files if f != ROOT / "lib" / "config" / "kconfig.py")


def test_every_kconfig_symbol_is_read_by_code():
    kconf = C.load_kconfig()
    choice_members = {s.name for f in C.FIELDS if f.kind == "choice"
                      for s in kconf.named_choices[f.symbol].syms}
    unmapped = [s.name for s in kconf.unique_defined_syms
                if s.name not in C.FIELD_BY_SYMBOL and s.name not in choice_members]
    assert not unmapped, f"Kconfig symbols with no Config field: {unmapped}"
    code = _code_text()
    generated = {f"matrix_{axis}_{n}" for axis, names in C.REGISTRY_AXES.items() for n in names}
    unread = [f.name for f in C.FIELDS if f.name not in generated and not re.search(rf"\.{f.name}\b", code)]
    assert not unread, f"Config fields read by no code: {unread}"
    # the registry-generated selections are read by one getattr over REGISTRY_AXES
    assert 'getattr(cfg, f"matrix_{axis}_{n}")' in (ROOT / "lib" / "run" / "cells.py").read_text()


def _choice_members(kconf, choice: str) -> list[str]:
    return [s.name for s in kconf.named_choices[choice].syms]


def test_kconfig_names_are_the_registry_names():
    """Kconfig's menus and the registries name the same optimizers, pruning methods,
    patterns and distributions, both ways: a registry entry with no Kconfig symbol (or
    the reverse) fails here, not at a user's `make`."""
    from adamwprune.registry import DISTRIBUTIONS, MODELS, OPTIMIZERS, PATTERN_KINDS, PRUNERS, VARIANTS

    kconf = C.load_kconfig()
    assert _choice_members(kconf, "MODEL") == [f"MODEL_{m.upper()}" for m in MODELS]
    assert _choice_members(kconf, "ADAMWPRUNE_VARIANT") == [f"ADAMWPRUNE_VARIANT_{v.upper()}" for v in VARIANTS]
    assert all((ROOT / m / "train.py").is_file() for m in MODELS)
    from adamwprune.optim.adamwprune import BASES
    assert sorted(_choice_members(kconf, "ADAMWPRUNE_BASE")) == sorted(f"ADAMWPRUNE_BASE_{b.upper()}" for b in BASES)
    assert _choice_members(kconf, "OPTIMIZER") == [f"OPTIMIZER_{o.upper()}" for o in OPTIMIZERS]
    assert _choice_members(kconf, "PRUNING") == [f"PRUNING_{p.upper()}" for p in PRUNERS]
    assert _choice_members(kconf, "PRUNING_PATTERN") == [f"PRUNING_PATTERN_{p.upper()}" for p in PATTERN_KINDS]
    assert sorted(_choice_members(kconf, "PRUNING_DISTRIBUTION")) == sorted(
        f"PRUNING_DISTRIBUTION_{d.upper()}" for d in DISTRIBUTIONS)
    matrix = {s.name for s in kconf.unique_defined_syms if s.name.startswith("MATRIX_")}
    for axis, names in C.REGISTRY_AXES.items():
        prefix = f"MATRIX_{axis.upper()}_"
        in_kconfig = {s[len(prefix):].lower() for s in matrix if s.startswith(prefix)}
        assert in_kconfig == set(names), (axis, in_kconfig ^ set(names))


def test_matrix_switch_sits_beside_its_choice_entry():
    """A model, optimizer or pruning method is one Kconfig file: its MATRIX_<KIND>_<NAME>
    switch is defined in the file of its <KIND>_<NAME> choice entry, and defaults to it."""
    kconf = C.load_kconfig()
    for kind in ("MODEL", "OPTIMIZER", "PRUNING"):
        members = _choice_members(kconf, kind)
        assert members
        for entry in members:
            switch = kconf.syms.get(f"MATRIX_{entry}")
            assert switch is not None and switch.nodes, f"MATRIX_{entry} is not defined"
            assert {n.filename for n in switch.nodes} == {kconf.syms[entry].nodes[0].filename}, entry
            assert any(entry in kconfiglib.expr_str(cond) for _, cond in switch.defaults), entry


def test_pruning_dynamic_mirrors_the_registry():
    """PRUNING_DYNAMIC (promptless, drives which options apply) is the registry's
    `dynamic` for every method; the engine refuses a configuration where they differ."""
    from adamwprune.registry import PRUNERS

    for name, info in PRUNERS.items():
        opt = "adamwprune" if info.requires_optimizer else "adamw"
        cfg, _, _ = C.load(None, {"OPTIMIZER": opt, "PRUNING": name})
        assert bool(cfg.prune_dynamic) == info.dynamic, name


def test_defconfig_and_savedefconfig_round_trip(tmp_path):
    cfgfile, out = tmp_path / ".config", tmp_path / "defconfig"
    run = lambda *a: subprocess.run([sys.executable, "-m", "adamwprune.config.cli", "--config", str(cfgfile), *a],
                                    capture_output=True, text=True, cwd=ROOT)
    r = run("defconfig", "lenet5-demo", "--override=EPOCHS=4")
    assert r.returncode == 0, r.stderr
    r = run("savedefconfig", str(out))
    assert r.returncode == 0, r.stderr
    minimal = out.read_text()
    assert "CONFIG_TRAIN_EPOCHS=4" in minimal and "CONFIG_RUN_SEED" not in minimal
    a, _, _ = C.load(cfgfile)
    b, _, _ = C.load(out)
    assert a == b


def test_defconfig_cli_refuses_unknown_symbol_in_one_line(tmp_path):
    bad = ROOT / "defconfigs" / "zz-test-bad"
    bad.write_text("CONFIG_MODEL_LENET5=y\nCONFIG_TRAIN_EPOCHZ=3\n")
    try:
        r = subprocess.run([sys.executable, "-m", "adamwprune.config.cli", "--config", str(tmp_path / "c"),
                            "defconfig", "zz-test-bad"], capture_output=True, text=True, cwd=ROOT)
    finally:
        bad.unlink()
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "CONFIG_TRAIN_EPOCHZ=3: unknown symbol" in r.stderr
    assert not (tmp_path / "c").exists()


def test_every_prompted_option_has_help_text():
    kconf = C.load_kconfig()
    missing = [s.name for s in kconf.unique_defined_syms
               if s.choice is None and any(n.prompt for n in s.nodes) and not any(n.help for n in s.nodes)]
    assert not missing, f"Kconfig options without help: {missing}"
