"""Fused GPU kernels for AdamWPrune's fast path (Triton).

The CUDA counterpart of ``adamwprune.optim.cpu_kernels``: one launch per step
over every tensor, where the plain path makes several passes per tensor.

* Step (``MODE_STEP``): the Adam/AdamW update (coupled or decoupled weight
  decay, AMSGrad) of every tensor, with AdamWPrune's mask read inline from the
  state (an entry whose v is -0.0 gets gradient 0 and keeps v = -0.0). It reads w, g, m, v
  and writes w, m, v: the 28 bytes per fp32 parameter of torch's fused AdamW.
  One launch covers all tensors: a table of their addresses (``rows``) and a
  table of 1,024-entry tiles say which program updates what, and the
  hyper-parameters of each (group, step count) class sit in a small float
  table, so the number of launches does not grow with the number of tensors.
* Mask update (``MODE_STEP_COLLECT``, then ``MODE_APPLY``): on an update step
  the same launch also computes every prunable entry's score key from its new
  w, m, v while they are in registers and, given a bracket [lo, hi) of keys
  that should hold the k-th smallest (from :func:`sample`: the same update
  applied, without writing, to runs of 16 entries), counts the already pruned
  entries and those below lo and collects those inside as candidates
  ``(key << 32) | index``. If the counts show that the k-th smallest lies in
  the bracket, an apply pass zeroes every entry below lo (w, m, v, v_max) and
  the missing number of candidates, smallest (key, index) first, are zeroed
  by :func:`scatter_zero`. Otherwise nothing has been pruned and the caller
  runs the stand-alone update (``MODE_COLLECT`` on the stored state, then the
  same apply) or the plain one. The apply pass reads w, m, v of the prunable
  tensors once more (12 B/entry), at update steps only; no score tensor,
  concatenation or mask is allocated, and nothing survives the step.

Keys have the order of the scores: ``bits(score) + 1`` for a score >= 0, every
NaN the largest key, and 0 for an already pruned entry (v = -0.0; the plain
path's -inf). Ties are broken by the index in the concatenation of the prunable
tensors, as ``adamwprune.pruning.selection``. Division and sqrt are IEEE
(``div_rn``, ``sqrt_rn``), as torch's CUDA kernels; results agree with the
plain path to rounding (the tests compare them).

The kernels run wherever Triton does: on CUDA, and on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``, set before this module is imported),
which the tests use on machines without a GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR: Optional[str] = None
except Exception as error:  # noqa: BLE001 - any import failure means: no fast path
    triton = tl = None
    _IMPORT_ERROR = f"triton cannot be imported: {error}"

# Triton runs kernels on CPU tensors (numpy) when this is set at import time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

BLOCK = 1024   # entries per program of the step/collect/apply launches
RUN = 16       # entries per sampled run
NCOL = 8       # int64 columns of a row: w, g, m, v, v_max (or v), numel, flags, base index
NSCAL = 8      # fp32 hyper-parameters per class (see class_scalars)
# Row flag bits; the class index sits above them.
MASKED, AMSGRAD, COUPLED, PRUNABLE = 1, 2, 4, 8
CLASS_SHIFT = 8
MODE_STEP, MODE_STEP_COLLECT, MODE_COLLECT, MODE_APPLY = 0, 1, 2, 3
KEY_MAX = (1 << 31) - 1       # largest key (NaN scores); keys fit 31 bits
KEY_INF = 0x7F800000 + 1      # key of a +inf score: above it only NaN
INDEX_BITS = 32               # a candidate is (key << 32) | index: < 2^32 prunable entries


def available() -> bool:
    """Whether the kernels can run here (Triton importable)."""
    return triton is not None


def unavailable_reason() -> Optional[str]:
    return _IMPORT_ERROR


def device_ok(t: torch.Tensor) -> bool:
    """A tensor these kernels can take: CUDA fp32 (CPU fp32 under the interpreter)."""
    on_device = t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu")
    return on_device and t.dtype == torch.float32


# Launch settings of the tile kernel (module-level so scripts/gpu_kernel_variants.py
# can compare them): entries per program, warps, IEEE division/sqrt, and alignment
# hints (16-byte aligned tensors, unmasked full tiles: 16-byte vector accesses).
# Measured on an H100 (docs/performance.md): the hints double the bandwidth; 1,024
# entries and 4 warps were the fastest of the settings tried; IEEE division is free.
# The mask update's launches (collect, apply) may take other tiles; 4,096 entries and
# 8 warps (a quarter of the atomic counter updates) were slower: 4.5 ms against 3.4 ms.
SETTINGS = {"block": BLOCK, "num_warps": 4, "exact": True, "hint": True,
            "collect_block": BLOCK, "collect_warps": 4}

if triton is not None:
    @triton.jit
    def _div(a, b, EXACT: tl.constexpr):
        if EXACT:
            return tl.div_rn(a, b)
        else:
            return a / b

    @triton.jit
    def _sqrt(a, EXACT: tl.constexpr):
        if EXACT:
            return tl.sqrt_rn(a)
        else:
            return tl.sqrt(a)

    @triton.jit
    def _pruned(v):
        """Entries marked pruned: v is -0.0 (no live entry's v can be)."""
        return v.to(tl.int32, bitcast=True) == -2147483648

    @triton.jit
    def _neg_zero(offs):
        """-0.0 in the shape of ``offs`` (a store value marking pruned entries)."""
        return (offs * 0 - 2147483648).to(tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def _adam(w, g, m, v, vmax, flags, s_ptr, EXACT: tl.constexpr):
        """One Adam/AdamW update of a block, as torch.optim's foreach path orders it."""
        decay = tl.load(s_ptr + 0)
        c1 = tl.load(s_ptr + 1)
        beta2 = tl.load(s_ptr + 2)
        c2 = tl.load(s_ptr + 3)
        step_size = tl.load(s_ptr + 4)
        bc2_sqrt = tl.load(s_ptr + 5)
        eps = tl.load(s_ptr + 6)
        masked = (flags & 1) != 0
        amsgrad = (flags & 2) != 0
        coupled = (flags & 4) != 0
        pruned = masked & _pruned(v)
        v_in = v
        g = tl.where(pruned, 0.0, g)
        # coupled (Adam): g += wd * w; decoupled (AdamW): w *= 1 - lr * wd
        g = tl.where(coupled, g + decay * w, g)
        w = tl.where(coupled, w, w * decay)
        # lerp(m, g, c1) as ATen computes it
        m = tl.where(c1 < 0.5, m + c1 * (g - m), g - (g - m) * (1.0 - c1))
        v = v * beta2
        v = v + c2 * (g * g)
        v = tl.where(pruned, v_in, v)  # keeps -0.0
        vmax = tl.where(amsgrad, tl.maximum(vmax, v), vmax)
        vd = tl.where(amsgrad, vmax, v)
        denom = _div(_sqrt(vd, EXACT), bc2_sqrt, EXACT) + eps
        w = w + step_size * _div(m, denom, EXACT)
        return w, m, v, vmax

    @triton.jit
    def _key(w, m, v, eps, VARIANT: tl.constexpr, EXACT: tl.constexpr):
        """Score key (see the module docstring); 0 where already pruned."""
        if VARIANT == 0:  # bitter0: w^2 |m| / (sqrt(v) + eps)
            score = _div(w * w * tl.abs(m), _sqrt(v, EXACT) + eps, EXACT)
        else:  # magnitude: |w|
            score = tl.abs(w)
        bits = score.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.minimum(bits + 1, 2147483647)
        return tl.where(_pruned(v), 0, key)

    @triton.jit
    def _ptr(row, col, HINT: tl.constexpr):
        ptr = tl.load(row + col).to(tl.pointer_type(tl.float32))
        if HINT:
            ptr = tl.multiple_of(ptr, 16)
        return ptr

    @triton.jit
    def _ld(ptr, offs, inb, EVEN: tl.constexpr):
        if EVEN:
            return tl.load(ptr + offs)
        else:
            return tl.load(ptr + offs, mask=inb, other=0.0)

    @triton.jit
    def _st(ptr, offs, value, inb, EVEN: tl.constexpr):
        if EVEN:
            tl.store(ptr + offs, value)
        else:
            tl.store(ptr + offs, value, mask=inb)

    @triton.jit
    def _zero(w_ptr, m_ptr, v_ptr, x_ptr, offs, mask, amsgrad):
        """Prune entries: w, m (and v_max with AMSGrad) set to 0 and v to -0.0 where
        ``mask``."""
        tl.store(w_ptr + offs, 0.0, mask=mask)
        tl.store(m_ptr + offs, 0.0, mask=mask)
        tl.store(v_ptr + offs, _neg_zero(offs), mask=mask)
        tl.store(x_ptr + offs, 0.0, mask=mask & amsgrad)

    @triton.jit
    def _tile(row, gptr_ptr, r, s_ptr, offs, inb, flags, base, bounds_ptr, counts_ptr, cand_ptr,
              cap_cand, MODE: tl.constexpr, VARIANT: tl.constexpr, EXACT: tl.constexpr,
              HINT: tl.constexpr, EVEN: tl.constexpr):
        w_ptr = _ptr(row, 0, HINT)
        m_ptr = _ptr(row, 2, HINT)
        v_ptr = _ptr(row, 3, HINT)
        x_ptr = _ptr(row, 4, HINT)
        amsgrad = (flags & 2) != 0
        w = _ld(w_ptr, offs, inb, EVEN)
        m = _ld(m_ptr, offs, inb, EVEN)
        v = _ld(v_ptr, offs, inb, EVEN)
        vmax = v
        if amsgrad:
            vmax = _ld(x_ptr, offs, inb, EVEN)
        if MODE <= 1:  # step
            g_ptr = tl.load(gptr_ptr + r).to(tl.pointer_type(tl.float32))
            if HINT:
                g_ptr = tl.multiple_of(g_ptr, 16)
            g = _ld(g_ptr, offs, inb, EVEN)
            w, m, v, vmax = _adam(w, g, m, v, vmax, flags, s_ptr, EXACT)
            _st(w_ptr, offs, w, inb, EVEN)
            _st(m_ptr, offs, m, inb, EVEN)
            _st(v_ptr, offs, v, inb, EVEN)
            if amsgrad:
                _st(x_ptr, offs, vmax, inb, EVEN)
        if MODE >= 1:  # collect or apply
            lane = inb & ((flags & 8) != 0)
            key = _key(w, m, v, tl.load(s_ptr + 6), VARIANT, EXACT)
            lo = tl.load(bounds_ptr + 0)
            hi = tl.load(bounds_ptr + 1)
            below = lane & (key > 0) & (key < lo)
            if MODE == 3:  # apply: zero what lies below the bracket
                _zero(w_ptr, m_ptr, v_ptr, x_ptr, offs, below, amsgrad)
            else:
                cand = lane & (key >= lo) & (key < hi)
                tl.atomic_add(counts_ptr + 0, tl.sum((lane & (key == 0)).to(tl.int64), axis=0))
                tl.atomic_add(counts_ptr + 1, tl.sum(below.to(tl.int64), axis=0))
                n = tl.sum(cand.to(tl.int64), axis=0)
                first = tl.atomic_add(counts_ptr + 2, n)
                slot = first + tl.cumsum(cand.to(tl.int64), axis=0) - 1
                code = (key << 32) | (base + offs)
                tl.store(cand_ptr + slot, code, mask=cand & (slot < cap_cand))

    @triton.jit(do_not_specialize=["cap_cand"])
    def _tiles_kernel(rows_ptr, gptr_ptr, scal_ptr, tile_row_ptr, tile_off_ptr, bounds_ptr,
                      counts_ptr, cand_ptr, cap_cand, MODE: tl.constexpr, VARIANT: tl.constexpr,
                      BLOCK: tl.constexpr, EXACT: tl.constexpr, HINT: tl.constexpr):
        pid = tl.program_id(0)
        r = tl.load(tile_row_ptr + pid).to(tl.int64)
        row = rows_ptr + r * 8
        numel = tl.load(row + 5)
        flags = tl.load(row + 6)
        base = tl.load(row + 7)
        s_ptr = scal_ptr + (flags >> 8) * 8
        start = tl.load(tile_off_ptr + pid)
        if HINT:
            start = tl.multiple_of(start, BLOCK)
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        inb = offs < numel
        if HINT:
            if start + BLOCK <= numel:
                _tile(row, gptr_ptr, r, s_ptr, offs, inb, flags, base, bounds_ptr, counts_ptr,
                      cand_ptr, cap_cand, MODE, VARIANT, EXACT, HINT, True)
            else:
                _tile(row, gptr_ptr, r, s_ptr, offs, inb, flags, base, bounds_ptr, counts_ptr,
                      cand_ptr, cap_cand, MODE, VARIANT, EXACT, HINT, False)
        else:
            _tile(row, gptr_ptr, r, s_ptr, offs, inb, flags, base, bounds_ptr, counts_ptr,
                  cand_ptr, cap_cand, MODE, VARIANT, EXACT, HINT, False)

    @triton.jit
    def _sample_kernel(rows_ptr, gptr_ptr, scal_ptr, run_row_ptr, run_off_ptr, run_len_ptr,
                       out_ptr, STEP: tl.constexpr, VARIANT: tl.constexpr, RUN: tl.constexpr,
                       EXACT: tl.constexpr):
        pid = tl.program_id(0)
        r = tl.load(run_row_ptr + pid).to(tl.int64)
        row = rows_ptr + r * 8
        flags = tl.load(row + 6)
        s_ptr = scal_ptr + (flags >> 8) * 8
        lanes = tl.arange(0, RUN)
        offs = tl.load(run_off_ptr + pid) + lanes.to(tl.int64)
        inb = lanes < tl.load(run_len_ptr + pid)
        w = tl.load(_ptr(row, 0, False) + offs, mask=inb, other=0.0)
        m = tl.load(_ptr(row, 2, False) + offs, mask=inb, other=0.0)
        v = tl.load(_ptr(row, 3, False) + offs, mask=inb, other=0.0)
        if STEP:
            vmax = tl.load(_ptr(row, 4, False) + offs, mask=inb & ((flags & 2) != 0), other=0.0)
            g_ptr = tl.load(gptr_ptr + r).to(tl.pointer_type(tl.float32))
            g = tl.load(g_ptr + offs, mask=inb, other=0.0)
            w, m, v, vmax = _adam(w, g, m, v, vmax, flags, s_ptr, EXACT)
        key = _key(w, m, v, tl.load(s_ptr + 6), VARIANT, EXACT)
        tl.store(out_ptr + pid * RUN + lanes, tl.where(inb, key, -1))

    @triton.jit(do_not_specialize=["n"])
    def _scatter_zero_kernel(rows_ptr, row_idx_ptr, off_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        row = rows_ptr + tl.load(row_idx_ptr + i, mask=ok, other=0).to(tl.int64) * 8
        off = tl.load(off_ptr + i, mask=ok, other=0)
        amsgrad = (tl.load(row + 6, mask=ok, other=0) & 2) != 0
        w_ptr = tl.load(row + 0, mask=ok, other=0).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(row + 2, mask=ok, other=0).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(row + 3, mask=ok, other=0).to(tl.pointer_type(tl.float32))
        x_ptr = tl.load(row + 4, mask=ok, other=0).to(tl.pointer_type(tl.float32))
        _zero(w_ptr, m_ptr, v_ptr, x_ptr, off, ok, amsgrad)


def class_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  decoupled: bool, step: int) -> list[float]:
    """The fp32 hyper-parameters of one (group, step) class, computed in float64
    as torch.optim's foreach Adam/AdamW does before passing them to its kernels:
    [decay, 1 - beta1, beta2, 1 - beta2, -lr / bc1, sqrt(bc2), eps, 0], where decay
    is 1 - lr * wd (decoupled) or wd (coupled)."""
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    decay = 1 - lr * weight_decay if decoupled else weight_decay
    return [decay, 1 - beta1, beta2, 1 - beta2, -(lr / bc1), bc2 ** 0.5, eps, 0.0]


def tiles(numels: list[int], row_ids: list[int], device: torch.device, block: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index int32, start offset int64) of every ``block``-entry tile of the
    tensors of sizes ``numels`` at rows ``row_ids``."""
    counts = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.tensor(row_ids, dtype=torch.int32), counts)
    first = torch.cumsum(counts, 0) - counts
    offsets = (torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)) * block
    return rows.to(device), offsets.to(device)


def launch_tiles(rows: torch.Tensor, gptrs: torch.Tensor, scal: torch.Tensor,
                 tile_rows: torch.Tensor, tile_offs: torch.Tensor, mode: int, variant: int = 0,
                 bounds: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None,
                 cand: Optional[torch.Tensor] = None, aligned: bool = False) -> None:
    """One launch of the tile kernel (see the module docstring for the modes); the
    tile tables must have been built with ``SETTINGS["block"]`` for MODE_STEP and
    ``SETTINGS["collect_block"]`` for the others.
    ``gptrs``: the gradients' addresses, one per row (read by the step modes);
    ``aligned``: every tensor starts on 16 bytes (the hints may be used)."""
    if tile_rows.numel() == 0:
        return
    if bounds is None:
        bounds = counts = cand = rows  # unused by MODE_STEP; any int64 tensor will do
    big = mode != MODE_STEP  # the tables were built with the matching tile size
    _tiles_kernel[(tile_rows.numel(),)](
        rows, gptrs, scal, tile_rows, tile_offs, bounds, counts, cand, cand.numel(),
        MODE=mode, VARIANT=variant, BLOCK=SETTINGS["collect_block" if big else "block"],
        EXACT=SETTINGS["exact"], HINT=SETTINGS["hint"] and aligned,
        num_warps=SETTINGS["collect_warps" if big else "num_warps"])


def sample_table(numels: list[int], row_ids: list[int], runs: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``runs`` runs of RUN entries spread evenly over the concatenation of the
    tensors (``row_ids`` are their rows), one at a low-discrepancy position in each
    of ``runs`` equal strata: (row, start, length) tensors and the number of valid
    entries (lanes past a tensor shorter than RUN are padding)."""
    sizes = torch.tensor(numels, dtype=torch.int64)
    bases = torch.cumsum(sizes, 0) - sizes
    total = int(sizes.sum())
    i = torch.arange(runs, dtype=torch.float64)
    pos = ((i + torch.frac(i * 0.6180339887498949)) * (total / runs)).long().clamp_(0, total - 1)
    which = torch.searchsorted(bases, pos, right=True) - 1
    size = sizes[which]
    start = torch.minimum(pos - bases[which], (size - RUN).clamp_(min=0))
    length = size.clamp(max=RUN)
    rows = torch.tensor(row_ids, dtype=torch.int32)[which]
    return rows.to(device), start.to(device), length.to(torch.int32).to(device), int(length.sum())


def sample(rows: torch.Tensor, gptrs: torch.Tensor, scal: torch.Tensor, table: tuple,
           step: bool, variant: int) -> torch.Tensor:
    """Sorted score keys of the sampled entries (after the step if ``step``); the
    padding lanes (-1) come first."""
    run_row, run_off, run_len, _ = table
    out = torch.empty(run_row.numel() * RUN, dtype=torch.int64, device=rows.device)
    _sample_kernel[(run_row.numel(),)](rows, gptrs, scal, run_row, run_off, run_len, out,
                                       STEP=step, VARIANT=variant, RUN=RUN,
                                       EXACT=SETTINGS["exact"], num_warps=1)
    return torch.sort(out).values


def scatter_zero(rows: torch.Tensor, codes: torch.Tensor, bases: torch.Tensor,
                 prow: torch.Tensor) -> None:
    """Zero w, m, v (and v_max) at the entries whose candidate codes are given:
    index = code & (2^32 - 1) in the concatenation; ``bases`` (int64, ascending) are
    the prunable tensors' first indices, ``prow`` their rows."""
    n = codes.numel()
    if n == 0:
        return
    index = codes & ((1 << INDEX_BITS) - 1)
    ordinal = torch.searchsorted(bases, index, right=True) - 1
    row_idx = prow[ordinal].to(torch.int32)
    offs = index - bases[ordinal]
    _scatter_zero_kernel[(triton.cdiv(n, 1024),)](rows, row_idx, offs, n, BLOCK=1024,
                                                  num_warps=4)
