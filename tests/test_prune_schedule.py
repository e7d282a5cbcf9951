"""One PruneSchedule for every method: from_schedule builds each pruner and AdamWPrune
exactly as their keywords do, and AdamWPrune's StatePruner view holds the optimizer's
own schedule object."""
import pytest
import torch

from adamwprune import (AdamWPrune, MagnitudePruner, MovementPruner, PruneSchedule, RigLPruner,
                        SETPruner, SRSTEPruner, StatePruner, param_groups)
from adamwprune.registry import PRUNERS
from helpers import Tiny

S = PruneSchedule(target=0.7, start=10, end=60, interval=10)
KEYWORDS = dict(target_sparsity=0.7, start_step=10, end_step=60, interval=10)


def _train(model, optimizer, pruner, steps=70):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1, 6, 6, generator=gen)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        pruner.step()
    return [p.detach().clone() for p in model.parameters()]


CASES = {
    "magnitude": (MagnitudePruner, S, KEYWORDS),
    "movement": (MovementPruner, S, KEYWORDS),
    "magnitude 2:4": (MagnitudePruner, PruneSchedule(0.5, 10, 60, 10, pattern="2:4"),
                      dict(KEYWORDS, target_sparsity=0.5, pattern="2:4")),
    "rigl": (RigLPruner, PruneSchedule(0.7, 0, 50, 10, drop_fraction=0.2, seed=4),
             dict(target_sparsity=0.7, start_step=0, end_step=50, interval=10, drop_fraction=0.2, seed=4)),
    "set": (SETPruner, PruneSchedule(0.7, 0, 50, 10, distribution="uniform", seed=2),
            dict(target_sparsity=0.7, start_step=0, end_step=50, interval=10, distribution="uniform", seed=2)),
    "srste": (SRSTEPruner, PruneSchedule(0.5, 0, 0, 1, pattern="2:4", srste_decay=1e-3),
              dict(target_sparsity=0.5, pattern="2:4", decay=1e-3)),
}


@pytest.mark.parametrize("case", CASES)
def test_from_schedule_trains_exactly_as_the_keywords(case):
    cls, schedule, keywords = CASES[case]
    runs = []
    for build in ("schedule", "keywords"):
        torch.manual_seed(0)
        model = Tiny()
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
        pruner = (cls.from_schedule(model, schedule, optimizer=opt) if build == "schedule"
                  else cls(model, optimizer=opt, **keywords))
        runs.append((_train(model, opt, pruner), pruner))
    (a, built), (b, _) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert built.prune_schedule is schedule


def test_every_registry_pruner_is_built_through_from_schedule():
    """The registry's builders hand the run's one PruneSchedule object to every method."""
    from adamwprune.config import kconfig as C
    from adamwprune.registry import build_optimizer, build_pruner

    for name, info in PRUNERS.items():
        if not info.prunes:
            continue
        schedule = (PruneSchedule(0.5, 0, 20, 5) if info.ramps  # SR-STE: N:M from the first forward
                    else PruneSchedule(0.5, 0, 0, 1, pattern="2:4"))
        opt_name = "adamwprune" if info.requires_optimizer else "adamw"
        cfg, _, _ = C.load(None, {"OPTIMIZER": opt_name, "PRUNING": name})
        model = Tiny()
        opt = build_optimizer(opt_name, param_groups(model, 0.0), cfg, schedule, name)
        pruner = build_pruner(name, model, opt, schedule, opt_name)
        assert pruner.prune_schedule is schedule, name
        if info.optimizer_prunes:
            assert opt.prune_schedule is schedule is pruner.prune_schedule


def test_state_pruner_takes_the_schedule_of_its_optimizer():
    torch.manual_seed(0)
    model = Tiny()
    opt = AdamWPrune.from_schedule(param_groups(model, 0.1), S, lr=1e-2)
    pruner = StatePruner(model, optimizer=opt)
    assert pruner.prune_schedule is opt.prune_schedule is S
    _train(model, opt, pruner)
    assert pruner.current_sparsity() == pytest.approx(0.7, abs=0.01)
    # keywords still work, and a different ramp is refused
    assert StatePruner(model, optimizer=opt, **KEYWORDS).prune_schedule.ramp() == S.ramp()
    with pytest.raises(ValueError, match="one config"):
        StatePruner(model, optimizer=opt, **dict(KEYWORDS, interval=5))
    with pytest.raises(ValueError, match="all of target_sparsity"):
        StatePruner(model, 0.7, optimizer=opt)
    with pytest.raises(ValueError, match="needs its AdamWPrune"):
        StatePruner(model)


def test_adamwprune_from_schedule_is_its_keywords():
    runs = []
    for build in ("schedule", "keywords"):
        torch.manual_seed(0)
        model = Tiny()
        groups = param_groups(model, 0.1)
        opt = (AdamWPrune.from_schedule(groups, S, lr=1e-2) if build == "schedule"
               else AdamWPrune(groups, lr=1e-2, **KEYWORDS))
        runs.append(_train(model, opt, StatePruner(model, optimizer=opt)))
    assert all(torch.equal(x, y) for x, y in zip(*runs, strict=True))


def test_a_keyword_the_schedule_gives_is_refused_beside_it():
    model = Tiny()
    with pytest.raises(ValueError, match="interval come"):
        MagnitudePruner.from_schedule(model, S, interval=5)
    with pytest.raises(ValueError, match="target_sparsity come"):
        AdamWPrune.from_schedule(param_groups(model, 0.0), S, target_sparsity=0.5)


def test_pruning_imports_no_optimizer_module():
    """No optim <-> pruning cycle hides behind a lazy import: no module of
    adamwprune.pruning imports adamwprune.optim, at the top or inside a function
    (StatePruner recognises AdamWPrune by its prunes_in_step flag)."""
    import ast
    from pathlib import Path

    import adamwprune.pruning as P

    offenders = []
    for path in Path(P.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [("." * node.level) + (node.module or "")] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names
                          if n.startswith(("adamwprune.optim", "..optim"))]
    assert offenders == []
