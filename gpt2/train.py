"""GPT-2 (nanoGPT-style) language modelling: the task the engine trains.

`make defconfig DEFCONFIG=gpt2-shakespeare-tiny && make`, or directly:
    cd gpt2 && python train.py --optimizer adamwprune --pruning-method state --target-sparsity 0.5 \
        --max-iters 200 --set "GPT2_SIZE_TINY=y GPT2_BLOCK_SIZE=64"
Token shards are prepared on first use (or with `make prepare-data`) under
DATA_DIR/tokens/<source>/ (GPT-2 BPE, or characters with DATASET=text_char).
"""
import sys
from pathlib import Path

import numpy as np
import torch

from adamwprune.config.kconfig import resolve_path
from adamwprune.data import chars, tokens
from adamwprune.models.gpt2 import GPT, PADDED_VOCAB, gpt_config
from adamwprune.engine.tasks import Splits, perplexity

DEFAULT_EVAL_BATCHES = 20  # fixed, deterministic windows per split when TRAIN_EVAL_BATCHES=0


def shard_dir(cfg) -> Path:
    """Where the token shards of cfg's dataset live."""
    root = resolve_path(cfg.data_dir) / "tokens"
    if cfg.dataset == "text_char":
        src = resolve_path(cfg.gpt2_text_source)
        return root / f"{src.parent.name}-{src.stem}-char"
    budget = f"-{cfg.gpt2_token_budget}" if cfg.gpt2_token_budget else ""
    if cfg.dataset == "finewebedu":
        return root / f"finewebedu{budget}"
    return root / f"{resolve_path(cfg.gpt2_text_source).name}{budget}"


def prepare(cfg) -> Path:
    """Tokenize the configured source into shards once (atomically); returns their folder."""
    out = shard_dir(cfg)
    if (out / "meta.json").is_file():
        return out
    budget = cfg.gpt2_token_budget or None
    print(f"[gpt2] preparing token shards in {out} (one-time)", flush=True)
    if cfg.dataset == "text_char":
        source = chars.fetch_text(resolve_path(cfg.gpt2_text_source), cfg.gpt2_text_url,
                                  allowed=cfg.data_download)
        chars.prepare_chars(source, out)
    elif cfg.dataset == "finewebedu":
        tokens.prepare_fineweb(out, budget or 10**10, val_fraction=cfg.gpt2_val_fraction)
    else:
        tokens.prepare_text([resolve_path(cfg.gpt2_text_source)], out, cfg.gpt2_val_fraction, budget)
    return out


def vocab_size(cfg) -> int:
    """The model's vocabulary: the character set of a character-level corpus (preparing it
    if needed), else GPT-2's BPE vocabulary padded to a multiple of 64."""
    if cfg.dataset == "text_char":
        return int(chars.read_meta(prepare(cfg))["vocab_size"])
    return PADDED_VOCAB


def held_out_halves(path: Path, block_size: int):
    """Validation = first half of the held-out shard, test = second half."""
    held = np.memmap(path, dtype=np.uint16, mode="r")
    mid = len(held) // 2
    return tokens.TokenData(held[:mid], block_size), tokens.TokenData(held[mid:], block_size)


class GPT2Task:
    name = "gpt2"
    metric_name = "perplexity"
    higher_is_better = False

    def build_model(self, cfg):
        self.micro_batch = max(1, cfg.batch_size // (cfg.grad_accum * cfg.nproc))
        if cfg.gpt2_init_from:  # a Hugging Face checkpoint: its sizes, its weights
            from adamwprune.export.hf_gpt2 import load_hf

            return load_hf(resolve_path(cfg.gpt2_init_from), block_size=cfg.gpt2_block_size,
                           dropout=cfg.gpt2_dropout)
        return GPT(gpt_config(cfg.gpt2_size, block_size=cfg.gpt2_block_size, dropout=cfg.gpt2_dropout,
                              bias=cfg.gpt2_bias, vocab_size=vocab_size(cfg)))

    def build_data(self, cfg) -> Splits:
        block = cfg.gpt2_block_size
        if cfg.dataset == "synthetic":
            train, held = tokens.synthetic_tokens(block, n_train=cfg.synthetic_size * (block + 1),
                                                  n_val=2 * max(4, cfg.synthetic_size // 4) * (block + 1),
                                                  seed=cfg.seed)
            arr = held._tokens()
            mid = len(arr) // 2
            return Splits(train, tokens.TokenData(arr[:mid], block), tokens.TokenData(arr[mid:], block))
        if cfg.dataset not in ("text", "text_char", "finewebedu"):
            raise ValueError(f"GPT-2 trains on text, text_char, finewebedu or synthetic, not {cfg.dataset!r}")
        folder = prepare(cfg)
        if cfg.dataset == "text_char":
            dtype = chars.read_meta(folder)["dtype"]
            return Splits(*(tokens.TokenData(folder / f"{s}.bin", block, dtype) for s in ("train", "val", "test")))
        val, test = held_out_halves(folder / "val.bin", block)
        return Splits(tokens.TokenData(folder / "train.bin", block), val, test)

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        _, loss = model(x, y)
        return loss

    @torch.no_grad()
    def eval_sums(self, model, batch) -> dict:
        x, y = batch
        _, loss = model(x, y)
        n = y.numel()
        return {"loss": loss.float() * n, "tokens": torch.tensor(n)}

    def finish_eval(self, sums):
        mean = sums["loss"] / max(1.0, sums["tokens"])
        return mean, perplexity(mean)

    def eval_batches(self, split, cfg, rank, world_size):
        # The same windows whatever the number of ranks: eval_batches global micro-batches.
        n = (cfg.eval_batches or DEFAULT_EVAL_BATCHES) * world_size
        return split.eval_batches(self.micro_batch, n, rank, world_size)


TASK = GPT2Task()


def prepare_main(argv=None) -> int:
    """`make prepare-data`: tokenize the source .config names."""
    import argparse

    from adamwprune.config.kconfig import ConfigError, load

    p = argparse.ArgumentParser(prog="gpt2/train.py prepare")
    p.add_argument("--config", default=".config")
    p.add_argument("--override", action="append", default=[])
    args = p.parse_args(argv)
    try:
        cfg, _, _ = load(Path(args.config), dict(o.split("=", 1) for o in args.override))
        if cfg.model != "gpt2" or cfg.dataset == "synthetic":
            print("prepare-data: nothing to prepare (the configured model is not GPT-2 on text, "
                  "characters or FineWeb-Edu)")
            return 0
        folder = prepare(cfg)
    except (ConfigError, tokens.DataPrepError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"token shards ready in {folder}")
    return 0


if __name__ == "__main__":
    from adamwprune.cli import direct_main

    if sys.argv[1:2] == ["prepare"]:
        sys.exit(prepare_main(sys.argv[2:]))
    sys.exit(direct_main("gpt2", sys.argv[1:]))
