"""The map from theta to the weights, chosen by name: what GPartConfig.projection records.

- "partition" (GPart): the seeded balanced partition of gpart.partition, P^T P = I exactly. With
  column_gain_ratio > 1 its columns get unequal gains (the non-isometric ablation, GainedPartition).
- "fastfood": the intrinsic-dimension baseline's structured random projection (gpart.fastfood),
  isometric in expectation only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .fastfood import Fastfood
from .partition import Partition, PartitionError, permute, round_keys, splitmix64

PROJECTIONS = ("partition", "fastfood")
_GAIN_SALT = 0x6A1B


@dataclass(frozen=True)
class GainedPartition(Partition):
    """The partition with column scales gain_j / sqrt(n_j), so P^T P = diag(gain_j^2) instead of I: gains
    log-spaced with max/min = gain_ratio, of mean square 1 (the isometric partition's total step size under
    SGD), dealt to the columns by a seeded permutation. The groups are the partition's: the kernels apply."""

    gain_ratio: float = 1.0

    def gains(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.d == 1:
            return torch.ones(1, dtype=dtype, device=device)
        steps = torch.arange(self.d, dtype=torch.float64) / (self.d - 1) - 0.5
        g = torch.exp(steps * math.log(self.gain_ratio))
        g = g / g.square().mean().sqrt()
        keys = round_keys(splitmix64(self.seed ^ _GAIN_SALT) >> 1)
        order = permute(torch.arange(self.d, dtype=torch.int64), self.d, keys, 2)
        return g[order].to(dtype=dtype, device=device)

    def scales(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (super().scales(dtype=torch.float64) * self.gains(dtype=torch.float64)).to(dtype=dtype, device=device)


def make_projection(name: str, seed: int, D: int, d: int, version: int, column_gain_ratio: float = 1.0):
    """The projection object (Partition, GainedPartition or Fastfood) an adapter's config describes."""
    if name not in PROJECTIONS:
        raise PartitionError(f"unknown projection {name!r}; gpart supports {', '.join(PROJECTIONS)}")
    if name == "fastfood":
        if column_gain_ratio != 1.0:
            raise PartitionError("column_gain_ratio applies to projection='partition' only, not to 'fastfood'")
        return Fastfood(seed, D, d, version)
    if column_gain_ratio != 1.0:
        return GainedPartition(seed, D, d, version, float(column_gain_ratio))
    return Partition(seed, D, d, version)
