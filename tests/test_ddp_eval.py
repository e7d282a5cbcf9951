"""Evaluation under DDP: any number of ranks, any split size, the metric of one process
(issue 13, item 4: `make NPROC=2` crashed on LeNet-5 where rank 1 had no batch)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from adamwprune.config.kconfig import ROOT
from adamwprune.data.base import ArrayData

# One rank of an evaluation of LeNet-5 (seeded initial weights) on the embedded split.
EVAL = r"""
import contextlib, json
import torch
from adamwprune.config import kconfig as C
from adamwprune.cli import load_task
from adamwprune.engine.distributed import DistContext
from adamwprune.engine.trainer import Trainer


def evaluate(out):
    cfg, _, _ = C.load(C.ROOT / "lenet5" / "defconfigs" / "lenet5-demo", {"DEVICE": "cpu"})
    dist = DistContext.from_env()
    task = load_task("lenet5")
    t = Trainer(task, cfg, out / "run", dist=dist)
    t.device = torch.device("cpu")
    dist.init(t.device)
    torch.manual_seed(0)
    t.data, t.model, t.amp = task.build_data(cfg), task.build_model(cfg), contextlib.nullcontext()
    result = {"val": t.evaluate(t.data.val), "test": t.evaluate(t.data.test),
              "n": t.eval_sums(t.data.test)["_examples"]}
    dist.close()
    return result
"""
RANK = EVAL + r"""
import json, sys
from pathlib import Path
result = evaluate(Path(sys.argv[1]))
if int(sys.argv[2]) == 0:
    (Path(sys.argv[1]) / "result.json").write_text(json.dumps(result))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process(out):
    namespace = {}
    exec(compile(EVAL, "eval", "exec"), namespace)
    return json.loads(json.dumps(namespace["evaluate"](out)))  # tuples -> lists, as from the ranks


def _ranks(out, world):
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", RANK, str(out), str(rank)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    return json.loads((out / "result.json").read_text())


def test_lenet5_evaluation_with_two_gloo_ranks_equals_one_rank(tmp_path):
    # 500 test images in batches of 1000: rank 1 has no batch at all.
    one, two = _one_process(tmp_path), _ranks(tmp_path, 2)
    assert one["n"] == two["n"] == 500
    for split in ("val", "test"):
        assert two[split][1] == one[split][1]  # accuracy: the same correct count of the same images
        assert two[split][0] == pytest.approx(one[split][0], rel=1e-12)


def test_evaluation_batch_limit_counts_batches_of_the_whole_split():
    data = ArrayData(torch.arange(10.0).view(10, 1), torch.arange(10))
    seen = [x.flatten().tolist() for r in range(2) for x, _ in data.eval_batches(2, r, 2, max_batches=3)]
    assert sorted(v for b in seen for v in b) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # batches 0, 1, 2 once
