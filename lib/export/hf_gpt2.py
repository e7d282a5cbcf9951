"""Our GPT-2 (nanoGPT's layout) to and from Hugging Face ``GPT2LMHeadModel`` folders.

The two models compute the same function; the differences are in the layout:

* HF's attention and MLP projections are ``Conv1D`` modules whose weight is
  ``[in, out]``; ours are ``nn.Linear`` (``[out, in]``): transposed both ways.
* HF's GPT-2 always has biases; a model of ours built with ``bias=False`` is
  written with zero biases (the same function).
* The activation: ours is ``nn.GELU(approximate=...)``; HF's default ``gelu_new``
  is the tanh approximation written in Python ops. We export "gelu" (exact erf) or
  "gelu_pytorch_tanh" (torch's own tanh kernel, bit-identical to ours) and import
  "gelu_new" as the tanh approximation (equal to rounding, not bit for bit).
* The vocabulary: ours is padded (50,304 for GPT-2's 50,257); we export the whole
  table, so logits keep our shape (the padded ids never occur in our data), and
  import a checkpoint's table as it is.
* The token embedding and the head are tied in both; the head is not written.

``save_hf`` writes a folder that ``GPT2LMHeadModel.from_pretrained`` loads offline;
``load_hf`` builds our model from such a folder (``GPT2_INIT_FROM`` in Kconfig).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..models.gpt2 import GPT, GPTConfig

# Our Linear layers inside a block, which HF stores as Conv1D ([in, out]).
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_BLOCK_NORMS = ("ln_1", "ln_2")
_ACT_EXPORT = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}
_ACT_IMPORT = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh",
               "gelu_python_tanh": "tanh"}
GPT2_EOT = 50256  # GPT-2's <|endoftext|>
# tiktoken's GPT-2 files (its cache keys are the SHA-1 of these addresses): HF's
# vocab.json is GPT-2's encoder.json and merges.txt is its vocab.bpe.
_BPE_FILES = {"vocab.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
              "merges.txt": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"}


class HFConversionError(ValueError):
    """A Hugging Face checkpoint this model cannot represent; the message says which option."""


def hf_config(cfg: GPTConfig):
    """The ``transformers.GPT2Config`` of our config."""
    from transformers import GPT2Config

    eot = GPT2_EOT if cfg.vocab_size > GPT2_EOT else None
    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=None,
                      activation_function=_ACT_EXPORT[cfg.gelu_approximate],
                      resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                      layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                      bos_token_id=eot, eos_token_id=eot, architectures=["GPT2LMHeadModel"])


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state_dict -> GPT2LMHeadModel's (Conv1D weights transposed, zero biases where
    ours has none, the tied head left out)."""
    out = {"transformer.wte.weight": state["transformer.wte.weight"],
           "transformer.wpe.weight": state["transformer.wpe.weight"]}
    zeros = lambda n: torch.zeros(n, dtype=state["transformer.wte.weight"].dtype)
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for name in _CONV1D:
            w = state[f"{p}{name}.weight"]
            out[f"{p}{name}.weight"] = w.t().contiguous()
            out[f"{p}{name}.bias"] = state.get(f"{p}{name}.bias", zeros(w.shape[0]))
        for name in _BLOCK_NORMS:
            out[f"{p}{name}.weight"] = state[f"{p}{name}.weight"]
            out[f"{p}{name}.bias"] = state.get(f"{p}{name}.bias", zeros(cfg.n_embd))
    out["transformer.ln_f.weight"] = state["transformer.ln_f.weight"]
    out["transformer.ln_f.bias"] = state.get("transformer.ln_f.bias", zeros(cfg.n_embd))
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state_dict -> ours (with biases: ``cfg.bias`` must be True)."""
    out = {"transformer.wte.weight": hf["transformer.wte.weight"],
           "transformer.wpe.weight": hf["transformer.wpe.weight"][:cfg.block_size],
           "transformer.ln_f.weight": hf["transformer.ln_f.weight"],
           "transformer.ln_f.bias": hf["transformer.ln_f.bias"]}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for name in _CONV1D:
            out[f"{p}{name}.weight"] = hf[f"{p}{name}.weight"].t().contiguous()
            out[f"{p}{name}.bias"] = hf[f"{p}{name}.bias"]
        for name in _BLOCK_NORMS:
            out[f"{p}{name}.weight"] = hf[f"{p}{name}.weight"]
            out[f"{p}{name}.bias"] = hf[f"{p}{name}.bias"]
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def save_hf(model: GPT, folder: Path, tokenizer: bool = False) -> None:
    """Write ``folder`` (config.json, model.safetensors[, tokenizer files]) for
    ``GPT2LMHeadModel.from_pretrained(folder)``."""
    from transformers import GPT2LMHeadModel

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf = GPT2LMHeadModel(hf_config(model.config))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(state, model.config), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
    assert not missing and not unexpected, (missing, unexpected)
    hf.tie_weights()
    hf.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer:
        write_gpt2_tokenizer(folder)


def write_gpt2_tokenizer(folder: Path) -> None:
    """GPT-2's BPE tokenizer files, from tiktoken's cache (no download when the cache
    holds them: TIKTOKEN_CACHE_DIR), as HF's tokenizer.json + tokenizer_config.json."""
    import tempfile

    from tiktoken.load import read_file_cached
    from transformers import GPT2Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, url in _BPE_FILES.items():
            try:
                data = read_file_cached(url)
            except Exception as exc:  # offline without a cache: requests' errors
                raise FileNotFoundError(
                    f"GPT-2's BPE file {name} is not in tiktoken's cache ({type(exc).__name__}); "
                    "set TIKTOKEN_CACHE_DIR=../shared/data/tiktoken-cache") from None
            paths[name] = Path(tmp) / name
            paths[name].write_bytes(data)
        tok = GPT2Tokenizer(vocab=str(paths["vocab.json"]), merges=str(paths["merges.txt"]))
        tok.save_pretrained(str(folder))
        for name, path in paths.items():
            shutil.copyfile(path, Path(folder) / name)


