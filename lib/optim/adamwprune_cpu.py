"""AdamWPrune's fused CPU path: the host side of ``adamwprune.optim.cpu_kernels``.

What the dispatcher in ``adamwprune.optim.adamwprune`` calls once it has chosen this
path (CPU fp32/fp64, contiguous tensors, a base whose update the kernel computes):
the masked step with the mask update fused into it (``step``), the masked gradient
norm for ``clip_grad_norm_`` (``masked_norm``), and the stand-alone exact top-k and
N:M updates (``prune``, ``prune_nm``). Each function takes the optimizer and returns
False or None, having changed nothing, where the plain path must run instead. Also
the helpers the GPU path shares: Adam's state as torch creates it, the checks that
a group's hyper-parameters and a tensor's state are plain numbers and plain tensors.
"""
from __future__ import annotations

import warnings
from array import array
from typing import TYPE_CHECKING, Optional

import torch
import torch.optim.optimizer as torch_optimizer

from adamwprune.optim import cpu_kernels
from adamwprune.optim.importance import hybrid_score, magnitude_score
from adamwprune.pruning.patterns import nm_applies
from adamwprune.pruning.selection import num_to_prune

if TYPE_CHECKING:  # annotations only: adamwprune.optim.adamwprune imports this module
    from adamwprune.optim.adamwprune import AdamWPrune

# Scores the fused mask update computes itself (its variant code in the C source).
FAST_SCORES = {hybrid_score: 0, magnitude_score: 1}
# With fast=None the fused path is used from this many parameters on: below it the
# step costs microseconds either way and not compiling the kernels is the better deal.
FAST_MIN_NUMEL = 1 << 20
# Candidates the two-pass mask update collects from the threshold bin at most (x 16 B);
# more means massive exact ties (e.g. many zero scores): the plain path resolves those.
FAST_MAX_CANDIDATES = 1 << 22
# The fused CPU update's sample (see _fused_bracket): runs of 16 entries, one per
# FUSED_SAMPLE_STRIDE entries, between the two bounds. scripts/cpu_update_breakdown.py
# --sample-scale compares other sizes.
FUSED_SAMPLE_RUNS = (1 << 8, 1 << 12)
FUSED_SAMPLE_STRIDE = 4096
_FAST_DTYPES = (torch.float32, torch.float64)
_ADAM_STATE_KEYS = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def load_kernels(opt: AdamWPrune) -> Optional[cpu_kernels.Kernels]:
    """The CPU kernels if this optimizer should use them (see ``fast``)."""
    if opt.fast is False:
        return None
    if opt.fast is None:
        sizes = tuple(len(g["params"]) for g in opt.param_groups)
        if opt._numel_cache[0] != sizes:
            numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
            opt._numel_cache = (sizes, numel)
        if opt._numel_cache[1] < FAST_MIN_NUMEL:
            return None
    kernels = cpu_kernels.load()
    if kernels is not None and opt.fast_compile_seconds is None:
        opt.fast_compile_seconds = kernels.compile_seconds
    elif kernels is None and not opt._fast_warned:
        opt._fast_warned = True
        # stacklevel: past this function and AdamWPrune._kernels, to what called the latter
        warnings.warn(f"AdamWPrune runs its plain path: the CPU kernels cannot be built "
                      f"({cpu_kernels.load_error()})", RuntimeWarning, stacklevel=4)
    return kernels


def step(opt: AdamWPrune, kernels: cpu_kernels.Kernels, in_force: bool,
         sparsity: Optional[float], scale: Optional[float]) -> tuple[bool, bool]:
    """The masked base step through the fused kernel and, on an update step
    (``sparsity`` given), the pruning fused into it where possible; ``scale``
    multiplies the gradients (clip_grad_norm_'s factor). Returns (stepped,
    pruned); (False, False) where the plain path must take the step (nothing has
    been changed then)."""
    work = _step_work(opt, in_force)
    if work is None:
        return False, False
    hyper = array("d")
    for group in opt.param_groups:
        hyper.extend((group["lr"], *group["betas"], group["eps"], group["weight_decay"],
                      1.0 if scale is None else scale))
    fused = _fused_prune_plan(opt, work) if sparsity is not None else None
    pruned = False
    for dtype, (ptrs, numel, group_of, flags, _) in work.items():
        if fused is not None and fused["dtype"] == dtype:
            pruned = _fused_step_prune(opt, kernels, work[dtype], hyper, fused, sparsity)
        else:
            kernels.adam_step(dtype, ptrs, numel, hyper, group_of, flags)
    return True, pruned


