"""AdamWAdv: AdamW with AMSGrad and built-in gradient-norm clipping."""

import math
from collections.abc import Callable, Iterable
from numbers import Real

import torch


class AdamWAdv(torch.optim.AdamW):
    r"""AdamW with AMSGrad on by default and gradient-norm clipping in :meth:`step`.

    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019
    (arXiv:1711.05101), with AMSGrad from Reddi, Kale & Kumar, "On the
    Convergence of Adam and Beyond", ICLR 2018. Per step:

    1. If ``max_grad_norm > 0``, the gradients of all of this optimizer's
       parameters are scaled in place so that their joint L2 norm is at most
       ``max_grad_norm`` (exactly ``torch.nn.utils.clip_grad_norm_``).
    2. The ``torch.optim.AdamW`` step: w <- w * (1 - lr * lambda);
       m <- beta1 * m + (1 - beta1) * g; v <- beta2 * v + (1 - beta2) * g^2;
       v_max <- max(v_max, v);
       w <- w - lr * m_hat / (sqrt(v_max / (1 - beta2^t)) + eps).

    The cosine learning-rate schedule that completes "AdamWAdv" is the engine's
    job (``adamwprune.engine.lr``), like every schedule: an optimizer only sees the
    current ``lr`` of its groups. Because the optimizer clips its own gradients,
    the engine does not clip again for it (clipping is idempotent, but the
    norm would be computed twice).

    Differences from ``torch.optim.AdamW``: ``amsgrad`` defaults to True, and
    :meth:`step` clips gradients first (``max_grad_norm = 0`` turns that off,
    giving exactly ``torch.optim.AdamW(amsgrad=amsgrad)``). The positional
    arguments ``(params, lr, betas, eps, weight_decay)`` are those of AdamW, so
    this class can be the base of AdamWPrune; other keyword arguments
    (``maximize``, ``foreach``, ``fused``, ...) are passed to AdamW.

    Args:
        max_grad_norm: largest joint L2 norm of the gradients, or 0 for no
            clipping. Kept as an attribute, not in the param groups, because
            the norm is taken over all groups together.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        amsgrad: bool = True,
        max_grad_norm: float = 1.0,
        **kwargs,
    ) -> None:
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, Real):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (must be a number >= 0)")
        if math.isnan(max_grad_norm) or max_grad_norm < 0:
            raise ValueError(
                f"Invalid max_grad_norm: {max_grad_norm} (must be >= 0; 0 disables clipping)"
            )
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
        self.max_grad_norm = float(max_grad_norm)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Clip the gradients to ``max_grad_norm``, then take an AdamW step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.max_grad_norm > 0:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        _without_step_hooks(torch.optim.AdamW.step)(self)
        return loss


def _without_step_hooks(step: Callable) -> Callable:
    """`step` minus the hook-running wrapper torch puts on an optimizer class's step.

    Optimizer._patch_step_function wraps ``cls.step`` (marking it ``hooked``) to run
    the step pre/post hooks; AdamWAdv.step is wrapped already, so calling a wrapped
    AdamW.step from it would run every hook twice.
    """
    return step.__wrapped__ if getattr(step, "hooked", False) else step