def _check_supported(hc) -> None:
    problems = []
    if hc.activation_function not in _ACT_IMPORT:
        problems.append(f"activation_function={hc.activation_function!r} (supported: "
                        f"{', '.join(_ACT_IMPORT)})")
    if hc.n_inner not in (None, 4 * hc.n_embd):
        problems.append(f"n_inner={hc.n_inner} (ours is 4 x n_embd = {4 * hc.n_embd})")
    for flag, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                     ("scale_attn_weights", True)):
        if bool(getattr(hc, flag, ok)) != ok:
            problems.append(f"{flag}={getattr(hc, flag)}")
    if abs(hc.layer_norm_epsilon - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon={hc.layer_norm_epsilon} (ours is 1e-5)")
    if hc.tie_word_embeddings is False:
        problems.append("tie_word_embeddings=False (ours ties the head to the embedding)")
    if problems:
        raise HFConversionError("the Hugging Face GPT-2 checkpoint uses options our model does not "
                                "have: " + "; ".join(problems))


def load_hf(folder: os.PathLike, block_size: Optional[int] = None, dropout: float = 0.0) -> GPT:
    """Our GPT with the weights of a ``GPT2LMHeadModel`` folder (read offline). Sizes come
    from the checkpoint; ``block_size`` may crop its position table (as nanoGPT's
    crop_block_size)."""
    from transformers import GPT2LMHeadModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a Hugging Face checkpoint folder (no config.json); "
                                "set GPT2_INIT_FROM to a folder written by save_pretrained()")
    hf = GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True)
    hc = hf.config
    _check_supported(hc)
    block = hc.n_positions if block_size is None else block_size
    if block > hc.n_positions:
        raise HFConversionError(f"GPT2_BLOCK_SIZE={block} is longer than the checkpoint's "
                                f"{hc.n_positions} positions; set GPT2_BLOCK_SIZE <= {hc.n_positions}")
    cfg = GPTConfig(block_size=block, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                    n_head=hc.n_head, n_embd=hc.n_embd, dropout=dropout, bias=True,
                    gelu_approximate=_ACT_IMPORT[hc.activation_function])
    model = GPT(cfg)
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    return model
