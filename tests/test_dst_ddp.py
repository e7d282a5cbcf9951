"""Dynamic sparse training under DDP: two gloo ranks that see different data keep the
same masks (RigL averages its dense gradient over ranks, SET draws from generators
seeded by seed, step and tensor, AdamWPrune regrows by the gradient DDP averaged)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adamwprune import AdamWPrune, param_groups
from adamwprune.pruning.dst import RigLPruner, SETPruner


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _masks(model, pruner, kind):
    if kind == "adamwprune":
        return {n: (p == 0).clone() for n, p in model.named_parameters() if p.dim() > 1}
    return {n: m.clone() for n, m in pruner.masks.items()}


KINDS = ("rigl", "set", "adamwprune")


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {kind: _train(rank, kind) for kind in KINDS}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def _train(rank, kind):
    model = _net()
    if kind == "adamwprune":
        opt = AdamWPrune(param_groups(model, 0.01), lr=1e-2, target_sparsity=0.7, start_step=0, end_step=40,
                         interval=5, regrow="gradient", drop_fraction=0.3, distribution="erk", seed=3)
        pruner = None
    else:
        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2)
        pruner = {"rigl": RigLPruner, "set": SETPruner}[kind](model, 0.7, 0, 40, 5, optimizer=opt, seed=3)
    ddp = nn.parallel.DistributedDataParallel(model)
    first = None
    for t in range(30):
        gen = torch.Generator().manual_seed(1000 * rank + t)  # every rank its own data
        x = torch.randn(16, 12, generator=gen)
        loss = ddp(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pruner is not None:
            pruner.step()
        if first is None:
            first = _masks(model, pruner, kind)
    return {"first": first, "last": _masks(model, pruner, kind),
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "gathered.pt"
    mp.spawn(_worker, args=(2, _port(), str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("kind", KINDS)
def test_two_gloo_ranks_with_different_data_keep_the_same_masks(gathered, kind):
    a, b = gathered[0][kind], gathered[1][kind]
    assert a["last"].keys() == b["last"].keys() and a["last"]
    for name in a["last"]:
        assert torch.equal(a["last"][name], b["last"][name]), name
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
    # the masks did move (a test of identical masks that never change proves nothing)
    assert any(not torch.equal(a["first"][n], a["last"][n]) for n in a["last"]), "masks never changed"
