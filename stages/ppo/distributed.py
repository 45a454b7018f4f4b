"""Distributed helpers of the PPO trainer: all-reduces that are no-ops in one process, and advantage
whitening over the global batch (every rank's tokens count, so the result does not depend on the split)."""

from __future__ import annotations

from typing import Any

import torch

from stages.engine import DistInfo
from stages.ppo.core import masked_whiten


# ------------------------------------------------------------------------------------- collectives
class Comm:
    """All-reduce helpers that are no-ops in a single process."""

    def __init__(self, dist: DistInfo):
        self.dist = dist
        self.on = dist.world_size > 1

    def _reduce(self, values: torch.Tensor, op: Any) -> torch.Tensor:
        if not self.on:
            return values
        values = values.detach().to(self.dist.device).clone()
        torch.distributed.all_reduce(values, op=op)
        return values.cpu()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return self._reduce(values, torch.distributed.ReduceOp.SUM if self.on else None)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        return self._reduce(values, torch.distributed.ReduceOp.MAX if self.on else None)

    def mean_dict(self, stats: dict[str, float]) -> dict[str, float]:
        if not self.on or not stats:
            return stats
        keys = sorted(stats)
        total = self.sum(torch.tensor([stats[k] for k in keys], dtype=torch.float64))
        return {k: float(v) / self.dist.world_size for k, v in zip(keys, total)}

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate a (B,) tensor from every rank (same B on every rank), rank order."""
        if not self.on:
            return values
        parts = [torch.zeros_like(values, device=self.dist.device) for _ in range(self.dist.world_size)]
        torch.distributed.all_gather(parts, values.to(self.dist.device))
        return torch.cat([p.cpu() for p in parts])

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order, on every rank."""
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` on every rank (what other ranks pass is ignored)."""
        if not self.on:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.on:
            torch.distributed.barrier()


def global_whiten(x: torch.Tensor, mask: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Masked whitening over the batch of every rank (unbiased variance), 0 on masked entries."""
    if not comm.on:
        return masked_whiten(x, mask)
    m = mask.bool()
    xf = torch.where(m, x.double(), torch.zeros((), dtype=torch.float64))
    s = comm.sum(torch.stack([xf.sum(), xf.square().sum(), m.sum().double()]))
    n = float(s[2])
    mean = float(s[0]) / n
    var = (float(s[1]) / n - mean * mean) * n / max(n - 1, 1)
    out = (x - mean) * torch.rsqrt(torch.tensor(max(var, 0.0) + 1e-8, dtype=x.dtype))
    return torch.where(m, out, torch.zeros((), dtype=out.dtype))
