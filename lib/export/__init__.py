"""Export: a run's best model as plain safetensors, a compressed-tensors copy and (GPT-2)
a Hugging Face folder, with sizes, FLOPs and the re-evaluated metric (`make export`)."""
from .compressed import choose_pattern, read_compressed, write_compressed
from .hf_gpt2 import load_hf, save_hf
from .run import ExportError, export_run, load_exported

__all__ = ["ExportError", "choose_pattern", "export_run", "load_exported", "load_hf",
           "read_compressed", "save_hf", "write_compressed"]
