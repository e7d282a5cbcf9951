"""GPT-2 to and from Hugging Face transformers: same logits both ways, a run that starts
from a HF folder, and `make export` of a GPT-2 run (offline, with the BPE tokenizer)."""
import json
import os

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from adamwprune.config import kconfig as C
from adamwprune.cli import load_task
from adamwprune.config.kconfig import ROOT
from adamwprune.engine.trainer import Trainer
from adamwprune.export import export_run, load_hf, save_hf
from adamwprune.export.hf_gpt2 import HFConversionError
from adamwprune.models.gpt2 import GPT, gpt_config

CACHE = ROOT.parent / "shared" / "data" / "tiktoken-cache"


def hf_tiny(folder, activation="gelu_new", seed=0, **extra):
    """A tiny GPT2LMHeadModel made and saved by transformers, with non-trivial biases and norms."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        activation_function=activation, **extra)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    return model


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("activation,tol", [("gelu_new", 1e-5), ("gelu_pytorch_tanh", 0.0), ("gelu", 0.0)])
def test_hf_checkpoint_gives_the_same_logits_in_our_model(tmp_path, activation, tol):
    hf = hf_tiny(tmp_path, activation)
    ours = load_hf(tmp_path).eval()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    diff = (logits(ours, x) - logits(hf, x)).abs().max().item()
    # gelu_new is the tanh formula in Python ops, ours torch's tanh kernel: equal to rounding
    assert diff <= tol if tol else diff < 1e-6
    assert ours.config.gelu_approximate == ("none" if activation == "gelu" else "tanh")


@pytest.mark.parametrize("bias", [True, False])
def test_our_model_exported_to_hf_gives_our_logits(tmp_path, bias):
    torch.manual_seed(0)
    ours = GPT(gpt_config("tiny", vocab_size=200, bias=bias)).eval()
    save_hf(ours, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path), local_files_only=True).eval()
    x = torch.randint(0, 200, (2, 64), generator=torch.Generator().manual_seed(2))
    assert (logits(ours, x) - logits(hf, x)).abs().max().item() < 1e-6
    assert hf.transformer.wte.weight.data_ptr() == hf.lm_head.weight.data_ptr()  # still tied
    if not bias:
        assert torch.count_nonzero(hf.transformer.h[0].mlp.c_fc.bias) == 0


def test_export_then_import_is_the_identity(tmp_path):
    torch.manual_seed(3)
    ours = GPT(gpt_config("tiny", vocab_size=200))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    save_hf(ours, tmp_path)
    back = load_hf(tmp_path)
    assert back.config == ours.config
    a, b = ours.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_unsupported_hf_options_are_refused_by_name(tmp_path):
    hf_tiny(tmp_path, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(HFConversionError, match="scale_attn_by_inverse_layer_idx"):
        load_hf(tmp_path)
    with pytest.raises(HFConversionError, match="GPT2_BLOCK_SIZE=64 .* 32 positions"):
        hf_tiny(tmp_path / "ok")
        load_hf(tmp_path / "ok", block_size=64)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(tmp_path / "missing")


def test_a_run_can_start_from_a_hf_folder_set_in_kconfig(tmp_path):
    hf = hf_tiny(tmp_path / "hf")
    cfg, _, _ = C.load(None, {"MODEL": "gpt2", "DATASET": "synthetic", "DATA_SYNTHETIC_SIZE": "64",
                              "GPT2_INIT_FROM": str(tmp_path / "hf"), "GPT2_BLOCK_SIZE": "16",
                              "BATCH_SIZE": "4", "MAX_ITERS": "2", "TRAIN_EVAL_INTERVAL": "2",
                              "TRAIN_EVAL_BATCHES": "1", "DEVICE": "cpu", "OPTIMIZER": "adamw",
                              "PRUNING": "movement", "PRUNING_TARGET_SPARSITY": "0.5",
                              "RUN_MONITOR_INTERVAL": "0.2"})
    task = load_task("gpt2")
    model = task.build_model(cfg).eval()
    x = torch.randint(0, 256, (1, 16))
    assert (logits(model, x) - logits(hf, x)).abs().max().item() < 1e-5
    assert model.config.block_size == 16 and model.config.vocab_size == 256
    final = Trainer(task, cfg, tmp_path / "run", config_text="").fit()
    assert final["status"] == "completed" and final["params_total"] == model.num_params(False)


@pytest.fixture(scope="module")
def gpt_export(tmp_path_factory):
    if not CACHE.is_dir():
        pytest.skip("no offline tiktoken cache beside the checkout")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(CACHE))
    tmp = tmp_path_factory.mktemp("gpt")
    cfg, _, _ = C.load(ROOT / "gpt2" / "defconfigs" / "gpt2-shakespeare-tiny",
                       {"DATA_DIR": str(tmp / "data"), "MAX_ITERS": "6", "TRAIN_EVAL_INTERVAL": "6",
                        "BATCH_SIZE": "4", "TRAIN_EVAL_BATCHES": "2", "GPT2_TOKEN_BUDGET": "100000",
                        "GPT2_BLOCK_SIZE": "32", "PRUNING_TARGET_SPARSITY": "0.9",
                        "RUN_MONITOR_INTERVAL": "0.2", "PRUNING_RAMP_END": "0.5"})
    Trainer(load_task("gpt2"), cfg, tmp / "run", config_text="").fit()
    return tmp / "run", export_run(tmp / "run", quiet=True)


def test_gpt2_export_writes_a_hf_folder_with_our_logits_and_metric(gpt_export):
    path, report = gpt_export
    hf_dir = path / "export" / "hf"
    hf = GPT2LMHeadModel.from_pretrained(str(hf_dir), local_files_only=True).eval()
    state = torch.load(path / "best.pt", weights_only=True)
    ours = GPT(gpt_config("tiny", block_size=32))
    ours.load_state_dict(state["model"])
    x = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(4))
    assert (logits(ours.eval(), x) - logits(hf, x)).abs().max().item() < 1e-5
    m = report["test_metric"]
    assert m["all_equal"] and m["run"] == m["exported"] == m["hf"]
    assert report["hf"]["logits_max_abs_diff"] < 1e-5 and report["hf"]["tokenizer"]
    # the tied head is stored once
    assert json.loads((hf_dir / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in report["tensors"]
    assert report["prunable"]["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_gpt2_export_tokenizer_matches_tiktoken(gpt_export):
    import tiktoken

    path, _ = gpt_export
    tok = AutoTokenizer.from_pretrained(str(path / "export" / "hf"), local_files_only=True)
    text = (ROOT.parent / "shared" / "data" / "text" / "shakespeare").glob("*.txt")
    sample = next(iter(sorted(text))).read_text()[:20000] + "\n\n  tabs\tand  spaces 123"
    assert tok.encode(sample) == tiktoken.get_encoding("gpt2").encode_ordinary(sample)
