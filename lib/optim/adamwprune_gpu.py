"""AdamWPrune's fused GPU path: the host side of ``adamwprune.optim.gpu_kernels``.

What the dispatcher in ``adamwprune.optim.adamwprune`` calls for CUDA fp32
parameters while Triton runs (``wanted``): the masked step in one launch with the
mask update fused into it (``step``) and the stand-alone exact top-k update
(``prune``). Both return False, having changed nothing, where the plain path must
run instead. ``_GpuPlan`` holds the kernels' tables of one step; ``_gpu_select``
brackets the k-th smallest score key from a sample, collects the candidates and
finishes the update.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from adamwprune.optim import gpu_kernels
from adamwprune.optim.adamwprune_cpu import (_ADAM_STATE_KEYS, FAST_SCORES, _bracket_ranks,
                                             _fast_group_ok, _fast_state_ok, _init_adam_state)
from adamwprune.pruning.selection import num_to_prune

if TYPE_CHECKING:  # annotations only: adamwprune.optim.adamwprune imports this module
    from adamwprune.optim.adamwprune import AdamWPrune


def wanted(opt: AdamWPrune) -> bool:
    """Whether the GPU kernels should take this optimizer's steps: ``fast`` is
    not False, Triton runs here and every parameter is on the GPU (CUDA fp32)."""
    if opt.fast is False or not gpu_kernels.available():
        return False
    # Checked once per parameter list (each step's plan checks its tensors again).
    sizes = tuple(len(g["params"]) for g in opt.param_groups)
    if opt._gpu_wanted_cache[0] != sizes:
        ok = all(gpu_kernels.device_ok(p) for g in opt.param_groups for p in g["params"])
        opt._gpu_wanted_cache = (sizes, ok)
    return opt._gpu_wanted_cache[1]


def step(opt: AdamWPrune, in_force: bool, sparsity: Optional[float]) -> tuple[bool, bool]:
    """The masked base step in one launch and, on an update step, the fused mask
    update (see ``adamwprune.optim.gpu_kernels``). Returns (stepped, pruned)."""
    plan = _plan_for(opt, in_force)
    if plan is None:
        return False, False
    for buffer in plan.step_buffers:  # every state["step"] of the class is a view of it
        buffer.add_(1.0)
    for cls in plan.classes:
        cls[1] += 1
    scal = plan.scalars(opt.param_groups)
    variant = FAST_SCORES.get(opt.importance.fn)
    k = num_to_prune(sparsity, plan.total) if sparsity is not None else None
    if k is None or not plan.fused_prune or variant is None or opt.scope != "global" \
            or opt.pattern != "unstructured" or k >= plan.total:
        gpu_kernels.launch_tiles(plan.rows, plan.gptrs, scal, plan.tile_rows,
                                 plan.tile_offs, gpu_kernels.MODE_STEP,
                                 aligned=plan.aligned)
        return True, k is not None and k <= 0
    return True, _gpu_select(plan, scal, variant, k, step=True)


def prune(opt: AdamWPrune, items: list[tuple[torch.Tensor, dict]], sparsity: float) -> bool:
    """Exact top-k pruning of ``items`` (one ranking) on the GPU from the stored
    state: sample, collect, apply. False (nothing changed) where the plain path
    must do it (no state yet, other state keys, an unknown score, a missed
    bracket)."""
    variant = FAST_SCORES.get(opt.importance.fn)
    if variant is None or not wanted(opt):
        return False
    plan = _GpuPlan.for_pruning(opt, items)
    if plan is None:
        return False
    k = num_to_prune(sparsity, plan.total)
    if k <= 0:
        return True
    if k >= plan.total:
        return False
    return _gpu_select(plan, plan.scalars(opt.param_groups), variant, k, step=False)


def _plan_for(opt: AdamWPrune, in_force: bool) -> Optional[_GpuPlan]:
    """The tables of this step's tensors, rebuilt when a parameter moves or
    gains or loses its gradient; the gradients' addresses (which move from step
    to step when they are freed) are refreshed on their own. None where the GPU
    path cannot take the step."""
    sig, grads = [in_force], []
    for group in opt.param_groups:
        for p in group["params"]:
            grad = p.grad
            sig.append(p.data_ptr())
            if grad is None:
                sig.append(None)
            else:
                grads.append(grad)
    sig = tuple(sig)
    plan = opt._gpu_plan
    if plan is None or plan.sig != sig:
        plan = opt._gpu_plan = _GpuPlan.build(opt, in_force, sig)
    if not plan.ok:
        return None
    return plan if plan.set_grads(grads) else None


class _GpuPlan:
    """The GPU kernels' view of an optimizer step: a row per tensor (addresses,
    size, flags, index of its first entry in the concatenation of the prunable
    tensors), tile tables for all rows and for the prunable ones, the (group,
    step count) classes whose hyper-parameters the kernels read, and a sample
    table over the prunable entries. ``ok`` is False where the kernels cannot
    take the step (the plain path does)."""

    def __init__(self, sig: tuple, ok: bool = False) -> None:
        self.sig, self.ok = sig, ok
        self.fused_prune = False
        self._sample: Optional[tuple] = None
        self.grad_addresses: Optional[list[int]] = None
        self._scal_dev: Optional[torch.Tensor] = None
        self._scal_slot = 0
        self.gptrs: Optional[torch.Tensor] = None
        self.aligned = self.state_aligned = False

    @classmethod
    def build(cls, opt: AdamWPrune, in_force: bool, sig: tuple) -> "_GpuPlan":
        plan = cls(sig)
        ordinal = {p: i for i, (p, _) in enumerate(opt._prunable())}
        rows, numels, steps, classes, class_of, params = [], [], [], [], {}, []
        prunable_rows: dict[int, int] = {}
        device = None
        for gi, group in enumerate(opt.param_groups):
            if not (_fast_group_ok(group) and not group["maximize"]):
                return plan
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                device = device or p.device
                if not (p.device == device and gpu_kernels.device_ok(p) and p.is_contiguous()):
                    return plan
                state = opt.state[p]
                if not state:
                    _init_adam_state(state, p, group)
                m, v, step = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")
                vmax = state.get("max_exp_avg_sq") if group["amsgrad"] else None
                if not (torch.is_tensor(step) and step.device.type == "cpu" and step.numel() == 1
                        and _fast_state_ok(p, m) and _fast_state_ok(p, v)
                        and (not group["amsgrad"] or _fast_state_ok(p, vmax))):
                    return plan
                count = step.item()
                if count != int(count):
                    return plan
                key = (gi, int(count))
                if key not in class_of:
                    class_of[key] = len(classes)
                    classes.append([gi, int(count)])
                flags = ((gpu_kernels.MASKED if in_force and group["prune"] else 0)
                         | (gpu_kernels.AMSGRAD if group["amsgrad"] else 0)
                         | (0 if group["decoupled_weight_decay"] else gpu_kernels.COUPLED)
                         | (gpu_kernels.PRUNABLE if p in ordinal else 0)
                         | class_of[key] << gpu_kernels.CLASS_SHIFT)
                if p in ordinal:
                    prunable_rows[ordinal[p]] = len(rows)
                rows.append([p.data_ptr(), 0, m.data_ptr(), v.data_ptr(),
                             (vmax if vmax is not None else v).data_ptr(), p.numel(), flags, 0])
                numels.append(p.numel())
                steps.append(step)
                params.append(p)
        if not rows:
            return plan
        prunable = [p for p, _ in opt._prunable()]
        plan.fused_prune = (len(prunable_rows) == len(prunable) and len(prunable) > 0 and all(
            set(opt.state[p]) <= _ADAM_STATE_KEYS for p in prunable))
        plan._finish(rows, numels, [prunable_rows.get(i) for i in range(len(prunable))],
                     [p.numel() for p in prunable], device)
        plan.classes, plan.params = classes, params
        plan.step_buffers = _share_steps(opt, params, steps, [r[6] >> gpu_kernels.CLASS_SHIFT
                                                             for r in rows], len(classes))
        plan.gptrs = torch.zeros(len(rows), dtype=torch.int64, device=device)
        plan.ok = True
        return plan

    def set_grads(self, grads: list[torch.Tensor]) -> bool:
        """Point the step at this step's gradients (one per row, in row order);
        False if one cannot be read by the kernels."""
        addresses = [g.data_ptr() for g in grads]
        if addresses == self.grad_addresses:
            return True
        for p, g in zip(self.params, grads):
            if not (g.layout is torch.strided and g.dtype is p.dtype and g.shape == p.shape
                    and g.device == p.device and g.is_contiguous()):
                return False
        host = torch.tensor(addresses, dtype=torch.int64)
        if self.gptrs.device.type == "cuda":
            host = host.pin_memory()
        self.gptrs.copy_(host, non_blocking=True)
        self.grad_addresses = addresses
        self.aligned = self.state_aligned and all(a % 16 == 0 for a in addresses)
        return True

    @classmethod
    def for_pruning(cls, opt: AdamWPrune, items: list[tuple[torch.Tensor, dict]]
                    ) -> Optional["_GpuPlan"]:
        """Tables for a stand-alone update of ``items`` (no step); None if some tensor
        has no Adam state on the device or other state of its shape."""
        plan = cls(())
        rows, classes, class_of = [], [], {}
        device = items[0][0].device if items else None
        for p, group in items:
            state = opt.state[p] if p in opt.state else {}
            m, v = state.get("exp_avg"), state.get("exp_avg_sq")
            vmax = state.get("max_exp_avg_sq")
            if not (p.device == device and gpu_kernels.device_ok(p) and p.is_contiguous()
                    and _fast_state_ok(p, m) and _fast_state_ok(p, v)
                    and (vmax is None or _fast_state_ok(p, vmax))
                    and set(state) <= _ADAM_STATE_KEYS):
                return None
            gi = next(i for i, g in enumerate(opt.param_groups) if g is group)
            if gi not in class_of:
                class_of[gi] = len(classes)
                classes.append([gi, 1])
            flags = ((gpu_kernels.AMSGRAD if vmax is not None else 0) | gpu_kernels.PRUNABLE
                     | class_of[gi] << gpu_kernels.CLASS_SHIFT)
            rows.append([p.data_ptr(), p.data_ptr(), m.data_ptr(), v.data_ptr(),
                         (vmax if vmax is not None else v).data_ptr(), p.numel(), flags, 0])
        if not rows:
            return None
        numels = [r[5] for r in rows]
        plan._finish(rows, numels, list(range(len(rows))), numels, device)
        plan.gptrs = plan.rows[:, 0].contiguous()  # not read without a step
        plan.aligned = plan.state_aligned
        plan.classes = classes
        plan.ok = True
        return plan

    def _finish(self, rows: list[list[int]], numels: list[int], prow: list[Optional[int]],
                pnumels: list[int], device: torch.device) -> None:
        """Device tables; ``prow`` gives the row of each prunable tensor (None: not in
        this step), ``pnumels`` their sizes."""
        bases, total = [], 0
        for r, n in zip(prow, pnumels):
            bases.append(total)
            if r is not None:
                rows[r][7] = total
            total += n
        self.total = total
        self.state_aligned = all(r[c] % 16 == 0 for r in rows for c in (0, 2, 3, 4))
        if total >= 1 << gpu_kernels.INDEX_BITS:
            self.fused_prune = False  # candidate codes hold a 32-bit index
        self.rows = torch.tensor(rows, dtype=torch.int64).to(device)
        settings = gpu_kernels.SETTINGS
        every = list(range(len(rows)))
        self.tile_rows, self.tile_offs = gpu_kernels.tiles(numels, every, device,
                                                           settings["block"])
        self.ctile_rows, self.ctile_offs = gpu_kernels.tiles(numels, every, device,
                                                             settings["collect_block"])
        present = [(r, n) for r, n in zip(prow, pnumels) if r is not None]
        self.prow_list = [r for r, _ in present]
        self.pnumels = [n for _, n in present]
        self.ptile_rows, self.ptile_offs = gpu_kernels.tiles(self.pnumels, self.prow_list, device,
                                                             settings["collect_block"])
        self.bases = torch.tensor(bases, dtype=torch.int64).to(device)
        self.prow = torch.tensor([-1 if r is None else r for r in prow], dtype=torch.int64
                                 ).to(device)

    def scalars(self, groups: list[dict]) -> torch.Tensor:
        """The classes' hyper-parameters for this step (fp32, on the device); only
        eps for a stand-alone update's plan (its groups may belong to any base)."""
        values = []
        for gi, step in self.classes:
            g = groups[gi]
            if not self.sig:
                values.append([0.0] * 5 + [1.0, g["eps"], 0.0])
                continue
            values.append(gpu_kernels.class_scalars(
                g["lr"], *g["betas"], g["eps"], g["weight_decay"],
                g.get("decoupled_weight_decay", True), max(step, 1)))
        if self.rows.device.type != "cuda":
            return torch.tensor(values, dtype=torch.float32)
        # Pinned host buffers (two, each reused once its last copy has run) and an
        # asynchronous copy: no wait for the work already queued (backward), no
        # allocation. The device buffer is only touched in stream order.
        if self._scal_dev is None:
            shape = (len(values), gpu_kernels.NSCAL)
            self._scal_host = [torch.empty(shape, dtype=torch.float32, pin_memory=True)
                               for _ in range(2)]
            self._scal_events = [None, None]
            self._scal_dev = torch.empty(shape, dtype=torch.float32, device=self.rows.device)
        slot = self._scal_slot = 1 - self._scal_slot
        if self._scal_events[slot] is not None:
            self._scal_events[slot].synchronize()
        self._scal_host[slot].numpy()[...] = values
        self._scal_dev.copy_(self._scal_host[slot], non_blocking=True)
        event = self._scal_events[slot] = self._scal_events[slot] or torch.cuda.Event()
        event.record()
        return self._scal_dev

    def sample_table(self) -> tuple:
        if self._sample is None:
            # 256 runs from 2^16 entries on (1/256 of tiny models), 1/128 of the entries
            # from 2^19 on, at most 2^14 runs: enough that the bracket's candidates
            # stay ~1 % of the entries, few enough that sampling costs microseconds.
            runs = min(1 << 14, max(min(1 << 8, self.total // 256), self.total // 2048, 1))
            self._sample = gpu_kernels.sample_table(self.pnumels, self.prow_list, runs,
                                                    self.rows.device)
        return self._sample


def _share_steps(opt: AdamWPrune, params: list[torch.Tensor], steps: list[torch.Tensor],
                 class_of: list[int], n_classes: int) -> list[torch.Tensor]:
    """Make every ``state["step"]`` of a class a 0-dim view of one buffer per class,
    so that one ``add_`` per class counts the step of all its tensors (where
    ``torch._foreach_add_`` over a hundred CPU scalars costs more than the GPU
    update itself). Values, dtype and device are unchanged; the base's plain step
    still increments each view once, and ``state_dict()`` still holds one tensor
    per parameter."""
    buffers = []
    for c in range(n_classes):
        members = [i for i, k in enumerate(class_of) if k == c]
        buffer = torch.empty(len(members), dtype=steps[members[0]].dtype)
        for j, i in enumerate(members):
            buffer[j] = steps[i]
            opt.state[params[i]]["step"] = buffer[j]
        buffers.append(buffer)
    return buffers


def _gpu_bracket(plan: _GpuPlan, scal: torch.Tensor, step: bool, variant: int, k: int
                 ) -> tuple[torch.Tensor, int]:
    """Bounds [lo, hi) (int64 on the device) around the k-th smallest key, from the
    sampled keys' ranks +- 5 binomial standard deviations, and the candidate
    buffer's capacity. No synchronisation: the bounds stay on the device."""
    table = plan.sample_table()
    keys = gpu_kernels.sample(plan.rows, plan.gptrs, scal, table, step, variant)
    n = table[3]
    pad = keys.numel() - n
    first, last = _bracket_ranks(n, k, plan.total)
    one = torch.ones((), dtype=torch.int64, device=keys.device)
    lo = torch.maximum(keys[pad + first], one) if first >= 0 else one
    hi = keys[pad + last] + 1 if last < n else one * (gpu_kernels.KEY_MAX + 1)
    hi = torch.maximum(hi, lo + 1)
    inside = (min(last, n) - max(first, 0)) / n * plan.total
    return torch.stack([lo, hi]), (int(1.5 * inside) + 4096) // 16 * 16


def _gpu_select(plan: _GpuPlan, scal: torch.Tensor, variant: int, k: int, step: bool) -> bool:
    """Bracket, collect (with the step over all tensors, or alone over the prunable
    ones) and finish: True if exactly k entries are pruned now, False if nothing
    was pruned (the step, if asked for, is taken either way)."""
    bounds, cap = _gpu_bracket(plan, scal, step, variant, k)
    counts = torch.zeros(3, dtype=torch.int64, device=plan.rows.device)
    cand = torch.empty(cap, dtype=torch.int64, device=plan.rows.device)
    tiles = (plan.ctile_rows, plan.ctile_offs) if step else (plan.ptile_rows, plan.ptile_offs)
    mode = gpu_kernels.MODE_STEP_COLLECT if step else gpu_kernels.MODE_COLLECT
    gpu_kernels.launch_tiles(plan.rows, plan.gptrs, scal, *tiles, mode, variant, bounds, counts,
                             cand, plan.aligned)
    return _gpu_finish(plan, scal, variant, bounds, counts, cand, k)


def _gpu_finish(plan: _GpuPlan, scal: torch.Tensor, variant: int, bounds: torch.Tensor,
                counts: torch.Tensor, cand: torch.Tensor, k: int) -> bool:
    """After a collect launch: if the k-th smallest key lay in the bracket, zero
    everything below it and the missing number of candidates (smallest (key,
    index) first) and return True; else change nothing and return False."""
    already, below, n_cand, lo, hi = torch.cat([counts, bounds]).tolist()
    if k <= already:  # the k lowest are all pruned already
        return True
    r = k - already - below
    if n_cand > cand.numel() or not 0 <= r <= n_cand:
        return False
    chosen = torch.sort(cand[:n_cand]).values[:r] if r else cand[:0]
    if r and hi > gpu_kernels.KEY_INF and int(chosen[-1]) >> gpu_kernels.INDEX_BITS > \
            gpu_kernels.KEY_INF:
        raise ValueError("pruning scores contain NaN where the k-th smallest lies; "
                         "the run has diverged (check lr and loss)")
    if below:
        gpu_kernels.launch_tiles(plan.rows, plan.gptrs, scal, plan.ptile_rows, plan.ptile_offs,
                                 gpu_kernels.MODE_APPLY, variant, bounds, counts, cand,
                                 plan.aligned)
    gpu_kernels.scatter_zero(plan.rows, chosen, plan.bases, plan.prow)
    return True