def masked_norm(opt: AdamWPrune, kernels: cpu_kernels.Kernels,
                in_force: bool) -> Optional[torch.Tensor]:
    """The L2 norm of the masked gradients from the CPU kernel, if the next step
    will be fused (clip_grad_norm_'s factor is then applied there); None where the
    plain clipping must run."""
    if _step_work(opt, in_force) is None:
        return None
    per_dtype: dict = {}
    for group in opt.param_groups:
        flag = cpu_kernels.MASKED if in_force and group["prune"] else 0
        for p in group["params"]:
            if p.grad is None:
                continue
            v = opt.state[p].get("exp_avg_sq") if flag else None
            ptrs, numel, flags = per_dtype.setdefault(p.dtype, (array("q"), array("q"),
                                                                 array("i")))
            ptrs.extend((p.grad.data_ptr(), 0 if v is None else v.data_ptr()))
            numel.append(p.numel())
            flags.append(flag)
    if not per_dtype:
        return None
    sq = sum(kernels.masked_sqnorm(dtype, *args) for dtype, args in per_dtype.items())
    dtype = torch.float64 if torch.float64 in per_dtype else torch.float32
    return torch.tensor(sq, dtype=torch.float64).sqrt().to(dtype)


def prune(opt: AdamWPrune, kernels: cpu_kernels.Kernels,
          items: list[tuple[torch.Tensor, dict]], sparsity: float) -> bool:
    """Exact top-k pruning of ``items`` (one ranking) in two passes (histogram of
    the score keys, then zeroing); False (nothing changed) where the plain path
    must do it (an unknown score, mixed dtypes, massive exact ties)."""
    variant = FAST_SCORES.get(opt.importance.fn)
    dtypes = {p.dtype for p, _ in items}
    if variant is None or len(dtypes) != 1:
        return False
    (dtype,) = dtypes
    ptrs, numel, eps, offsets = array("q"), array("q"), array("d"), array("q")
    total = 0
    for p, group in items:
        row = _prune_pointers(opt, p)
        if row is None:
            return False
        ptrs.extend(row)
        numel.append(p.numel())
        eps.append(group["eps"])
        offsets.append(total)
        total += p.numel()
    k = num_to_prune(sparsity, total)
    args = (dtype, ptrs, numel, eps, offsets, variant)
    if k >= total:  # everything: no ranking (as prune_masks)
        kernels.prune_apply(*args, cpu_kernels.NBINS, 0, 0)
        return True
    hist = kernels.prune_hist(dtype, ptrs, numel, eps, variant)
    cut = _threshold(hist, k, total)
    if cut is None:
        return False
    if cut[0] > 0:
        kernels.prune_apply(*args, *cut)
    return True


def prune_nm(opt: AdamWPrune, kernels: cpu_kernels.Kernels,
             items: list[tuple[torch.Tensor, dict]], sparsity: float) -> bool:
    """The N:M update of ``items`` in two passes over their groups (histogram of the
    group cost keys, then pruning), one ranking for global scope, one per tensor
    for "layer"; False (nothing changed) where the plain path must do it."""
    n, m = opt.rule.nm
    variant = FAST_SCORES.get(opt.importance.fn)
    tiled = [(p, g) for p, g in items if nm_applies(p.shape, m)]
    if not tiled:
        return True  # every tensor stays dense
    if variant is None or m not in cpu_kernels.NM_GROUPS or len({p.dtype for p, _ in tiled}) > 1:
        return False
    rows = [_prune_pointers(opt, p) for p, _ in tiled]
    if any(row is None for row in rows):
        return False
    fraction = min(1.0, sparsity / opt.target_sparsity) if opt.target_sparsity else 0.0
    sets = [list(range(len(tiled)))] if opt.scope == "global" else [[i] for i in
                                                                     range(len(tiled))]
    for members in sets:
        ptrs, numel, eps, offsets, groups = array("q"), array("q"), array("d"), array("q"), 0
        for i in members:
            ptrs.extend(rows[i])
            numel.append(tiled[i][0].numel())
            eps.append(tiled[i][1]["eps"])
            offsets.append(groups)
            groups += tiled[i][0].numel() // m
        dtype = tiled[members[0]][0].dtype
        # Each group's histogram bin (2 B per group, freed after the update): the second
        # pass then scores again only the groups it prunes or ranks.
        bins = torch.empty(groups, dtype=torch.int16)
        hist = kernels.nm_hist(dtype, ptrs, numel, eps, offsets, variant, n, m, bins)
        cut = _threshold(hist, num_to_prune(fraction, groups), groups)
        if cut is None:  # massive exact ties: the plain rule redoes every set (those
            return False  # done already are N:M groups at -inf cost: the same result)
        if cut[0] > 0:
            kernels.nm_apply(dtype, ptrs, numel, eps, offsets, variant, n, m, *cut, bins)
    return True


