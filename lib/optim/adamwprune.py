"""AdamWPrune: an Adam-family optimizer that prunes from the state it already holds."""
from __future__ import annotations

import importlib
import warnings
from array import array
from collections import Counter
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, Iterable, Optional

import torch
import torch.optim.optimizer as torch_optimizer

from adamwprune.optim import cpu_kernels, gpu_kernels
from adamwprune.optim.importance import get_importance, hybrid_score, magnitude_score
from adamwprune.pruning.base import zero_optimizer_state
from adamwprune.pruning.schedule import (is_update_step, last_update_step, sparsity_at,
                                         validate_schedule)
from adamwprune.optim import regrow as regrowth
from adamwprune.pruning.dst import drop_fraction_at
from adamwprune.pruning.patterns import DISTRIBUTIONS, MaskRule, nm_applies
from adamwprune.pruning.selection import num_to_prune, prune_masks, validate_scope


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
_FP16_TINY = 2.0 ** -24  # float16's smallest subnormal: a smaller eps rounds to 0
_ADAM_STATE_KEYS = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
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

    Fast path (CPU, fp32/fp64, contiguous tensors; ``adamwprune.optim.cpu_kernels``):
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
    least ``FAST_MIN_NUMEL`` parameters; ``fast=True`` forces it (ValueError if
    the kernels cannot be built); ``fast=False`` never uses it. Whatever cannot
    take it (AdamWSpam's step, ...) takes the plain path, step by step.

    GPU fast path (CUDA fp32, Triton; ``adamwprune.optim.gpu_kernels``): the
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
            when ``target_sparsity > 0``.
        budget_factor: overrides the variant's step-budget factor (bitter2: 1.21),
            read by the engine through :attr:`step_budget_factor`.
        fast: None (auto), True or False: the fused CPU and GPU paths above.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: Optional[float] = None,
                 weight_decay: Optional[float] = None, base: str = "adamw",
                 variant: str = "bitter0", target_sparsity: float = 0.0, start_step: int = 0,
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
        self._fast_rows: dict = {}  # parameter -> what the kernel needs of it (_fast_row)
        self._gpu_plan: Optional[_GpuPlan] = None  # the GPU kernels' tables (_gpu_plan_for)
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
            _init_adam_state(self.state[p], p, group, self._info.step_dtype)

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
            self.update_paths["gpu-fused" if self._gpu_wanted() else "cpu-fused"] += 1
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
        total = self._fast_clip(in_force, max_norm) if norm_type == 2.0 else None
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

    def _fast_clip(self, in_force: bool, max_norm: float) -> Optional[torch.Tensor]:
        """The masked norm from the CPU kernel when the next step will be fused (the
        factor is then applied there); None where the plain clipping must run."""
        kernels = self._kernels()
        if kernels is None or self._gpu_wanted() or not self._fast_step_ok():
            return None
        if self._fast_step_work(in_force) is None:
            return None
        per_dtype: dict = {}
        for group in self.param_groups:
            flag = cpu_kernels.MASKED if in_force and group["prune"] else 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                v = self.state[p].get("exp_avg_sq") if flag else None
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

    # ------------------------------------------------------------ plain pruning
    @torch.no_grad()
    def _prune(self, sparsity: float) -> None:
        prunable = self._prunable()
        for p, group in prunable:
            self._ensure_state(p, group)
        kernels = self._kernels()
        if self.rule.nm is not None and kernels is not None and not self._gpu_wanted() and \
                self._fast_prune_nm(kernels, prunable, sparsity):
            self.update_paths["cpu"] += 1
            return
        if self.pattern != "unstructured" or self.scope == "erk":
            self._prune_plain(prunable, sparsity, self.rule.masks)
            self.update_paths["plain"] += 1
            return
        sets = [prunable] if self.scope == "global" else [[item] for item in prunable]
        kernels = self._kernels()
        for items in sets:
            if self._gpu_prune(items, sparsity):
                self.update_paths["gpu"] += 1
            elif kernels is not None and self._fast_prune(kernels, items, sparsity):
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

    # --------------------------------------------------------------- fast path
    def _kernels(self) -> Optional[cpu_kernels.Kernels]:
        """The CPU kernels if this optimizer should use them (see ``fast``)."""
        if self.fast is False:
            return None
        if self.fast is None:
            sizes = tuple(len(g["params"]) for g in self.param_groups)
            if self._numel_cache[0] != sizes:
                numel = sum(p.numel() for g in self.param_groups for p in g["params"])
                self._numel_cache = (sizes, numel)
            if self._numel_cache[1] < FAST_MIN_NUMEL:
                return None
        kernels = cpu_kernels.load()
        if kernels is not None and self.fast_compile_seconds is None:
            self.fast_compile_seconds = kernels.compile_seconds
        elif kernels is None and not self._fast_warned:
            self._fast_warned = True
            warnings.warn(f"AdamWPrune runs its plain path: the CPU kernels cannot be built "
                          f"({cpu_kernels.load_error()})", RuntimeWarning, stacklevel=3)
        return kernels

    def _fast_step_ok(self) -> bool:
        base = self.base_optimizer
        if not self._fast_cpu_kernel or getattr(base, "max_grad_norm", 0.0) > 0:
            return False
        # Hooks on the base would expect its own step() (and the gradient zeroed in memory).
        return not (base._optimizer_step_pre_hooks or base._optimizer_step_post_hooks
                    or torch_optimizer._global_optimizer_pre_hooks
                    or torch_optimizer._global_optimizer_post_hooks)

    def _fast_step(self, in_force: bool, sparsity: Optional[float],
                   scale: Optional[float] = None) -> tuple[bool, bool]:
        """The masked base step through the fused kernel and, on an update step
        (``sparsity`` given), the pruning fused into it where possible; ``scale``
        multiplies the gradients (clip_grad_norm_'s factor). Returns (stepped,
        pruned); (False, False) where the plain path must take the step (nothing has
        been changed then)."""
        if self._gpu_wanted():
            if not self._fast_step_ok() or scale is not None:
                return False, False
            return self._gpu_step(in_force, sparsity)
        kernels = self._kernels()
        if kernels is None or not self._fast_step_ok():
            return False, False
        work = self._fast_step_work(in_force)
        if work is None:
            return False, False
        hyper = array("d")
        for group in self.param_groups:
            hyper.extend((group["lr"], *group["betas"], group["eps"], group["weight_decay"],
                          1.0 if scale is None else scale))
        fused = self._fused_prune_plan(work) if sparsity is not None else None
        pruned = False
        for dtype, (ptrs, numel, group_of, flags, _) in work.items():
            if fused is not None and fused["dtype"] == dtype:
                pruned = self._fused_step_prune(kernels, work[dtype], hyper, fused, sparsity)
            else:
                kernels.adam_step(dtype, ptrs, numel, hyper, group_of, flags)
        return True, pruned

    def _fast_step_work(self, in_force: bool) -> Optional[dict]:
        """Per dtype: pointer, size, group and flag arrays for the kernel and the
        parameters; None if some tensor or group is unsupported. Missing state is
        initialised as the base would. What only changes with the parameter or its
        state is kept per parameter (``_fast_rows``) and revalidated by identity and
        address, so a step costs the base's Python time, not more."""
        work: dict = {}
        rows = self._fast_rows
        for index, group in enumerate(self.param_groups):
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
                state = self.state[p]
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

    def _fused_prune_plan(self, work: dict) -> Optional[dict]:
        """What the fused step-and-prune needs, or None where it cannot run: global
        scope, a score the kernel knows, every prunable tensor in this step's work (one
        dtype) with only Adam's state keys."""
        variant = FAST_SCORES.get(self.importance.fn)
        prunable = [p for p, _ in self._prunable()]
        dtypes = {p.dtype for p in prunable}
        if variant is None or self.scope != "global" or len(dtypes) != 1 or \
                self.pattern != "unstructured":
            return None
        (dtype,) = dtypes
        params = work.get(dtype, (None,) * 5)[4] or []
        ordinal = {id(p): i for i, p in enumerate(prunable)}
        if sum(id(p) in ordinal for p in params) != len(prunable) or any(
                not set(self.state[p]) <= _ADAM_STATE_KEYS for p in prunable):
            return None
        return {"dtype": dtype, "variant": variant, "prunable": prunable,
                "ordinal": array("q", [ordinal.get(id(p), -1) for p in params])}

    def _fused_step_prune(self, kernels: cpu_kernels.Kernels, work: tuple, hyper: array,
                          plan: dict, sparsity: float) -> bool:
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
            state = self.state[p]
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

    def _fast_prune(self, kernels: cpu_kernels.Kernels, items: list[tuple[torch.Tensor, dict]],
                    sparsity: float) -> bool:
        """Exact top-k pruning of ``items`` (one ranking) in two passes (histogram of
        the score keys, then zeroing); False (nothing changed) where the plain path
        must do it (an unknown score, mixed dtypes, massive exact ties)."""
        variant = FAST_SCORES.get(self.importance.fn)
        dtypes = {p.dtype for p, _ in items}
        if variant is None or len(dtypes) != 1:
            return False
        (dtype,) = dtypes
        ptrs, numel, eps, offsets = array("q"), array("q"), array("d"), array("q")
        total = 0
        for p, group in items:
            row = self._fast_prune_pointers(p)
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

    def _fast_prune_nm(self, kernels: cpu_kernels.Kernels, items: list[tuple[torch.Tensor, dict]],
                       sparsity: float) -> bool:
        """The N:M update of ``items`` in two passes over their groups (histogram of the
        group cost keys, then pruning), one ranking for global scope, one per tensor
        for "layer"; False (nothing changed) where the plain path must do it."""
        n, m = self.rule.nm
        variant = FAST_SCORES.get(self.importance.fn)
        tiled = [(p, g) for p, g in items if nm_applies(p.shape, m)]
        if not tiled:
            return True  # every tensor stays dense
        if variant is None or m not in cpu_kernels.NM_GROUPS or len({p.dtype for p, _ in tiled}) > 1:
            return False
        rows = [self._fast_prune_pointers(p) for p, _ in tiled]
        if any(row is None for row in rows):
            return False
        fraction = min(1.0, sparsity / self.target_sparsity) if self.target_sparsity else 0.0
        sets = [list(range(len(tiled)))] if self.scope == "global" else [[i] for i in
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
            hist = kernels.nm_hist(dtype, ptrs, numel, eps, variant, n, m)
            cut = _threshold(hist, num_to_prune(fraction, groups), groups)
            if cut is None:  # massive exact ties: the plain rule redoes every set (those
                return False  # done already are N:M groups at -inf cost: the same result)
            if cut[0] > 0:
                kernels.nm_apply(dtype, ptrs, numel, eps, offsets, variant, n, m, *cut)
        return True

    def _fast_prune_pointers(self, p: torch.Tensor) -> Optional[list[int]]:
        """[w, m, v, 3 more state tensors to zero] pointers (0 = none), or None."""
        if not (p.device.type == "cpu" and p.dtype in _FAST_DTYPES and p.is_contiguous()):
            return None
        state = self.state[p] if p in self.state else {}
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

    # ----------------------------------------------------------- GPU fast path
    def _gpu_wanted(self) -> bool:
        """Whether the GPU kernels should take this optimizer's steps: ``fast`` is
        not False, Triton runs here and every parameter is on the GPU (CUDA fp32)."""
        if self.fast is False or not gpu_kernels.available():
            return False
        # Checked once per parameter list (each step's plan checks its tensors again).
        sizes = tuple(len(g["params"]) for g in self.param_groups)
        if self._gpu_wanted_cache[0] != sizes:
            ok = all(gpu_kernels.device_ok(p) for g in self.param_groups for p in g["params"])
            self._gpu_wanted_cache = (sizes, ok)
        return self._gpu_wanted_cache[1]

    def _gpu_plan_for(self, in_force: bool) -> Optional["_GpuPlan"]:
        """The tables of this step's tensors, rebuilt when a parameter moves or
        gains or loses its gradient; the gradients' addresses (which move from step
        to step when they are freed) are refreshed on their own. None where the GPU
        path cannot take the step."""
        sig, grads = [in_force], []
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                sig.append(p.data_ptr())
                if grad is None:
                    sig.append(None)
                else:
                    grads.append(grad)
        sig = tuple(sig)
        plan = self._gpu_plan
        if plan is None or plan.sig != sig:
            plan = self._gpu_plan = _GpuPlan.build(self, in_force, sig)
        if not plan.ok:
            return None
        return plan if plan.set_grads(grads) else None

    def _gpu_step(self, in_force: bool, sparsity: Optional[float]) -> tuple[bool, bool]:
        """The masked base step in one launch and, on an update step, the fused mask
        update (see ``adamwprune.optim.gpu_kernels``). Returns (stepped, pruned)."""
        plan = self._gpu_plan_for(in_force)
        if plan is None:
            return False, False
        for buffer in plan.step_buffers:  # every state["step"] of the class is a view of it
            buffer.add_(1.0)
        for cls in plan.classes:
            cls[1] += 1
        scal = plan.scalars(self.param_groups)
        variant = FAST_SCORES.get(self.importance.fn)
        k = num_to_prune(sparsity, plan.total) if sparsity is not None else None
        if k is None or not plan.fused_prune or variant is None or self.scope != "global" \
                or self.pattern != "unstructured" or k >= plan.total:
            gpu_kernels.launch_tiles(plan.rows, plan.gptrs, scal, plan.tile_rows,
                                     plan.tile_offs, gpu_kernels.MODE_STEP,
                                     aligned=plan.aligned)
            return True, k is not None and k <= 0
        return True, _gpu_select(plan, scal, variant, k, step=True)

    def _gpu_prune(self, items: list[tuple[torch.Tensor, dict]], sparsity: float) -> bool:
        """Exact top-k pruning of ``items`` (one ranking) on the GPU from the stored
        state: sample, collect, apply. False (nothing changed) where the plain path
        must do it (no state yet, other state keys, an unknown score, a missed
        bracket)."""
        variant = FAST_SCORES.get(self.importance.fn)
        if variant is None or not self._gpu_wanted():
            return False
        plan = _GpuPlan.for_pruning(self, items)
        if plan is None:
            return False
        k = num_to_prune(sparsity, plan.total)
        if k <= 0:
            return True
        if k >= plan.total:
            return False
        return _gpu_select(plan, plan.scalars(self.param_groups), variant, k, step=False)

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


# ---------------------------------------------------------------- GPU tables
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


def _bracket_ranks(n: int, k: int, total: int) -> tuple[int, int]:
    """Ranks (first, last) among ``n`` sampled keys that bracket the k-th smallest of
    ``total``: its expected rank +- 5 binomial standard deviations (+ 16). Either may
    fall outside [0, n): then the bracket is open on that side."""
    q = k / total
    spread = 5.0 * (n * q * (1.0 - q)) ** 0.5 + 16
    return int(q * n - spread), int(q * n + spread) + 1


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
