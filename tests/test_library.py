"""The public API works in a plain PyTorch script (scripts/example_library.py)."""
import re
import subprocess
import sys

import adamwprune
from adamwprune.config.kconfig import ROOT


def test_public_names_import_from_the_package():
    for name in ("AdamWSpam", "AdamWPrune", "MagnitudePruner", "MovementPruner", "RigLPruner", "SETPruner",
                 "SRSTEPruner", "param_groups"):
        assert hasattr(adamwprune, name)


def test_example_script_prunes_to_target_with_each_method():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "example_library.py")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = dict(re.findall(r"^(\S+)\s.*sparsity (\d\.\d+)", r.stdout, re.M))
    nm = {"AdamWPrune-2:4", "AdamW+SRSTEPruner"}
    assert set(rows) == {"AdamWPrune", "AdamW+MagnitudePruner", "AdamW+MovementPruner", "AdamW+RigLPruner",
                         "AdamW+SETPruner", "AdamWPrune-regrow"} | nm
    # 70 % of 32*128 + 128*128 + 128*4 weights (2:4: half), counted from the weights themselves
    assert all(v == ("0.5000" if k in nm else "0.7000") for k, v in rows.items()), rows
    assert re.search(r"^AdamWPrune .*pruning buffers 0 B$", r.stdout, re.M)
    assert re.search(r"^AdamWPrune-regrow .*pruning buffers 0 B$", r.stdout, re.M)
    assert re.search(r"^AdamW\+MovementPruner .*pruning buffers [1-9]\d* B$", r.stdout, re.M)
