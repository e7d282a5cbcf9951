"""AdamWPrune: an Adam-family optimizer that prunes from the state it already holds.

This module holds the optimizer, its plain path (the base's own step, the mask
update in torch; the reference every faster path is tested against) and the
dispatch between it and the fused paths, as torch.optim.adamw dispatches between
its single-tensor, foreach and fused implementations: ``adamwprune_cpu`` (the C
kernels of ``cpu_kernels``) and ``adamwprune_gpu`` (the Triton kernels of
``gpu_kernels``). A fused path that cannot take a step changes nothing and says
so; the plain path then takes it.
"""
from __future__ import annotations

import importlib
from collections import Counter
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, Iterable, Optional

import torch
import torch.optim.optimizer as torch_optimizer

from adamwprune.optim import adamwprune_cpu as cpu_path
from adamwprune.optim import adamwprune_gpu as gpu_path
from adamwprune.optim import cpu_kernels, gpu_kernels
from adamwprune.optim.importance import get_importance
from adamwprune.pruning.base import zero_optimizer_state
from adamwprune.pruning.schedule import (PruneSchedule, is_update_step, last_update_step,
                                         schedule_from, schedule_keywords, sparsity_at,
                                         validate_schedule)
from adamwprune.optim import regrow as regrowth
from adamwprune.pruning.dst import drop_fraction_at
from adamwprune.pruning.patterns import DISTRIBUTIONS, MaskRule, nm_sparsity, parse_pattern
from adamwprune.pruning.selection import prune_masks, validate_scope


@dataclass(frozen=True)
class BaseInfo:
    """A base optimizer AdamWPrune can wrap. ``module``/``cls`` are imported on
    first use, so this module imports even where a base is unavailable."""

    name: str
    module: str
    cls: str
    has_amsgrad: bool
    # The fused CPU kernel computes exactly this base's update (Adam/AdamW, and
    # AdamWAdv when it does not clip: clipping must see the masked gradient).
    cpu_kernel: bool = False
    # dtype of state["step"] the base creates (None: torch.optim's own rule).
    step_dtype: Optional[torch.dtype] = None

    def load(self) -> type:
        return getattr(importlib.import_module(self.module), self.cls)


BASES: dict[str, BaseInfo] = {
    "adamw": BaseInfo("adamw", "torch.optim", "AdamW", True, cpu_kernel=True),
    "adam": BaseInfo("adam", "torch.optim", "Adam", True, cpu_kernel=True),
    "adamwadv": BaseInfo("adamwadv", "adamwprune.optim.adamwadv", "AdamWAdv", True,
                         cpu_kernel=True),
    "adamwspam": BaseInfo("adamwspam", "adamwprune.optim.spam", "AdamWSpam", False,
                          step_dtype=torch.float32),
}


_FP16_TINY = 2.0 ** -24  # float16's smallest subnormal: a smaller eps rounds to 0
# How a pruned entry is marked (state_dict()["pruning"]["encoding"]): exp_avg_sq holds
# -0.0 there. A live entry never does (Adam's v only ever adds non-negative terms to
# +0.0), so a live weight that happens to be 0 with v = 0 is not taken for pruned.
ENCODING = "exp_avg_sq=-0.0"


def pruned_in(exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """Bool mask of the entries whose ``exp_avg_sq`` marks them pruned (-0.0)."""
    return torch.signbit(exp_avg_sq) & (exp_avg_sq == 0)


def _check_regrow(regrow, scope, pattern, target, drop_fraction, distribution,
                  schedule) -> None:
    """The options of AdamWPrune as a dynamic sparse trainer (or their absence)."""
    if regrow is None:
        return
    if schedule != "cubic":
        raise ValueError("schedule does not apply with regrow (the sparsity is constant from "
                         "step 0); leave it at its default")
    if regrow not in regrowth.REGROW:
        raise ValueError(f"unknown regrow {regrow!r}; valid: None or "
                         f"{', '.join(map(repr, regrowth.REGROW))}")
    if scope not in (None, "global"):
        raise ValueError(f"scope {scope!r} does not apply with regrow: distribution= "
                         "(uniform or erk) sets each layer's density")
    if pattern != "unstructured":
        raise ValueError("regrow trains an unstructured mask; pattern must be 'unstructured'")
    if not target > 0:
        raise ValueError("regrow needs target_sparsity > 0 (the run is sparse from step 0)")
    if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, Real) or \
            not 0.0 <= drop_fraction <= 1.0:
        raise ValueError(f"drop_fraction must be a number in [0, 1], got {drop_fraction!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown layer distribution {distribution!r}; valid: "
                         f"{', '.join(DISTRIBUTIONS)}")