def _step_work(opt: AdamWPrune, in_force: bool) -> Optional[dict]:
    """Per dtype: pointer, size, group and flag arrays for the kernel and the
    parameters; None if some tensor or group is unsupported. Missing state is
    initialised as the base would. What only changes with the parameter or its
    state is kept per parameter (``_fast_rows``) and revalidated by identity and
    address, so a step costs the base's Python time, not more."""
    work: dict = {}
    rows = opt._fast_rows
    for index, group in enumerate(opt.param_groups):
        if not _fast_group_ok(group):
            return None
        flags = ((cpu_kernels.MASKED if in_force and group["prune"] else 0)
                 | (cpu_kernels.AMSGRAD if group["amsgrad"] else 0)
                 | (0 if group["decoupled_weight_decay"] else cpu_kernels.COUPLED)
                 | (cpu_kernels.MAXIMIZE if group["maximize"] else 0))
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            state = opt.state[p]
            row = rows.get(p)
            if row is None or row[0] is not state or row[1] != _state_pointers(p, state, group):
                row = rows[p] = _fast_row(p, state, group)
                if row is None:
                    return None
            _, (w, m, v, vmax, step), dtype, shape, numel, step_flag = row
            if not (grad.layout is torch.strided and grad.dtype is dtype and grad.shape == shape
                    and grad.is_contiguous()):
                return None
            ptrs, sizes, group_of, flag_list, params = work.setdefault(
                dtype, (array("q"), array("q"), array("i"), array("i"), []))
            ptrs.extend((w, grad.data_ptr(), m, v, vmax, step))
            sizes.append(numel)
            group_of.append(index)
            flag_list.append(flags | step_flag)
            params.append(p)
    return work


def _fused_prune_plan(opt: AdamWPrune, work: dict) -> Optional[dict]:
    """What the fused step-and-prune needs, or None where it cannot run: global
    scope, a score the kernel knows, every prunable tensor in this step's work (one
    dtype) with only Adam's state keys."""
    variant = FAST_SCORES.get(opt.importance.fn)
    prunable = [p for p, _ in opt._prunable()]
    dtypes = {p.dtype for p in prunable}
    if variant is None or opt.scope != "global" or len(dtypes) != 1 or \
            opt.pattern != "unstructured":
        return None
    (dtype,) = dtypes
    params = work.get(dtype, (None,) * 5)[4] or []
    ordinal = {id(p): i for i, p in enumerate(prunable)}
    if sum(id(p) in ordinal for p in params) != len(prunable) or any(
            not set(opt.state[p]) <= _ADAM_STATE_KEYS for p in prunable):
        return None
    return {"dtype": dtype, "variant": variant, "prunable": prunable,
            "ordinal": array("q", [ordinal.get(id(p), -1) for p in params])}


