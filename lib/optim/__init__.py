"""Optimizers that torch.optim does not provide."""

from .adamwadv import AdamWAdv
from .spam import AdamWSpam

__all__ = ["AdamWAdv", "AdamWSpam"]

try:
    from .adamwprune import AdamWPrune
except ModuleNotFoundError as err:
    # Only tolerate the module itself being absent, not a broken import inside it.
    if err.name != f"{__name__}.adamwprune":
        raise
else:
    __all__.append("AdamWPrune")
