"""Pruned Linear layers that compute with their non-zeros only (CPU inference).

``SparseLinear`` holds a weight in CSR (int32 row offsets, uint16 column indices,
fp32 values: 6 bytes per non-zero) and computes ``x @ W.T + b`` with the kernels of
``sparse_cpu.c``, or with torch's CSR product where they cannot be built (no C
compiler) or do not apply (a layer with more than 65,536 inputs). ``sparsify(model)``
swaps every Linear layer of at least ``min_sparsity`` for one (tied weights, e.g.
GPT-2's head, stay dense). Convolutions stay dense: no sparse path measured here
beats oneDNN's dense convolution (docs/performance.md).

    from adamwprune.inference import sparsify
    model = sparsify(model.eval())        # in place; returns the model
    with torch.no_grad():
        y = model(x)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import cpu_kernels

MAX_COLS = 2**16  # uint16 column indices
# Measured with `make bench` (sparse_inference_speedup) on this project's 2-core CPU:
# at 50 % the sparse kernel already beats dense at one token but not at 512 tokens;
# from 70 % on it beats dense at both. Layers below this stay dense.
DEFAULT_MIN_SPARSITY = 0.7


class CSRWeight:
    """A dense weight [rows, cols] as CSR: row_ptr (int32), col (uint16 as int16), val."""

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().to(torch.float32).cpu()
        self.rows, self.cols = w.shape
        csr = w.to_sparse_csr()
        self.row_ptr = csr.crow_indices().to(torch.int32).contiguous()
        cols = csr.col_indices()
        # uint16 in an int16 tensor: the C kernel reads the bits unsigned
        self.col = cols.to(torch.int32).to(torch.int16).contiguous()
        self.val = csr.values().contiguous()
        self.nnz = int(self.val.numel())
        self._torch_csr = csr

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.row_ptr, self.col, self.val))

    def dense(self) -> torch.Tensor:
        return self._torch_csr.to_dense()


class SparseLinear(nn.Module):
    """Inference-only Linear whose weight is stored and multiplied as CSR."""

    def __init__(self, linear: nn.Linear, use_kernel: Optional[bool] = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_csr = CSRWeight(linear.weight)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)
        fits = self.in_features <= MAX_COLS
        self.kernels = cpu_kernels.load() if (use_kernel is not False and fits) else None
        if use_kernel and self.kernels is None:
            raise RuntimeError(f"the sparse CPU kernel is unavailable: "
                               f"{cpu_kernels.load_error() or 'more than 65,536 inputs'}")

    @property
    def path(self) -> str:
        return "kernel" if self.kernels is not None else "torch-csr"

    def extra_repr(self) -> str:
        w = self.weight_csr
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={w.nnz} ({100 * (1 - w.nnz / (w.rows * w.cols)):.1f}% sparse), {self.path}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernels is None or x2.device.type != "cpu" or x2.dtype != torch.float32:
            return self._torch_forward(x2).reshape(*shape[:-1], self.out_features)
        x2 = x2.contiguous()
        tokens = x2.shape[0]
        y = torch.empty(tokens, self.out_features, dtype=torch.float32)
        w, b = self.weight_csr, self.bias
        if tokens == 1:
            self.kernels.spmv(w, x2, b, y)
        elif tokens > 1:
            self.kernels.spmm(w, _transposed_padded(x2), tokens, b, y)
        return y.reshape(*shape[:-1], self.out_features)

    def _torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        csr = self.weight_csr._torch_csr.to(device=x2.device, dtype=x2.dtype)
        y = torch.sparse.mm(csr, x2.t()).t()
        return y if self.bias is None else y + self.bias.to(x2)


def _transposed_padded(x2: torch.Tensor) -> torch.Tensor:
    """x2 [tokens, cols] as [cols, stride], stride = tokens rounded up to 16, zero-padded."""
    tokens, cols = x2.shape
    stride = -(-tokens // 16) * 16
    if stride == tokens:
        return x2.t().contiguous()
    xt = torch.zeros(cols, stride, dtype=x2.dtype)
    xt[:, :tokens] = x2.t()
    return xt


def _tied(model: nn.Module) -> set[int]:
    """Weights that more than one module uses (a head tied to an embedding)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            seen[id(w)] = seen.get(id(w), 0) + 1
    return {k for k, n in seen.items() if n > 1}


@torch.no_grad()
def sparsify(model: nn.Module, min_sparsity: float = DEFAULT_MIN_SPARSITY,
             use_kernel: Optional[bool] = None) -> nn.Module:
    """Replace, in place, every (untied) Linear whose weight is at least ``min_sparsity``
    zeros by a SparseLinear; returns the model."""
    tied = _tied(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or id(child.weight) in tied:
                continue
            zeros = 1.0 - int(torch.count_nonzero(child.weight)) / child.weight.numel()
            if zeros >= min_sparsity:
                setattr(module, child_name, SparseLinear(child, use_kernel))
    return model