def _check_int(label: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")


def _pattern_target(pattern: str, target: Optional[float]) -> float:
    """The target sparsity: as given; omitted, 1 - N/M for an N:M pattern (else 0, dense)."""
    nm = parse_pattern(pattern)
    if target is None:
        return nm_sparsity(pattern) if nm else 0.0
    if nm and not target:
        raise ValueError(f"pattern {pattern} with target_sparsity=0 prunes nothing: omit target_sparsity "
                         f"(it is then {nm_sparsity(pattern):g}) or use pattern='unstructured'")
    return target


class AdamWPrune(torch.optim.Optimizer):
    r"""Adam-family optimizer that prunes its parameters from its own state.

    Idea (AdamWPrune, after the seed project): Adam already holds, per weight,
    m (``exp_avg``) and v (``exp_avg_sq``); ranking entries by a score built
    from w, m and v needs no extra per-weight buffer, and a pruned entry is
    marked in its own state: its v holds -0.0, a value no live entry can take
    (v starts at +0.0 and Adam only adds non-negative terms), so no mask is stored.

    Each :meth:`step`:

    1. If masks are in force (an update step with sparsity > 0 has passed), the
       gradient is zeroed at the pruned entries (v = -0.0) of the groups marked
       ``"prune": True``.
    2. The base optimizer's step (``base``: AdamW, Adam, AdamWAdv or AdamWSpam),
       e.g. for AdamW: w <- w (1 - lr lambda); m <- b1 m + (1 - b1) g;
       v <- b2 v + (1 - b2) g^2; w <- w - lr m_hat / (sqrt(v_hat) + eps).
    3. The pruning step counter t += 1. If t is an update step of the shared
       schedule (``adamwprune.pruning.schedule``; cubic or linear from
       ``start_step`` to ``end_step`` every ``interval`` steps), every entry of a
       prune group is scored by the variant (``adamwprune.optim.importance``;
       bitter0: w^2 |m| / (sqrt(v) + eps), bitter1/bitter2: |w|), already pruned
       entries get -inf (monotone masks), and exactly round(s(t) * N) entries of
       lowest score (global or per-tensor ranking, ties by index; or the groups of
       an N:M ``pattern``; or per tensor at its ERK sparsity, ``scope="erk"``) are
       pruned: w and every state tensor of w's shape are set to 0 there, v to -0.0.

    With w = m = v_max = 0, v = -0.0 and g = 0 an entry stays so under every base
    (the kernels keep v's sign, the plain path restores it after the base's step),
    so the mask invariant holds without a mask. With ``target_sparsity = 0`` the
    steps are exactly the base's. ``regrow="gradient"`` makes it a dynamic sparse
    trainer instead (``adamwprune.optim.regrow``).

    Fast path (CPU, fp32/fp64, contiguous tensors; ``adamwprune.optim.adamwprune_cpu``
    over ``adamwprune.optim.cpu_kernels``):
    steps 1 and 2 are one fused C kernel over all tensors; the mask is read
    inline from v, so masking costs no extra pass (bases AdamW, Adam, and
    AdamWAdv without clipping). On an update step (global scope) the scores are
    computed in that same pass from the new w, m, v: entries below a sampled
    bracket around the k-th score are zeroed on the spot and exactly the missing
    number is then taken from the bracket, smallest (score, index) first. If the
    bracket missed, that zeroing is undone and an exact two-pass histogram top-k
    runs instead (as it does for per-layer scope, other bases, or a prunable
    tensor without gradient). Either way: the same k and tie-breaking by index,
    no score tensor, concatenation or mask allocated, for every variant whose
    score is ``hybrid_score`` or ``magnitude_score``. Values agree with the
    plain path up to rounding (torch's CPU sqrt is not always correctly
    rounded; the tests compare in float64). The fast path does not zero
    ``p.grad`` in memory, and is not used while the base optimizer has step
    hooks (they would not run). ``fast=None`` (default) uses it where it pays:
    the kernels build (a C compiler, once per machine) and the groups hold at
    least ``adamwprune_cpu.FAST_MIN_NUMEL`` parameters; ``fast=True`` forces it
    (ValueError if the kernels cannot be built); ``fast=False`` never uses it.
    Whatever cannot take it (AdamWSpam's step, ...) takes the plain path, step
    by step.

    GPU fast path (CUDA fp32, Triton; ``adamwprune.optim.adamwprune_gpu`` over
    ``adamwprune.optim.gpu_kernels``): the
    same contract on the GPU. The masked step is one launch over all tensors
    (28 B/param, like torch's fused AdamW); on an update step the same launch
    also counts and collects score keys against a sampled bracket, then one
    apply pass zeroes exactly k entries (ties by index); a missed bracket
    changes nothing and the stand-alone update (or the plain one) runs. While
    it is in use, each class of parameters (group, step count) keeps its
    ``state["step"]`` tensors as 0-dim views of one buffer, so one ``add_``
    counts the step for all of them; values, dtypes and ``state_dict()`` are
    unchanged. ``fast=None`` uses it whenever Triton runs; ``fast=False``
    never. ``update_paths`` counts which implementation made each mask update.

    Differences from ``torch.optim.AdamW``: the base's update (which may be
    Adam's coupled L2, AdamWAdv's clipping + AMSGrad or SPAM's); the pruning in
    steps 1 and 3; ``eps``, ``weight_decay`` and ``amsgrad`` default to the
    base's own defaults (None); ``state_dict()`` carries an extra
    ``"pruning": {"step": t, "encoding": ...}`` entry. Param groups and per-parameter state are
    the base optimizer's own objects, under torch's key names.

    Args:
        params: parameters or groups; only groups with ``"prune": True`` are
            pruned (``adamwprune.params.param_groups`` marks them).
        base: one of ``BASES``; ``base_kwargs`` go to its constructor.
        variant: importance score, one of ``adamwprune.optim.importance.IMPORTANCE``.
        target_sparsity, start_step, end_step, interval, schedule, scope: the
            shared pruning schedule and ranking scope; ``end_step`` is required
            when ``target_sparsity > 0``. ``target_sparsity`` omitted is 0 (dense)
            for ``pattern="unstructured"`` and 1 - N/M for ``pattern="N:M"``.
        budget_factor: overrides the variant's step-budget factor (bitter2: 1.21),
            read by the engine through :attr:`step_budget_factor`.
        fast: None (auto), True or False: the fused CPU and GPU paths above.
    """

    # What StatePruner (the pruner view of this optimizer) checks for: it prunes in step().
    prunes_in_step = True

    @classmethod
    def from_schedule(cls, params: Iterable, schedule: PruneSchedule, **kwargs: Any) -> "AdamWPrune":
        """Build from one :class:`PruneSchedule` (what the registry does): target, ramp,
        interval, schedule, scope and pattern (and, with ``regrow=``, the drop fraction,
        distribution and seed) come from it; ``kwargs`` are the optimizer's other options.
        ``prune_schedule`` is then this very object."""
        exclude = () if kwargs.get("regrow") else ("drop_fraction", "distribution", "seed")
        opt = cls(params, **schedule_keywords(cls, schedule, kwargs, exclude))
        opt._schedule_record = schedule
        return opt

    @property
    def prune_schedule(self) -> PruneSchedule:
        """The PruneSchedule this optimizer prunes on (the one it was built from, if any)."""
        record = getattr(self, "_schedule_record", None)
        return record if record is not None else schedule_from(self)

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: Optional[float] = None,
                 weight_decay: Optional[float] = None, base: str = "adamw",
                 variant: str = "bitter0", target_sparsity: Optional[float] = None, start_step: int = 0,
                 end_step: Optional[int] = None, interval: int = 100, schedule: str = "cubic",
                 scope: Optional[str] = None, amsgrad: Optional[bool] = None,
                 budget_factor: Optional[float] = None, fast: Optional[bool] = None,
                 pattern: str = "unstructured", regrow: Optional[str] = None,
                 drop_fraction: float = 0.3, distribution: str = "erk", seed: int = 0,
                 **base_kwargs: Any) -> None:
        if base not in BASES:
            raise ValueError(f"unknown AdamWPrune base {base!r}; valid: {', '.join(BASES)}")
        info = BASES[base]
        self.importance = get_importance(variant)
        target_sparsity = _pattern_target(pattern, target_sparsity)
        if end_step is None:
            if target_sparsity:
                raise ValueError("AdamWPrune needs end_step (where the sparsity ramp ends) "
                                 "when target_sparsity > 0")
            end_step = start_step
        validate_schedule(target_sparsity, start_step, end_step, schedule)
        _check_int("pruning interval", interval, 1)
        _check_regrow(regrow, scope, pattern, target_sparsity, drop_fraction, distribution,
                      schedule)
        scope = scope or "global"
        validate_scope(scope)
        if budget_factor is not None and (isinstance(budget_factor, bool) or not isinstance(
                budget_factor, Real) or not budget_factor > 0):
            raise ValueError(f"budget_factor must be a number > 0, got {budget_factor!r}")
        if amsgrad is not None and not info.has_amsgrad:
            raise ValueError(f"base {base!r} has no AMSGrad option; leave amsgrad unset")
        if fast not in (None, True, False):
            raise ValueError(f"fast must be None (auto), True or False, got {fast!r}")
        params = list(params)
        devices = {p.device.type for item in params
                   for p in (item["params"] if isinstance(item, dict) else [item])}
        if fast and "cuda" in devices and not gpu_kernels.available():
            raise ValueError(f"fast=True but the GPU kernels cannot run "
                             f"({gpu_kernels.unavailable_reason()}); use fast=None or fast=False")
        if fast and "cpu" in devices and not gpu_kernels.INTERPRET and cpu_kernels.load() is None:
            raise ValueError(f"fast=True but the CPU kernels cannot be built "
                             f"({cpu_kernels.load_error()}); use fast=None or fast=False")

        kwargs = dict(lr=lr, betas=betas, **base_kwargs)
        for key, value in (("eps", eps), ("weight_decay", weight_decay), ("amsgrad", amsgrad)):
            if value is not None:
                kwargs[key] = value
        base_optimizer = info.load()(params, **kwargs)
        # Optimizer.__init__ re-adds the base's own group dicts (filling "prune");
        # then the group list and the state become the base's objects.
        super().__init__(base_optimizer.param_groups, dict(base_optimizer.defaults, prune=False))
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        for group in self.param_groups:
            if group["eps"] < _FP16_TINY and any(p.dtype == torch.float16 for p in group["params"]):
                raise ValueError(f"eps={group['eps']:g} is 0 in float16: a pruned entry would get "
                                 "0/0 = NaN; use eps >= 6e-8 (e.g. 1e-7), or bfloat16/float32")

        self.base = base
        self.variant = variant
        self.target_sparsity = float(target_sparsity)
        self.start_step, self.end_step, self.interval = int(start_step), int(end_step), int(interval)
        self.schedule, self.scope = schedule, scope
        self.pattern, self.regrow = pattern, regrow
        self.drop_fraction, self.distribution, self.seed = float(drop_fraction), distribution, seed
        # scope + pattern of a mask update (adamwprune.pruning.patterns)
        self.rule = MaskRule([p.shape for p, _ in self._prunable()], self.target_sparsity, scope,
                             pattern)
        self._budget_factor = budget_factor
        self._info = info
        # clip_grad_norm_'s factor for the next step, with the gradients it belongs to
        self._grad_scale: Optional[tuple[float, list]] = None
        self.fast = fast
        self._fast_cpu_kernel = info.cpu_kernel
        self._numel_cache: tuple[tuple[int, ...], int] = ((), 0)
        # parameter -> what the CPU kernel needs of it (adamwprune_cpu._fast_row)
        self._fast_rows: dict = {}
        # the GPU kernels' tables (adamwprune_gpu._plan_for)
        self._gpu_plan: Optional[gpu_path._GpuPlan] = None
        self._gpu_wanted_cache: tuple = ((), False)
        # Which implementation made each mask update: "gpu-fused", "gpu", "cpu-fused",
        # "cpu" or "plain" (a fused attempt that missed counts under what finished it).
        self.update_paths: Counter = Counter()
        # Seconds this process spent compiling the CPU kernels (0.0: from the disk
        # cache; None: not loaded). Reported by the benchmark, never part of a step.
        self.fast_compile_seconds: Optional[float] = None
        self._fast_warned = False
        if any(p.device.type == "cpu" for g in self.param_groups for p in g["params"]):
            self._kernels()  # build them now (once per machine), not inside the first step
        self.pruning_step = 0
        if self.target_sparsity > 0 and not any(g["prune"] for g in self.param_groups):
            raise ValueError("target_sparsity > 0 but no param group has \"prune\": True; build "
                             "the groups with adamwprune.params.param_groups(model, ...)")
        self._convert_pending = False
        # regrow: the step-0 masks are drawn by the first step (or clip), not here, so
        # that building the optimizer over loaded weights and then loading its state
        # (a resume) never zeroes live weights.
        self._masks_drawn = not regrow

    def _before_update(self) -> None:
        """What must happen before the first update that follows a construction or a
        load: converting an old state_dict, drawing a regrowing run's masks."""
        if self._convert_pending:
            self._convert_old_encoding()
        if not self._masks_drawn:
            self._masks_drawn = True
            regrowth.initial_masks(self, self._ensure_state)

    def _ensure_state(self, p: torch.Tensor, group: dict) -> None:
        """The encoding lives in v: a tensor without state gets the base's state."""
        if not self.state[p]:
            cpu_path._init_adam_state(self.state[p], p, group, self._info.step_dtype)

    def dense_tensors(self) -> list[str]:
        """Prune-group tensors the pattern leaves dense (N:M groups do not tile them)."""
        names = [name for g in self.param_groups if g["prune"]
                 for name in g.get("param_names", [None] * len(g["params"]))]
        return [names[i] or f"tensor {i}" for i in self.rule.dense()]

    @property
    def step_budget_factor(self) -> float:
        """Factor on the total step budget (the ramp's end step is unchanged)."""
        if self._budget_factor is not None:
            return float(self._budget_factor)
        return self.importance.budget_factor_default

    def pruning_buffer_bytes(self) -> dict[str, int]:
        """Buffers held for pruning beyond the base's state: none (no stored mask)."""
        return {}

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base_optimizer"):  # called from Optimizer.__init__
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)
        self.param_groups[-1].setdefault("prune", False)
        self._fast_rows = {}
        self._gpu_plan = None

    def _prunable(self) -> list[tuple[torch.Tensor, dict]]:
        return [(p, g) for g in self.param_groups if g["prune"] for p in g["params"]]

    def masks_in_force(self) -> bool:
        """Whether some update step with sparsity > 0 has been taken (with regrowth:
        always, the run is sparse from step 0)."""
        if self.regrow:
            return self.target_sparsity > 0
        last = last_update_step(self.pruning_step, self.start_step, self.end_step, self.interval)
        return last is not None and self._sparsity_at(last) > 0

    def _sparsity_at(self, t: int) -> float:
        return sparsity_at(t, self.target_sparsity, self.start_step, self.end_step, self.schedule)

    def pruned_entries(self, p: torch.Tensor) -> torch.Tensor:
        """Bool mask of pruned entries, read from the state: ``exp_avg_sq == -0.0``
        (none for a parameter without state: pruning creates the state first)."""
        exp_avg_sq = self.state[p].get("exp_avg_sq") if p in self.state else None
        if exp_avg_sq is None:
            return torch.zeros_like(p, dtype=torch.bool)
        return pruned_in(exp_avg_sq)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._before_update()
        scale = self._take_grad_scale()
        in_force = self.masks_in_force()
        t = self.pruning_step + 1
        update = self.target_sparsity > 0 and is_update_step(
            t, self.start_step, self.end_step, self.interval)
        sparsity = self._sparsity_at(t) if update else None
        if self.regrow:
            if update and t < self.end_step:  # drop and grow, then the step trains the grown
                regrowth.update(self, drop_fraction_at(t, self.drop_fraction, self.end_step))
            update = False
        elif update and self._rank_before_step():
            # The base zeroes m and v in this step (SPAM's reset): a score that reads
            # them ranks the moments it has now, not the ones the reset leaves.
            self._prune(sparsity)
            in_force = in_force or sparsity > 0
            update = False
        stepped, pruned = self._fast_step(in_force, sparsity if update else None, scale)
        if pruned:
            self.update_paths["gpu-fused" if gpu_path.wanted(self) else "cpu-fused"] += 1
        if not stepped:
            self._step_plain(in_force, scale)
        self.pruning_step = t
        if update and not pruned:
            self._prune(sparsity)
        return loss

    def _rank_before_step(self) -> bool:
        """Whether this step's mask update must rank before the base step: the score
        reads the moments and the base resets them in this step."""
        resets = getattr(self.base_optimizer, "resets_moments_next_step", None)
        return self.importance.uses_moments and callable(resets) and bool(resets())

    def _step_plain(self, in_force: bool, scale: Optional[float]) -> None:
        """The base optimizer's own step on the masked (and, after clip_grad_norm_,
        scaled) gradient; the base rewrites v at pruned entries as +0.0, so their
        encoding is restored afterwards."""
        pruned = []
        if in_force:
            for p, _ in self._prunable():
                mask = self.pruned_entries(p)
                if p.grad is not None:
                    p.grad.masked_fill_(mask, 0)
                pruned.append((p, mask))
        if scale is not None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)
        self.base_optimizer.step()
        for p, mask in pruned:
            v = self.state[p].get("exp_avg_sq")
            if v is not None:  # a tensor without state has nothing pruned
                v.masked_fill_(mask, -0.0)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's gradients, as they
        are *after masking*: the gradient of every pruned entry is set to 0 first, so
        the norm, and the clipping, are those a baseline pruner (whose hooks mask the
        gradient during backward) sees. Call it between ``backward()`` and
        :meth:`step`; returns the total norm. On the fused CPU path the norm is taken
        in the same pass that zeroes the pruned gradients, and the clipping factor is
        applied inside the next :meth:`step` (one pass less; ``p.grad`` then holds the
        masked, unscaled gradient). :meth:`zero_grad` drops a factor not yet used."""
        max_norm, norm_type = float(max_norm), float(norm_type)
        self._grad_scale = None
        self._before_update()
        in_force = self.masks_in_force()
        if self.regrow and self._regrow_next():
            return self._clip_keeping_dense(max_norm, norm_type, error_if_nonfinite)
        total = self._fast_clip(in_force) if norm_type == 2.0 else None
        if total is not None:
            if error_if_nonfinite and not torch.isfinite(total):
                raise RuntimeError(f"The total norm of order {norm_type} for gradients is "
                                   "non-finite, so it cannot be clipped")
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            self._grad_scale = (float(coef), self._grad_signature())
            return total
        if in_force:
            for p, _ in self._prunable():
                if p.grad is not None:
                    p.grad.masked_fill_(self.pruned_entries(p), 0)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)

    def _regrow_next(self) -> bool:
        t = self.pruning_step + 1
        return 0 < t < self.end_step and is_update_step(t, self.start_step, self.end_step,
                                                         self.interval)

    def _clip_keeping_dense(self, max_norm: float, norm_type: float,
                            error_if_nonfinite: bool) -> torch.Tensor:
        """The masked norm without zeroing p.grad: the next step grows by |g| of the
        dense gradient. The factor scales every entry (pruned ones are masked in the
        step)."""
        pruned = {p: self.pruned_entries(p) for p, _ in self._prunable()}
        grads = [p.grad.masked_fill(pruned[p], 0) if p in pruned else p.grad
                 for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        total = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g, norm_type) for g in grads]), norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"The total norm of order {norm_type} for gradients is "
                               "non-finite, so it cannot be clipped")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_([p.grad for g in self.param_groups for p in g["params"]
                             if p.grad is not None], coef)
        return total

    def _grad_signature(self) -> list:
        """Which gradients a clipping factor belongs to: each tensor and its version
        (a new backward, ``model.zero_grad()`` or any in-place change moves them)."""
        return [(id(p.grad), p.grad._version) for g in self.param_groups for p in g["params"]
                if p.grad is not None]

    def _take_grad_scale(self) -> Optional[float]:
        """clip_grad_norm_'s factor for this step, if it was computed for these very
        gradients (else dropped: they were never clipped)."""
        pending, self._grad_scale = self._grad_scale, None
        if pending is None:
            return None
        factor, signature = pending
        return factor if signature == self._grad_signature() else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_scale = None
        super().zero_grad(set_to_none)

    # ------------------------------------------- mask update: dispatch and plain
    @torch.no_grad()
    def _prune(self, sparsity: float) -> None:
        """The stand-alone mask update: an N:M update in the CPU kernels; else the
        plain rule (patterns, ERK scope); else, for each ranking, the GPU update,
        the CPU one or the plain one, the first that can take it."""
        prunable = self._prunable()
        for p, group in prunable:
            self._ensure_state(p, group)
        kernels = self._kernels()
        if self.rule.nm is not None and kernels is not None and not gpu_path.wanted(self) and \
                cpu_path.prune_nm(self, kernels, prunable, sparsity):
            self.update_paths["cpu"] += 1
            return
        if self.pattern != "unstructured" or self.scope == "erk":
            self._prune_plain(prunable, sparsity, self.rule.masks)
            self.update_paths["plain"] += 1
            return
        sets = [prunable] if self.scope == "global" else [[item] for item in prunable]
        for items in sets:
            if gpu_path.prune(self, items, sparsity):
                self.update_paths["gpu"] += 1
            elif kernels is not None and cpu_path.prune(self, kernels, items, sparsity):
                self.update_paths["cpu"] += 1
            else:
                self._prune_plain(items, sparsity)
                self.update_paths["plain"] += 1

    def _prune_plain(self, items: list[tuple[torch.Tensor, dict]], sparsity: float,
                     select: Optional[Callable] = None) -> None:
        """Exactly round(s * N) lowest scores of ``items`` (one ranking) pruned, or what
        ``select(scores, sparsity)`` (the scope and pattern's rule) chooses."""
        scores = []
        for p, group in items:
            state = self.state[p]
            score = self.importance.fn(p, state["exp_avg"], state["exp_avg_sq"], group["eps"])
            score.masked_fill_(self.pruned_entries(p), float("-inf"))
            scores.append(score)
        masks = (select or (lambda s, x: prune_masks(s, x, "global")))(scores, sparsity)
        del scores
        for (p, _), mask in zip(items, masks):
            p.masked_fill_(mask, 0)
            zero_optimizer_state(self, p, mask)
            self.state[p]["exp_avg_sq"].masked_fill_(mask, -0.0)

    # --------------------------------------------------------------- fast paths
    def _kernels(self) -> Optional[cpu_kernels.Kernels]:
        """The CPU kernels if this optimizer should use them (see ``fast``)."""
        return cpu_path.load_kernels(self)

    def _fast_step_ok(self) -> bool:
        """Whether the fused kernels (CPU or GPU) compute the base's step exactly."""
        base = self.base_optimizer
        if not self._fast_cpu_kernel or getattr(base, "max_grad_norm", 0.0) > 0:
            return False
        # Hooks on the base would expect its own step() (and the gradient zeroed in memory).
        return not (base._optimizer_step_pre_hooks or base._optimizer_step_post_hooks
                    or torch_optimizer._global_optimizer_pre_hooks
                    or torch_optimizer._global_optimizer_post_hooks)

    def _fast_step(self, in_force: bool, sparsity: Optional[float],
                   scale: Optional[float] = None) -> tuple[bool, bool]:
        """The masked base step on a fused path (GPU or CPU, whichever this
        optimizer's parameters take) and, on an update step (``sparsity`` given),
        the pruning fused into it where possible; ``scale`` multiplies the gradients
        (clip_grad_norm_'s factor). Returns (stepped, pruned); (False, False) where
        the plain path must take the step (nothing has been changed then)."""
        if gpu_path.wanted(self):
            if not self._fast_step_ok() or scale is not None:
                return False, False
            return gpu_path.step(self, in_force, sparsity)
        kernels = self._kernels()
        if kernels is None or not self._fast_step_ok():
            return False, False
        return cpu_path.step(self, kernels, in_force, sparsity, scale)

    def _fast_clip(self, in_force: bool) -> Optional[torch.Tensor]:
        """The masked norm from the CPU kernel when the next step will be fused (the
        factor is then applied there); None where the plain clipping must run."""
        kernels = self._kernels()
        if kernels is None or gpu_path.wanted(self) or not self._fast_step_ok():
            return None
        return cpu_path.masked_norm(self, kernels, in_force)

    # --------------------------------------------------------------- state_dict
    def state_dict(self) -> dict[str, Any]:
        state = self.base_optimizer.state_dict()
        state["pruning"] = {"step": self.pruning_step, "encoding": ENCODING}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        pruning = state_dict.pop("pruning", None)
        if pruning is None:
            raise ValueError("this state_dict has no \"pruning\" entry; it was not saved "
                             "from an AdamWPrune optimizer")
        encoding = pruning.get("encoding")
        if encoding not in (None, ENCODING):
            raise ValueError(f"this state_dict marks pruned entries as {encoding!r}; this "
                             f"version of AdamWPrune reads {ENCODING!r}")
        self.base_optimizer.load_state_dict(state_dict)
        # torch's load_state_dict replaces the base's group list and state dict.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.pruning_step = int(pruning["step"])
        self._fast_rows = {}
        self._gpu_plan = None
        self._masks_drawn = True  # a regrowing run's masks are in the state loaded
        # A state_dict saved before the -0.0 encoding (version 0.1) marked a pruned entry
        # by w == 0 and v == 0 (w == 0 alone without state): converted at the next step
        # or clip, once the model's weights are surely loaded too, whatever the order.
        self._convert_pending = encoding is None

    @torch.no_grad()
    def _convert_old_encoding(self) -> None:
        """Mark the entries an old (0.1) state_dict took for pruned the new way."""
        self._convert_pending = False
        if not self.masks_in_force():
            return
        for p, group in self._prunable():
            if not self.state[p]:
                self._ensure_state(p, group)
                pruned = p == 0
            else:
                pruned = (p == 0) & (self.state[p]["exp_avg_sq"] == 0)
            self.state[p]["exp_avg_sq"].masked_fill_(pruned, -0.0)
