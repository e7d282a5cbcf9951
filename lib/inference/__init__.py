"""Inference with pruned models: sparse CPU kernels for Linear and Conv2d layers, 2:4 on
GPUs, and `make bench-inference` (forward latency dense vs sparse)."""
from .sparse_linear import CSRWeight, SparseConv2d, SparseLinear
from .sparsify import LayerChoice, sparsify

__all__ = ["CSRWeight", "LayerChoice", "SparseConv2d", "SparseLinear", "sparsify"]
