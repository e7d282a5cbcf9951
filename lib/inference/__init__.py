"""Inference with pruned models: sparse CPU kernels for Linear layers, 2:4 on GPUs,
and `make bench-inference` (forward latency dense vs sparse)."""
from .sparse_linear import CSRWeight, SparseLinear, sparsify

__all__ = ["CSRWeight", "SparseLinear", "sparsify"]