def _fused_step_prune(opt: AdamWPrune, kernels: cpu_kernels.Kernels, work: tuple,
                      hyper: array, plan: dict, sparsity: float) -> bool:
    """The step of ``work`` with the mask update fused in (see cpu_kernels). True
    if it pruned; False after a plain step (the caller then prunes stand-alone)."""
    ptrs, numel, group_of, flags, _ = work
    dtype, variant, prunable, ordinal = (plan[key] for key in ("dtype", "variant", "prunable",
                                                               "ordinal"))
    total = sum(p.numel() for p in prunable)
    k = num_to_prune(sparsity, total)
    rows = [i for i, o in enumerate(ordinal) if o >= 0]
    sample_args = (array("q", [x for i in rows for x in ptrs[6 * i:6 * i + 6]]),
                   array("q", [numel[i] for i in rows]), hyper,
                   array("i", [group_of[i] for i in rows]),
                   array("i", [flags[i] for i in rows]))
    bracket = _fused_bracket(kernels, dtype, sample_args, variant, total, k)
    if bracket is None:
        kernels.adam_step(dtype, ptrs, numel, hyper, group_of, flags)
        return False
    lo, hi, cap_undo, cap_cand = bracket
    undo = torch.empty(cap_undo * kernels.undo_bytes(dtype), dtype=torch.uint8)
    cand = torch.empty(cap_cand * 16, dtype=torch.uint8)
    marked = array("i", [f | (cpu_kernels.PRUNABLE if o >= 0 else 0)
                         for f, o in zip(flags, ordinal)])
    n_pruned, n_undo, n_cand, overflow, stored = kernels.adam_step_prune(
        dtype, ptrs, numel, hyper, group_of, marked, ordinal, variant, lo, hi, undo, cap_undo,
        cand, cap_cand)
    pptrs = array("q")
    for p in prunable:
        state = opt.state[p]
        vmax = state.get("max_exp_avg_sq")
        pptrs.extend((p.data_ptr(), state["exp_avg"].data_ptr(),
                       state["exp_avg_sq"].data_ptr(), 0 if vmax is None else vmax.data_ptr()))
    todo = k - n_pruned
    r = todo - n_undo
    exact = not overflow and (n_undo == 0 if todo <= 0 else 0 <= r <= n_cand)
    if exact and (r <= 0 or kernels.prune_finish(dtype, pptrs, cand, n_cand, r, lo, hi,
                                                 undo, 0, False)):
        return True
    kernels.prune_finish(dtype, pptrs, cand, 0, 0, lo, hi, undo, stored, True)
    return False


def _prune_pointers(opt: AdamWPrune, p: torch.Tensor) -> Optional[list[int]]:
    """[w, m, v, 3 more state tensors to zero] pointers (0 = none), or None."""
    if not (p.device.type == "cpu" and p.dtype in _FAST_DTYPES and p.is_contiguous()):
        return None
    state = opt.state[p] if p in opt.state else {}
    same = {key: value for key, value in state.items()
            if torch.is_tensor(value) and value.shape == p.shape}
    if not all(_fast_state_ok(p, value) for value in same.values()):
        return None
    if "exp_avg" not in state or "exp_avg_sq" not in state:
        return None  # the encoding needs v (_prune creates the state first)
    first = [state["exp_avg"], state["exp_avg_sq"]] if "exp_avg" in state else []
    rest = [value for key, value in same.items() if key not in ("exp_avg", "exp_avg_sq")]
    if len(rest) > 3 or (first and any(t.shape != p.shape for t in first)):
        return None
    row = [p.data_ptr()] + [t.data_ptr() for t in first] + [0, 0] * (not first)
    row += [t.data_ptr() for t in rest]
    return row + [0] * (cpu_kernels.PTRS_PER_TENSOR - len(row))


