"""Pruned Linear layers that compute with their non-zeros only (CPU inference).

``SparseLinear`` holds a weight in CSR (int32 row offsets, uint16 column indices,
fp32 values: 6 bytes per non-zero) and computes ``x @ W.T + b`` with the kernels of
``adamwprune/native/sparse_linear.c``, or with torch's CSR product where they cannot be built (no C
compiler) or do not apply (a layer with more than 65,536 inputs). ``SparseConv2d``
is the same product behind an im2col. ``adamwprune.inference.sparsify`` decides
which layers of a model to swap.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

MAX_COLS = 2**16  # uint16 column indices


class CSRWeight:
    """A dense weight [rows, cols] as CSR: row_ptr (int32), col (uint16 as int16), val."""

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().to(torch.float32).cpu()
        self.rows, self.cols = w.shape
        with warnings.catch_warnings():  # torch: "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            csr = w.to_sparse_csr()
        self.row_ptr = csr.crow_indices().to(torch.int32).contiguous()
        # uint16 in an int16 tensor: the C kernel reads the bits unsigned
        self.col = csr.col_indices().to(torch.int32).to(torch.int16).contiguous()
        self.val = csr.values().contiguous()
        self.nnz = int(self.val.numel())
        self._torch_csr: Optional[torch.Tensor] = None  # built only for the fallback path

    def torch_csr(self) -> torch.Tensor:
        """torch's own CSR tensor of the weight (int64 indices: 12 more bytes per non-zero),
        built once, on first use."""
        if self._torch_csr is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._torch_csr = torch.sparse_csr_tensor(
                    self.row_ptr.long(), self.col.long() & 0xFFFF, self.val, (self.rows, self.cols))
        return self._torch_csr

    def nbytes(self) -> int:
        tensors = [self.row_ptr, self.col, self.val]
        if self._torch_csr is not None:
            tensors += [self._torch_csr.crow_indices(), self._torch_csr.col_indices()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense(self) -> torch.Tensor:
        dense = torch.zeros(self.rows, self.cols)
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.rows), counts)
        dense[rows, self.col.long() & 0xFFFF] = self.val
        return dense


class SparseLinear(nn.Module):
    """Inference-only Linear whose weight is stored and multiplied as CSR."""

    def __init__(self, linear: nn.Linear, use_kernel: Optional[bool] = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_csr = CSRWeight(linear.weight)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)
        self.kernels = _kernels_for(self.in_features, use_kernel)

    @property
    def path(self) -> str:
        return "kernel" if self.kernels is not None else "torch-csr"

    def extra_repr(self) -> str:
        w = self.weight_csr
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={w.nnz} ({100 * (1 - w.nnz / (w.rows * w.cols)):.1f}% sparse), {self.path}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = csr_matmul(self.kernels, self.weight_csr, x.reshape(-1, self.in_features), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def csr_matmul(kernels, w: CSRWeight, x2: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x2 [tokens, cols] @ W.T + bias: the C kernels for CPU float32, else torch's CSR."""
    if kernels is None or x2.device.type != "cpu" or x2.dtype != torch.float32:
        csr = w.torch_csr().to(device=x2.device, dtype=x2.dtype)
        y = torch.sparse.mm(csr, x2.t()).t()
        return y if bias is None else y + bias.to(x2)
    x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], w.rows, dtype=torch.float32)
    if x2.shape[0] == 1:
        kernels.spmv(w, x2, bias, y)
    elif x2.shape[0] > 1:
        kernels.spmm(w, x2, bias, y)
    return y


def _kernels_for(cols: int, use_kernel: Optional[bool]):
    kernels = cpu_kernels.load() if (use_kernel is not False and cols <= MAX_COLS) else None
    if use_kernel and kernels is None:
        raise RuntimeError(f"the sparse CPU kernel is unavailable: "
                           f"{cpu_kernels.load_error() or 'more than 65,536 inputs'}")
    return kernels


class SparseConv2d(nn.Module):
    """Inference-only Conv2d (groups=1) as im2col (``F.unfold``) times the CSR weight
    ``[out, in*kh*kw]``. Faster than the dense convolution only where few output
    positions share each weight (a small image, a deep layer): ``sparsify`` uses it
    only where it measured it faster on the layer's real input."""

    def __init__(self, conv: nn.Conv2d, use_kernel: Optional[bool] = None):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SparseConv2d takes groups=1, zero-padded convolutions with numeric padding")
        self.out_channels, self.kernel_size = conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight_csr = CSRWeight(conv.weight.reshape(conv.out_channels, -1))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().float().clone(),
                                                                 requires_grad=False)
        self.kernels = _kernels_for(self.weight_csr.cols, use_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        positions = cols.shape[-1]
        y = csr_matmul(self.kernels, self.weight_csr, cols.transpose(1, 2).reshape(n * positions, -1),
                       self.bias)
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        return y.view(n, positions, self.out_channels).transpose(1, 2).reshape(
            n, self.out_channels, ho, positions // ho).contiguous()
