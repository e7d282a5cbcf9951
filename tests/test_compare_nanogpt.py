"""scripts/compare_nanogpt.py against a stand-in nanoGPT checkout that logs in nanoGPT's format."""
import json
import math
import subprocess
import sys
import textwrap

from adamwprune.config.kconfig import ROOT

# Prints what nanoGPT's train.py prints (its f-strings, verbatim): an eval every 250
# iterations, 'iter N: ...' lines with 10 ms per iteration except 900 ms where it evaluated.
FAKE_TRAIN = textwrap.dedent('''
    import sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[2:])
    assert args["device"] == "cpu" and args["n_layer"] == "4" and args["n_embd"] == "128"
    assert args["block_size"] == "64" and args["batch_size"] == "12" and args["dropout"] == "0.0"
    for iter_num in range(int(args["max_iters"]) + 1):
        if iter_num % 250 == 0:
            print(f"step {iter_num}: train loss 2.0000, val loss {3.0 - iter_num / 1000:.4f}")
        dt = 0.9 if iter_num % 250 == 0 else 0.010
        print(f"iter {iter_num}: loss 2.5000, time {dt*1000:.2f}ms, mfu 0.00%")
    # nanoGPT's checkpoint layout, an untrained baby GPT (its parameter names are ours)
    import os
    import torch
    from adamwprune.models.gpt2 import GPT, gpt_config
    os.makedirs(args["out_dir"], exist_ok=True)
    torch.manual_seed(0)
    model = GPT(gpt_config("baby", vocab_size=65, bias=False))
    torch.save({"model": model.state_dict(), "iter_num": 6}, args["out_dir"] + "/ckpt.pt")
''')
FAKE_PREPARE = textwrap.dedent('''
    import numpy as np
    np.random.default_rng(0).integers(0, 65, 10_000).astype(np.uint16).tofile("train.bin")
    open("val.bin", "w").close(); open("meta.pkl", "w").close()
''')
# nanoGPT's model.py interface (GPTConfig, GPT(config)(x, y) -> (logits, loss), configure_optimizers)
FAKE_MODEL = textwrap.dedent('''
    from dataclasses import dataclass
    import torch
    from adamwprune.models import gpt2

    @dataclass
    class GPTConfig:
        n_layer: int; n_head: int; n_embd: int; block_size: int; bias: bool; vocab_size: int; dropout: float

    class GPT(gpt2.GPT):
        def __init__(self, c):
            super().__init__(gpt2.GPTConfig(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer,
                                            n_head=c.n_head, n_embd=c.n_embd, dropout=c.dropout, bias=c.bias))

        def forward(self, idx, targets=None):  # nanoGPT .view()s the targets: they must be contiguous
            assert idx.is_contiguous() and (targets is None or targets.is_contiguous())
            return super().forward(idx, targets)

        def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
            print("num decayed parameter tensors: ...")
            return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
''')


def test_compare_prints_both_step_times_and_their_ratio(tmp_path):
    fake = tmp_path / "nanoGPT"
    (fake / "config").mkdir(parents=True)
    (fake / "data" / "shakespeare_char").mkdir(parents=True)
    (fake / "train.py").write_text(FAKE_TRAIN)
    (fake / "model.py").write_text(FAKE_MODEL)
    (fake / "config" / "train_shakespeare_char.py").write_text("")
    (fake / "data" / "shakespeare_char" / "prepare.py").write_text(FAKE_PREPARE)
    out = tmp_path / "compare.json"
    r = subprocess.run([sys.executable, "scripts/compare_nanogpt.py", "--nanogpt-dir", str(fake), "--rounds", "1",
                        "--max-iters", "6", "--interleaved-blocks", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    # no download: the preset's text was copied in, and nanoGPT's own prepare.py ran on it
    assert (fake / "data" / "shakespeare_char" / "input.txt").stat().st_size == 1_115_394
    result = json.loads(out.read_text())
    for rnd in result["rounds"]:
        # iterations 1..6 (iteration 0 evaluated and is left out): 10 ms each
        assert rnd["nanogpt"]["ms_per_step"] == 10.0 and rnd["nanogpt"]["steps_timed"] == 6
        assert rnd["nanogpt"]["val_loss"] == 3.0 and rnd["nanogpt"]["val_loss_step"] == 0
        ours = rnd["ours"]
        assert ours["steps_timed"] == 6 and ours["ms_per_step"] > 0 and 0 < ours["val_loss"] < 5
        assert rnd["ratio"] == ours["ms_per_step"] / 10.0
        # the untrained model, under our evaluation: about ln(65), a uniform guess over 65 characters
        assert rnd["nanogpt"]["ckpt_iter"] == 6 and abs(rnd["nanogpt"]["val_loss_our_eval"] - math.log(65)) < 0.1
    ab = result["interleaved"]
    assert ab["steps_each"] == 25 and ab["nanogpt_ms"] > 0 and ab["ours_ms"] > 0
    assert ab["ratio"] == ab["ours_ms"] / ab["nanogpt_ms"] and "interleaved in one process" in r.stdout
    assert "ratio ours/nanoGPT" in r.stdout and "median over 1 rounds" in r.stdout


def test_compare_refuses_a_folder_that_is_not_nanogpt(tmp_path):
    r = subprocess.run([sys.executable, "scripts/compare_nanogpt.py", "--nanogpt-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "is not a nanoGPT checkout" in r.stderr and len(r.stderr.splitlines()) == 1