def _threshold(hist: torch.Tensor, k: int, total: int) -> Optional[tuple[int, int, int]]:
    """From a histogram of the top 16 key bits (bin 0: already pruned) and the number
    k to prune of ``total``: (bin, candidates in it, how many of them to prune), r = 0
    when nothing is left to do (bin = NBINS: everything below is pruned); None when
    the threshold bin holds too many candidates (massive exact ties)."""
    if k >= total:
        return cpu_kernels.NBINS, 0, 0
    todo = k - int(hist[0])  # hist[0]: already pruned, the lowest scores (-inf)
    if todo <= 0:
        return 0, 0, 0
    below = hist[1:].cumsum(0)
    bin_ = int(torch.searchsorted(below, todo)) + 1
    if bin_ == cpu_kernels.NBINS - 1:  # only NaN keys live in the top bin
        raise ValueError("pruning scores contain NaN where the k-th smallest lies; "
                         "the run has diverged (check lr and loss)")
    ncand = int(hist[bin_])
    if ncand > max(FAST_MAX_CANDIDATES, total // 64):
        return None
    return bin_, ncand, todo - (int(below[bin_ - 2]) if bin_ > 1 else 0)


def _fast_group_ok(group: dict) -> bool:
    """Hyper-parameters the kernel takes as plain numbers, and no autograd/capture."""
    numbers = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
    return (not group.get("capturable") and not group.get("differentiable")
            and all(isinstance(x, float | int) and not isinstance(x, bool) for x in numbers))


def _state_pointers(p: torch.Tensor, state: dict, group: dict) -> Optional[tuple]:
    """Addresses of w, m, v, v_max (0 without AMSGrad) and step; None if one is missing."""
    m, v, step = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")
    vmax = state.get("max_exp_avg_sq") if group["amsgrad"] else None
    if m is None or v is None or not torch.is_tensor(step) or (group["amsgrad"] and vmax is None):
        return None
    return (p.data_ptr(), m.data_ptr(), v.data_ptr(), 0 if vmax is None else vmax.data_ptr(),
            step.data_ptr())


def _fast_row(p: torch.Tensor, state: dict, group: dict) -> Optional[tuple]:
    """(state, addresses, dtype, shape, numel, step flag) of a parameter the kernel can
    update, initialising its state if empty; None if it cannot."""
    if not (p.device.type == "cpu" and p.dtype in _FAST_DTYPES and p.is_contiguous()):
        return None
    if not state:
        _init_adam_state(state, p, group)
    vmax = state.get("max_exp_avg_sq") if group["amsgrad"] else None
    step = state.get("step")
    if (not torch.is_tensor(step) or step.dtype not in _FAST_DTYPES or step.numel() != 1
            or step.device.type != "cpu" or (group["amsgrad"] and vmax is None)
            or not all(_fast_state_ok(p, state.get(k)) for k in ("exp_avg", "exp_avg_sq"))
            or (vmax is not None and not _fast_state_ok(p, vmax))):
        return None
    step_flag = cpu_kernels.STEP_F64 if step.dtype == torch.float64 else 0
    return state, _state_pointers(p, state, group), p.dtype, p.shape, p.numel(), step_flag


def _fast_state_ok(p: torch.Tensor, value: Optional[torch.Tensor]) -> bool:
    return (torch.is_tensor(value) and value.dtype == p.dtype and value.shape == p.shape
            and value.device == p.device and value.is_contiguous())


def _init_adam_state(state: dict, p: torch.Tensor, group: dict,
                     step_dtype: Optional[torch.dtype] = None) -> None:
    """What torch.optim.Adam(W)'s _init_group (or a base with ``step_dtype``)
    creates for a parameter's first step."""
    fused_or_capturable = bool(group.get("fused") or group.get("capturable"))
    dtype = step_dtype or torch_optimizer._get_scalar_dtype(is_fused=group.get("fused"))
    state["step"] = (torch.zeros((), dtype=dtype, device=p.device) if fused_or_capturable
                     else torch.tensor(0.0, dtype=dtype))
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if group.get("amsgrad"):
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _fused_bracket(kernels: cpu_kernels.Kernels, dtype: torch.dtype, sample_args: tuple,
                   variant: int, total: int, k: int) -> Optional[tuple[int, int, int, int]]:
    """(lo, hi, undo capacity, candidate capacity) for adam_step_prune, or None when
    the fused update should not be tried (all entries, or a jump too large to undo).

    The scores the step is about to produce are sampled at 2^8 to 2^12 runs of 16
    entries (1/256 of the entries, at most 65,536); [lo, hi) is the sample rank of
    the k-th +- 5 binomial standard deviations. A miss costs time (the stand-alone
    update runs after a restore), never exactness. The sizes balance the sample's
    cost against the candidates' (both are a few random accesses per entry).
    """
    if k >= total:
        return None
    keys, zeros = kernels.adam_sample(dtype, *sample_args, variant, total,
                                      min(FUSED_SAMPLE_RUNS[1],
                                          max(FUSED_SAMPLE_RUNS[0], total // FUSED_SAMPLE_STRIDE)))
    n = len(keys)
    first, last = _bracket_ranks(n, k, total)
    key_max = (1 << 64) - 1 if dtype == torch.float64 else 1 << 32
    lo = max(kernels.kth(keys, first), 1) if first >= 0 else 1
    hi = min(kernels.kth(keys, last) + 1, key_max) if last < n else key_max
    hi = max(hi, lo + 1)
    below = max(0, first - zeros) / n * total
    inside = (min(last, n) - max(first, zeros, 0)) / n * total
    if below > max(1 << 16, total // 8):  # the undo log would take more than 3 B/entry
        return None
    return lo, hi, int(1.25 * below) + (1 << 12), int(1.5 * inside) + (1 << 12)


def _bracket_ranks(n: int, k: int, total: int) -> tuple[int, int]:
    """Ranks (first, last) among ``n`` sampled keys that bracket the k-th smallest of
    ``total``: its expected rank +- 5 binomial standard deviations (+ 16). Either may
    fall outside [0, n): then the bracket is open on that side. Both fused updates
    bracket so (``_fused_bracket`` here, ``adamwprune_gpu._gpu_bracket``)."""
    q = k / total
    spread = 5.0 * (n * q * (1.0 - q)) ** 0.5 + 16
    return int(q * n - spread), int(q * n + spread) + 1
