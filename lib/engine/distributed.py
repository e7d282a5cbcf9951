"""DistributedDataParallel set-up from torchrun's environment (a no-op for one process)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)  # object collectives use the current device
            dist.init_process_group(backend=backend)

    def all_reduce_sum(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Sum each key over ranks. Ranks may hold different keys (a rank that had no
        evaluation batch holds none), so the key names are agreed on first."""
        if not self.enabled:
            return values
        names: list = [None] * self.world_size
        dist.all_gather_object(names, sorted(values))
        keys = sorted(set().union(*names))
        t = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (the tensor itself for one process)."""
        if not self.enabled:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
