"""Movement pruning under coupled L2 decay (Adam) against decoupled decay (AdamW).

Movement pruning keeps the dense weights under its mask so that an entry can come
back. Under Adam's coupled decay the gradient of a masked entry is lambda * w, and
Adam normalises it: the entry moves by about lr per step towards 0 whatever
lambda is, so the dense weights under the mask collapse within tens of steps and
no longer compete for a place in the mask. AdamW's decoupled decay shrinks them
by only (1 - lr * lambda) per step. This script measures it on LeNet-5 (embedded
MNIST digits): mean |w| of the masked entries when the first mask is set and
after the run, and how many masked entries the later mask updates let back.

    .venv/bin/python scripts/movement_coupled_decay.py [--steps 300] [--decay 0.1]
"""
from __future__ import annotations

import argparse
import json

import torch

from adamwprune import MovementPruner, param_groups
from adamwprune.config import kconfig as C
from adamwprune.cli import load_task


FIRST = 30  # steps before the first mask


def run(optimizer: str, steps: int, decay: float, lr: float, seed: int, ramp: bool) -> dict:
    """``steps`` steps after the first mask at step FIRST; one mask (ramp False) or
    an update every steps // 10 steps to 2/3 of the run (ramp True)."""
    cfg, _, _ = C.load(None, {"MODEL": "lenet5", "DATASET": "mnist_embedded", "SEED": str(seed)})
    task = load_task("lenet5")
    torch.manual_seed(seed)
    data, model = task.build_data(cfg), task.build_model(cfg)
    end = FIRST + (steps * 2 // 3 if ramp else 0)
    pruner = MovementPruner(model, 0.5, FIRST, end, max(1, steps // 10))
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    opt = cls(param_groups(model, decay), lr=lr)
    pruner.attach(opt)
    masked_at_first, came_back, previous = None, 0, None
    for step in range(FIRST + steps):
        x, y = data.train.train_batch(step, 64, seed)
        task.loss(model, (x, y)).backward()
        opt.step()
        pruner.step()
        opt.zero_grad(set_to_none=True)
        masks = pruner.masks()
        if previous is not None:
            came_back += sum(int((previous[k] & ~masks[k]).sum()) for k in masks)
        previous = {k: m.clone() for k, m in masks.items()}
        if masked_at_first is None and any(m.any() for m in masks.values()):
            masked_at_first = _masked_mean(pruner)
    return {"optimizer": optimizer, "weight_decay": decay, "lr": lr, "steps_after_mask": steps,
            "mask_updates": "ramp" if ramp else "one",
            "mean_abs_w_masked_at_first_mask": masked_at_first,
            "mean_abs_w_masked_at_end": _masked_mean(pruner),
            "entries_let_back_by_mask_updates": came_back}


@torch.no_grad()
def _masked_mean(pruner: MovementPruner) -> float:
    total, count = 0.0, 0
    for name, _, p in pruner.prunable:
        mask = pruner.masks()[name]
        total += float(p[mask].abs().sum())
        count += int(mask.sum())
    return total / max(1, count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--decay", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [run(o, args.steps, args.decay, args.lr, args.seed, ramp) for ramp in (False, True)
            for o in ("adam", "adamw")]
    print(f"LeNet-5, movement pruning to 50 %, weight decay {args.decay}, lr {args.lr}; first mask "
          f"at step {FIRST}, then {args.steps} steps")
    print(f"{'optimizer':9s} {'mask updates':>12s} {'mean |w| masked, first mask':>28s} "
          f"{'at the end':>11s} {'let back':>9s}")
    for r in rows:
        print(f"{r['optimizer']:9s} {r['mask_updates']:>12s} "
              f"{r['mean_abs_w_masked_at_first_mask']:28.4f} {r['mean_abs_w_masked_at_end']:11.4f} "
              f"{r['entries_let_back_by_mask_updates']:9d}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
