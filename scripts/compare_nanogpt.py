"""Our engine against nanoGPT's own train.py on nanoGPT's CPU shakespeare-char recipe.

    .venv/bin/python scripts/compare_nanogpt.py --nanogpt-dir /path/to/nanoGPT [--rounds 3]
    make bench NANOGPT_DIR=/path/to/nanoGPT        (the benchmark, then this comparison)

DIR is a local checkout of https://github.com/karpathy/nanoGPT; nothing is
downloaded. If DIR/data/shakespeare_char/ has no shards yet, this script copies the
preset's text (GPT2_TEXT_SOURCE of `gpt2-shakespeare-char`) there as input.txt and
runs nanoGPT's own prepare.py on it, so nanoGPT never downloads either.

Each round runs both, one after the other (the order alternates between rounds so
that a change of machine load falls on both alike), with the recipe of nanoGPT's
README ("baby GPT" on a CPU: 4 layers, 4 heads, width 128, block 64, batch 12,
AdamW lr 1e-3, beta2 0.99, warm-up 100, cosine to 1e-4, dropout 0, no biases) and
our preset `gpt2-shakespeare-char`, which sets the same. ms/step is the mean time of
a training step with evaluation left out: for nanoGPT the mean of its logged
per-iteration times over the iterations that did not evaluate (iteration 0, which
also builds everything, left out); for ours `step_time_s` of final.json (the engine
times train_step alone). Printed per round, with the ratio ours / nanoGPT, and the
median over rounds; also the validation loss each reached at the last step (nanoGPT:
its estimate from 20 random batches; ours: TRAIN_EVAL_BATCHES fixed batches), and,
so that the two losses are measured alike, nanoGPT's last checkpoint (out_dir/ckpt.pt,
the model's parameter names are ours) evaluated by our evaluation on our
validation windows. Each round also records the machine's load average.

Separate processes minutes apart see different load on a shared machine. So the
script ends with an interleaved measurement in one process: nanoGPT's own model
(its model.py, imported from DIR) and optimizer (its configure_optimizers) stepped
by a plain PyTorch loop (forward, backward, clipping at 1.0, step, zero_grad, on
random windows of its train.bin), against our engine's Trainer.train_step on the
preset, in alternating blocks of BLOCK_STEPS steps (--interleaved-blocks blocks;
0 skips it), median ms/step of each and the ratio. Load falls on both alike there.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESET = "gpt2-shakespeare-char"
EVAL_INTERVAL = 250
BLOCK_STEPS = 25  # steps per block of the interleaved measurement; the first block of each is warm-up
# nanoGPT README, "I only have a macbook": the CPU command line.
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--dropout=0.0", f"--eval_interval={EVAL_INTERVAL}"]
ITER_LINE = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")
VAL_LINE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def fail(msg: str) -> None:
    sys.exit(f"error: {msg}")


def check_checkout(nanogpt: Path) -> None:
    if not (nanogpt / "train.py").is_file() or not (nanogpt / "config" / "train_shakespeare_char.py").is_file():
        fail(f"{nanogpt} is not a nanoGPT checkout (no train.py / config/train_shakespeare_char.py); "
             "clone https://github.com/karpathy/nanoGPT somewhere and pass --nanogpt-dir (or NANOGPT_DIR=)")


def prepare_nanogpt_data(nanogpt: Path, text: Path) -> None:
    """nanoGPT's shards from our text, with nanoGPT's own prepare.py (which then downloads nothing)."""
    data = nanogpt / "data" / "shakespeare_char"
    if all((data / f).is_file() for f in ("train.bin", "val.bin", "meta.pkl")):
        return
    if not (data / "input.txt").is_file():
        if not text.is_file():
            fail(f"{text} not found: put tiny Shakespeare there or copy it to {data / 'input.txt'}")
        shutil.copyfile(text, data / "input.txt")
    print(f"[compare] preparing nanoGPT's shards with {data / 'prepare.py'}", flush=True)
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True)


def our_config(tmp: Path, max_iters: int) -> tuple[Path, Path]:
    """The preset as a .config in tmp, and the text file it names."""
    from adamwprune.config import kconfig as C

    path = tmp / "ours.config"
    kconf = C.load_kconfig()
    C.load_file(kconf, C.find_defconfig(PRESET))
    C.apply_overrides(kconf, {"MAX_ITERS": str(max_iters), "TRAIN_EVAL_INTERVAL": str(EVAL_INTERVAL)})
    cfg = C.to_config(kconf)
    C.write_config(kconf, path, defconfig=PRESET)
    return path, C.resolve_path(cfg.gpt2_text_source)


def run_nanogpt(nanogpt: Path, out: Path, max_iters: int, env: dict) -> dict:
    cmd = [sys.executable, "train.py", *NANOGPT_ARGS, f"--max_iters={max_iters}",
           f"--lr_decay_iters={max_iters}", f"--out_dir={out}"]
    proc = subprocess.run(cmd, cwd=nanogpt, env=env, capture_output=True, text=True)
    if proc.returncode:
        fail(f"nanoGPT's train.py exited with {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    times, val = [], None
    for line in proc.stdout.splitlines():
        if m := ITER_LINE.match(line):
            it = int(m.group(1))
            if it and it % EVAL_INTERVAL:
                times.append(float(m.group(2)))
        elif m := VAL_LINE.match(line):
            val = (int(m.group(1)), float(m.group(3)))
    if not times or val is None:
        fail(f"could not read nanoGPT's log (no 'iter N: ... time Xms' lines):\n{proc.stdout[-2000:]}")
    return {"ms_per_step": statistics.fmean(times), "steps_timed": len(times),
            "val_loss_step": val[0], "val_loss": val[1]}


def our_loss_of(ckpt_path: Path, config: Path) -> tuple[int, float]:
    """(iteration, validation loss) of a nanoGPT checkpoint under our evaluation."""
    import torch
    from adamwprune.config import kconfig as C
    from adamwprune.cli import load_task

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg, _, _ = C.load(config)
    task = load_task("gpt2")
    splits = task.build_data(cfg)
    model = task.build_model(cfg)
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for batch in task.eval_batches(splits.val, cfg, 0, 1):
            sums = task.eval_sums(model, batch)
            total, count = total + float(sums["loss"]), count + float(sums["tokens"])
    return int(ckpt["iter_num"]), total / count


def interleaved(nanogpt: Path, config: Path, blocks: int, threads: int) -> dict:
    """Median ms/step of nanoGPT's model and optimizer in a plain loop and of our
    Trainer.train_step, timed in alternating blocks in this process."""
    import numpy as np
    import torch
    from adamwprune.config import kconfig as C
    from adamwprune.cli import load_task
    from adamwprune.engine.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(nanogpt))
    from model import GPT as NanoGPT, GPTConfig as NanoConfig  # nanoGPT's model.py

    cfg, _, _ = C.load(config, {"MAX_ITERS": "1000000000"})
    with tempfile.TemporaryDirectory(prefix="compare-nanogpt-ab-") as d:
        trainer = Trainer(load_task("gpt2"), cfg, Path(d) / "run", config_text="")
        trainer.setup()
        torch.manual_seed(1337)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
            model = NanoGPT(NanoConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False,
                                       vocab_size=65, dropout=0.0))
            opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
        data = np.memmap(nanogpt / "data" / "shakespeare_char" / "train.bin", dtype=np.uint16, mode="r")

        def nano_step():
            ix = torch.randint(len(data) - 64, (12,)).numpy()[:, None] + np.arange(65)
            chunk = torch.from_numpy(data[ix].astype(np.int64))
            _, loss = model(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())  # it .view()s targets
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()

        times = {"ours": [], "nanogpt": []}
        for block in range(blocks):
            for who in (("nanogpt", "ours") if block % 2 == 0 else ("ours", "nanogpt")):
                step = nano_step if who == "nanogpt" else trainer.train_step
                for _ in range(BLOCK_STEPS):
                    t = time.perf_counter()
                    step()
                    times[who].append(time.perf_counter() - t)
        trainer.loss.read()
        if trainer.sampler is not None:
            trainer.sampler.stop()
    med = {k: 1000.0 * statistics.median(v[BLOCK_STEPS:]) for k, v in times.items()}
    return {"nanogpt_ms": med["nanogpt"], "ours_ms": med["ours"], "ratio": med["ours"] / med["nanogpt"],
            "steps_each": len(times["ours"]) - BLOCK_STEPS, "threads": torch.get_num_threads()}


def run_ours(config: Path, run_dir: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "adamwprune", "run", "--config", str(config), "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    final_path = run_dir / "final.json"
    if proc.returncode or not final_path.is_file():
        fail(f"our run exited with {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    final = json.loads(final_path.read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"ms_per_step": 1000.0 * final["step_time_s"], "steps_timed": final["steps"],
            "val_loss_step": rows[-1]["step"], "val_loss": rows[-1]["val_loss"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt-dir", default=os.environ.get("NANOGPT_DIR"),
                   help="a local nanoGPT checkout (default: $NANOGPT_DIR)")
    p.add_argument("--rounds", type=int, default=3, help="alternating pairs of runs (default 3; 0: only the "
                   "interleaved measurement)")
    p.add_argument("--max-iters", type=int, default=2000, help="steps of each run (the recipe: 2000)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both (0: leave as is)")
    p.add_argument("--interleaved-blocks", type=int, default=16,
                   help=f"blocks of {BLOCK_STEPS} steps each for the one-process measurement (0: skip)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "compare_nanogpt.json")
    args = p.parse_args(argv)
    if not args.nanogpt_dir:
        fail("pass --nanogpt-dir DIR (or NANOGPT_DIR=DIR): a local checkout of https://github.com/karpathy/nanoGPT")
    nanogpt = Path(args.nanogpt_dir).resolve()
    check_checkout(nanogpt)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="compare-nanogpt-") as d:
        tmp = Path(d)
        config, text = our_config(tmp, args.max_iters)
        prepare_nanogpt_data(nanogpt, text)
        for r in range(args.rounds):
            order = ("nanogpt", "ours") if r % 2 == 0 else ("ours", "nanogpt")
            result = {}
            for who in order:
                t = time.time()
                result[who] = (run_nanogpt(nanogpt, tmp / f"nanogpt-{r}", args.max_iters, env) if who == "nanogpt"
                               else run_ours(config, tmp / f"ours-{r}", env))
                result[who]["wall_s"] = time.time() - t
            result["ratio"] = result["ours"]["ms_per_step"] / result["nanogpt"]["ms_per_step"]
            result["load_average_1min"] = os.getloadavg()[0]
            ckpt = tmp / f"nanogpt-{r}" / "ckpt.pt"
            if ckpt.is_file():
                it, loss = our_loss_of(ckpt, config)
                result["nanogpt"].update(ckpt_iter=it, val_loss_our_eval=loss)
            rounds.append(result)
            n, o = result["nanogpt"], result["ours"]
            ours_eval = (f"; {n['val_loss_our_eval']:.4f} by our evaluation at {n['ckpt_iter']}"
                         if "val_loss_our_eval" in n else "")
            print(f"round {r + 1}: nanoGPT {n['ms_per_step']:.2f} ms/step (val loss {n['val_loss']:.4f} at "
                  f"{n['val_loss_step']}{ours_eval}) | ours {o['ms_per_step']:.2f} ms/step (val loss "
                  f"{o['val_loss']:.4f} at {o['val_loss_step']}) | ratio ours/nanoGPT {result['ratio']:.3f} "
                  f"| load average {result['load_average_1min']:.1f}", flush=True)
        ab = interleaved(nanogpt, config, args.interleaved_blocks, args.threads) if args.interleaved_blocks else None
    if ab:
        print(f"interleaved in one process ({ab['steps_each']} steps each, {ab['threads']} threads): nanoGPT "
              f"{ab['nanogpt_ms']:.2f} ms/step, ours {ab['ours_ms']:.2f} ms/step (medians), ratio {ab['ratio']:.3f}")
    if not rounds:
        return 0
    ratio = statistics.median(r["ratio"] for r in rounds)
    fastest = min(r["ours"]["ms_per_step"] for r in rounds) / min(r["nanogpt"]["ms_per_step"] for r in rounds)
    summary = {"preset": PRESET, "max_iters": args.max_iters, "rounds": rounds, "median_ratio": ratio,
               "ratio_of_fastest_rounds": fastest, "interleaved": ab,
               "nanogpt_dir": str(nanogpt), "threads": args.threads or None, "cpu_count": os.cpu_count(),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".{args.out.name}.tmp")
    tmp_out.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"median over {len(rounds)} rounds: nanoGPT {statistics.median(r['nanogpt']['ms_per_step'] for r in rounds):.2f}"
          f" ms/step, ours {statistics.median(r['ours']['ms_per_step'] for r in rounds):.2f} ms/step, "
          f"ratio {ratio:.3f} (target <= 1.10); fastest rounds: ratio {fastest:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
