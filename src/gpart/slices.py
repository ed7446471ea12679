"""Value types that the kernels and the autograd functions share, and the plain reference sweeps.

This module sits one floor below both gpart.kernels and gpart.functional: the kernels fall back to
the reference sweeps here, and functional builds its autograd on both, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .partition import Partition, _round_function, chunks

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Slice:
    """Where one adapted tensor sits in the global flattening, and how its update is drawn."""

    partition: Partition
    start: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class DropConnect:
    """DropConnect on Delta_W: each position is kept with probability 1 - p, decided by a keyed hash of
    (key, position), so backward rebuilds the very mask forward used without storing it."""

    p: float
    key: int

    def keep_scale(self, positions: torch.Tensor) -> torch.Tensor:
        bits = _round_function(_round_function(positions & _M32, self.key & _M32) ^ (positions >> 32), self.key >> 32)
        threshold = int(self.p * (1 << 32))
        return (bits >= threshold).to(torch.float32) / (1.0 - self.p)


def reference_delta_flat(theta_s: torch.Tensor, sl: Slice, drop: DropConnect | None = None) -> torch.Tensor:
    """vec(Delta_W) for one slice in fp32: chunked ids, then a gather (the plain-PyTorch reference)."""
    out = torch.empty(sl.numel, dtype=torch.float32, device=theta_s.device)
    for s, n in chunks(sl.start, sl.numel):
        ids = sl.partition.ids(s, n, device=theta_s.device)
        vals = theta_s[ids]
        if drop is not None:
            vals = vals * drop.keep_scale(torch.arange(s, s + n, device=theta_s.device))
        out[s - sl.start : s - sl.start + n] = vals
    return out


def reference_accumulate_grad(grad_theta_s: torch.Tensor, grad_w: torch.Tensor, sl: Slice,
                              drop: DropConnect | None = None) -> None:
    """grad_theta_s[g(i)] += vec(grad_w)[i] for the slice, in fp32 (the plain-PyTorch reference)."""
    flat = grad_w.reshape(-1)
    for s, n in chunks(sl.start, sl.numel):
        ids = sl.partition.ids(s, n, device=grad_theta_s.device)
        vals = flat[s - sl.start : s - sl.start + n].float()
        if drop is not None:
            vals = vals * drop.keep_scale(torch.arange(s, s + n, device=grad_theta_s.device))
        grad_theta_s.index_add_(0, ids, vals)
