"""GPT-2 (Radford et al., 2019), following nanoGPT's model.py.

Pre-LayerNorm transformer blocks, causal self-attention through
`scaled_dot_product_attention` (flash/memory-efficient kernels where available),
a 4x GELU MLP, and the token embedding tied to the output head. The vocabulary is
padded from GPT-2's 50,257 to 50,304 (a multiple of 64) so the head's matmul uses
efficient tile sizes; the padded ids never occur in the data.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

PADDED_VOCAB = 50304


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = PADDED_VOCAB
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # nn.GELU's approximate: "none" (exact erf, nanoGPT's) or "tanh" (OpenAI GPT-2's
    # gelu_new, for weights loaded from a Hugging Face checkpoint trained with it).
    gelu_approximate: str = "none"

    def __post_init__(self):
        problems = [f"{k} must be positive, got {getattr(self, k)}"
                    for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
                    if getattr(self, k) < 1]
        if not problems and self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.gelu_approximate not in ("none", "tanh"):
            problems.append(f"gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))


# Sizes by name. gpt2 / gpt2-medium are OpenAI's 124M / 350M models; the small
# ones are for quick experiments (small is nanoGPT's shakespeare-char size, baby
# the CPU variant of that recipe in its README) and for CPU tests (tiny trains in
# seconds). A task may override block_size, vocab_size and bias.
GPT2_PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "mini": GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256),
    "baby": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64),  # nanoGPT's CPU "baby GPT"
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64),
}


def gpt_config(preset: str, **overrides) -> GPTConfig:
    """The preset's config with fields replaced, e.g. gpt_config("gpt2", block_size=512)."""
    if preset not in GPT2_PRESETS:
        raise ValueError(f"unknown GPT-2 preset {preset!r}; "
                         f"valid presets: {', '.join(GPT2_PRESETS)}")
    return dataclasses.replace(GPT2_PRESETS[preset], **overrides)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 language model; `forward(idx, targets)` returns (logits, loss)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf, 2017): one tensor is both the input
        # embedding and the output projection.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each
        # block adds two of them to the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding drops the position embedding (the token
        embedding stays: tied to lm_head, it is used as weights), as nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs (forward + backward) per token: 6N for the weights plus
        12*L*H*Q*T for attention (PaLM appendix B, as nanoGPT's estimate_mfu)."""
        cfg = self.config
        t = cfg.block_size if seq_len is None else seq_len
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * t

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return self.flops_per_token() * tokens_per_second / peak_flops

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t} is longer than block_size "
                             f"{self.config.block_size}; crop it or raise block_size")
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss
