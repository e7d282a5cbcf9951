"""How much SPAM's momentum reset changes AdamWPrune's bitter0 mask.

SPAM (AdamWSpam) zeroes m and v every reset_interval steps. A mask ranked on
moments just cleared ranks on nothing (bitter0's score w^2 |m| / (sqrt(v) + eps)
is 0 everywhere), so AdamWPrune ranks an update that falls on a reset step before
the reset. The moments stay young for a while after it; this script measures how
much that changes the chosen mask. Two runs of LeNet-5 (embedded MNIST digits)
are identical up to a reset step R; at R one of them resets (SPAM as specified)
and the other does not. At R + j the bitter0 masks of both (k = round(s * N) lowest
scores, s = --sparsity) are compared: the fraction of the pruned set that differs.
bitter1 (|w|) is shown beside it: its score does not read the moments.

    .venv/bin/python scripts/spam_reset_masks.py [--reset 500] [--sparsity 0.5]
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from adamwprune import AdamWSpam, param_groups, prunable_parameters
from adamwprune.config import kconfig as C
from adamwprune.cli import load_task
from adamwprune.optim.importance import hybrid_score, magnitude_score
from adamwprune.pruning import prune_masks

OFFSETS = (0, 1, 2, 5, 10, 20, 50, 150, 300)


def _mask(model, opt, score, sparsity) -> torch.Tensor:
    params = [p for _, _, p in prunable_parameters(model)]
    eps = opt.param_groups[0]["eps"]
    scores = [score(p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"], eps) for p in params]
    return torch.cat([m.flatten() for m in prune_masks(scores, sparsity, "global")])


def _differs(a: torch.Tensor, b: torch.Tensor) -> float:
    return 1.0 - float((a & b).sum()) / max(1, int(a.sum()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reset", type=int, default=500, help="SPAM reset interval (the reset step R)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg, _, _ = C.load(None, {"MODEL": "lenet5", "DATASET": "mnist_embedded",
                              "SEED": str(args.seed)})
    task = load_task("lenet5")
    torch.manual_seed(args.seed)
    data, model = task.build_data(cfg), task.build_model(cfg)
    opt = AdamWSpam(param_groups(model, 0.01), lr=1e-3, reset_interval=args.reset)

    def train(m, o, steps, start):
        for step in range(start, start + steps):
            x, y = data.train.train_batch(step, 64, args.seed)
            task.loss(m, (x, y)).backward()
            o.step()
            o.zero_grad(set_to_none=True)

    train(model, opt, args.reset - 1, 0)  # every step before the reset step R
    before = {name: _mask(model, opt, fn, args.sparsity)
              for name, fn in (("bitter0", hybrid_score), ("bitter1", magnitude_score))}
    twin, twin_opt = copy.deepcopy(model), None
    twin_opt = AdamWSpam(param_groups(twin, 0.01), lr=1e-3, reset_interval=10 ** 9)
    twin_opt.load_state_dict({**opt.state_dict(), "param_groups": [
        dict(g, reset_interval=10 ** 9) for g in opt.state_dict()["param_groups"]]})
    rows, done = [], 0
    for j in OFFSETS:
        train(model, opt, j + 1 - done, args.reset - 1 + done)
        train(twin, twin_opt, j + 1 - done, args.reset - 1 + done)
        done = j + 1
        row = {"steps_after_reset": j}
        for name, fn in (("bitter0", hybrid_score), ("bitter1", magnitude_score)):
            reset = _mask(model, opt, fn, args.sparsity)
            row[f"{name}_vs_no_reset"] = _differs(reset, _mask(twin, twin_opt, fn, args.sparsity))
            row[f"{name}_vs_before_reset"] = _differs(reset, before[name])
        rows.append(row)
    print(f"LeNet-5 + AdamWSpam (reset every {args.reset} steps), global masks at "
          f"{100 * args.sparsity:g} %: fraction of the pruned set that differs")
    print(f"{'steps after reset':>17s} {'bitter0 vs no reset':>20s} {'vs before reset':>16s} "
          f"{'bitter1 vs no reset':>20s}")
    for r in rows:
        print(f"{r['steps_after_reset']:17d} {100 * r['bitter0_vs_no_reset']:19.1f}% "
              f"{100 * r['bitter0_vs_before_reset']:15.1f}% {100 * r['bitter1_vs_no_reset']:19.1f}%")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
