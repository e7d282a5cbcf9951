"""AdamWPrune as a library in a plain PyTorch loop (no Kconfig, no engine).

    python scripts/example_library.py

Trains a small MLP on a synthetic task three ways and prints the measured
sparsity and the per-component memory report of each.
"""
import torch
from torch import nn

from adamwprune import AdamWPrune, MagnitudePruner, MovementPruner, memory_report, param_groups

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


def main():
    # 1. AdamWPrune: the optimizer prunes from its own state; no pruner object.
    model = make_model()
    opt = AdamWPrune(param_groups(model, weight_decay=0.01), lr=1e-3, variant="bitter0",
                     target_sparsity=TARGET, start_step=START, end_step=END, interval=INTERVAL)
    loss, sparsity = train(model, opt)
    report = memory_report(model, opt, None)
    print(f"AdamWPrune      loss {loss:.3f}  sparsity {sparsity:.4f}  "
          f"pruning buffers {report['pruning_buffers']['bytes']} B")

    # 2. and 3. AdamW with a pruner stepped after the optimizer.
    for cls in (MagnitudePruner, MovementPruner):
        model = make_model()
        opt = torch.optim.AdamW(param_groups(model, weight_decay=0.01), lr=1e-3)
        pruner = cls(model, TARGET, START, END, INTERVAL, optimizer=opt)
        loss, sparsity = train(model, opt, pruner)
        report = memory_report(model, opt, pruner)
        print(f"AdamW+{cls.__name__:<15} loss {loss:.3f}  sparsity {sparsity:.4f}  "
              f"pruning buffers {report['pruning_buffers']['bytes']} B")


if __name__ == "__main__":
    main()
