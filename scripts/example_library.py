"""AdamWPrune as a library in a plain PyTorch loop (no Kconfig, no engine).

    python scripts/example_library.py

Trains a small MLP on a synthetic task with each method (gradual unstructured
pruning, the 2:4 pattern, dynamic sparse training) and prints the sparsity
measured from the weights and the pruning buffers of each.
"""
import torch
from torch import nn

from adamwprune import (AdamWPrune, MagnitudePruner, MovementPruner, RigLPruner, SETPruner, SRSTEPruner,
                        memory_report, param_groups)

STEPS, START, END, INTERVAL, TARGET = 300, 50, 200, 25, 0.7


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))


def batches():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 4, generator=g)
    for _ in range(STEPS):
        x = torch.randn(64, 32, generator=g)
        yield x, (x @ w).argmax(dim=1)


def train(model, optimizer, pruner=None):
    for x, y in batches():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if pruner is not None:
            pruner.step()
        optimizer.zero_grad(set_to_none=True)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return loss.item(), zeros / sum(w.numel() for w in weights)


def report_line(name, loss, sparsity, model, opt, pruner=None):
    report = memory_report(model, opt, pruner)
    print(f"{name:<21} loss {loss:.3f}  sparsity {sparsity:.4f}  "
          f"pruning buffers {report['pruning_buffers']['bytes']} B")


def main():
    # 1. AdamWPrune: the optimizer prunes from its own state; no pruner object.
    model = make_model()
    opt = AdamWPrune(param_groups(model, weight_decay=0.01), lr=1e-3, variant="bitter0",
                     target_sparsity=TARGET, start_step=START, end_step=END, interval=INTERVAL)
    loss, sparsity = train(model, opt)
    report_line("AdamWPrune", loss, sparsity, model, opt)

    # 2. and 3. AdamW with a pruner stepped after the optimizer.
    for cls in (MagnitudePruner, MovementPruner):
        model = make_model()
        opt = torch.optim.AdamW(param_groups(model, weight_decay=0.01), lr=1e-3)
        pruner = cls(model, TARGET, START, END, INTERVAL, optimizer=opt)
        loss, sparsity = train(model, opt, pruner)
        report_line(f"AdamW+{cls.__name__}", loss, sparsity, model, opt, pruner)

    # 4. The 2:4 pattern (2 of every 4 inputs kept): the same keyword on AdamWPrune and
    # on the ranking pruners; SR-STE trains with an N:M mask from the first step.
    model = make_model()
    opt = AdamWPrune(param_groups(model, weight_decay=0.01), lr=1e-3, pattern="2:4",
                     start_step=START, end_step=END, interval=INTERVAL)
    loss, sparsity = train(model, opt)
    report_line("AdamWPrune-2:4", loss, sparsity, model, opt)
    model = make_model()
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.01), lr=1e-3)
    pruner = SRSTEPruner(model, pattern="2:4", optimizer=opt)
    loss, sparsity = train(model, opt, pruner)
    report_line("AdamW+SRSTEPruner", loss, sparsity, model, opt, pruner)

    # 5. Dynamic sparse training: sparse from step 0, masks move until end_step.
    for cls in (RigLPruner, SETPruner):
        model = make_model()
        opt = torch.optim.AdamW(param_groups(model, weight_decay=0.01), lr=1e-3)
        pruner = cls(model, TARGET, 0, END, INTERVAL, optimizer=opt, drop_fraction=0.3, distribution="erk")
        loss, sparsity = train(model, opt, pruner)
        report_line(f"AdamW+{cls.__name__}", loss, sparsity, model, opt, pruner)
    model = make_model()
    opt = AdamWPrune(param_groups(model, weight_decay=0.01), lr=1e-3, target_sparsity=TARGET, start_step=0,
                     end_step=END, interval=INTERVAL, regrow="gradient", distribution="erk")
    loss, sparsity = train(model, opt)
    report_line("AdamWPrune-regrow", loss, sparsity, model, opt)


if __name__ == "__main__":
    main()
