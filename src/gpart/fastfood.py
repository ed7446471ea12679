"""Fastfood: the structured random projection of the intrinsic-dimension baseline (Li et al. 2018;
the DID of Aghajanyan et al. 2021), the ablation projection="fastfood" (docs/method.md).

    P theta = c * [ H G_b Pi_b H B_b pad_L(theta) ]  for blocks b = 0 .. K-1, stacked, cut to D rows

L is the smallest power of two >= d, H the unnormalised Walsh-Hadamard transform, B_b random signs, Pi_b a
random permutation, G_b Gaussians rescaled to ||G_b||^2 = L, and c = 1 / sqrt(L * D): every column has unit
norm when L divides D, but P is an isometry in expectation only. Stateless like the partition: B_b, Pi_b and
G_b come from integer hashes of (seed, block, position), rebuilt at each call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .partition import VERSION, PartitionError, hash64, permute, round_keys, splitmix64

# The largest Walsh-Hadamard transform built: one block is L floats per adapted tensor and call.
MAX_LOG2_L = 24
_SIGN, _GAUSS_A, _GAUSS_B = 0x5167, 0x6A55, 0x7E21  # salts separating the three random streams


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along the last dimension (a power of two)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, n)


@dataclass(frozen=True)
class Fastfood:
    """The Fastfood projection of D positions from d coordinates, fixed by `seed`."""

    seed: int
    D: int
    d: int
    version: int = VERSION  # of the integer hashes (shared with the partition's)

    def __post_init__(self) -> None:
        if not (isinstance(self.d, int) and isinstance(self.D, int) and 1 <= self.d <= self.D):
            raise PartitionError(f"Fastfood needs integers 1 <= d <= D, got d={self.d!r}, D={self.D!r}")
        log2_l = max(0, (self.d - 1).bit_length())
        if log2_l > MAX_LOG2_L:
            raise PartitionError(
                f"projection='fastfood' with d={self.d:,} needs a Walsh-Hadamard transform of size 2^{log2_l}; "
                f"gpart builds Fastfood up to 2^{MAX_LOG2_L} (d <= {1 << MAX_LOG2_L:,}). Use a smaller d or "
                "projection='partition'."
            )
        object.__setattr__(self, "L", 1 << log2_l)
        object.__setattr__(self, "c", 1.0 / math.sqrt(self.L * self.D))
        keys = round_keys(self.seed)
        object.__setattr__(self, "stream_key", (keys[0] << 32) | keys[1])

    def _hashes(self, blocks: torch.Tensor, salt: int) -> torch.Tensor:
        """(len(blocks), L) 32-bit hashes of the blocks' positions in the random stream named by `salt`."""
        pos = blocks[:, None] * self.L + torch.arange(self.L, device=blocks.device)
        return hash64(pos, splitmix64(self.stream_key ^ salt))

    def _signs(self, blocks: torch.Tensor) -> torch.Tensor:
        return 1.0 - 2.0 * (self._hashes(blocks, _SIGN) & 1).to(torch.float32)

    def _gauss(self, blocks: torch.Tensor) -> torch.Tensor:
        """Box-Muller Gaussians from two hash streams, each block rescaled to squared norm L."""
        u1, u2 = ((self._hashes(blocks, salt).double() + 0.5) / 2.0**32 for salt in (_GAUSS_A, _GAUSS_B))
        g = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        g = g * torch.sqrt(self.L / (g * g).sum(1, keepdim=True))
        return g.to(torch.float32)

    def _perms(self, blocks: torch.Tensor) -> torch.Tensor:
        """Pi_b for each block: a keyed Feistel permutation of [0, L) (the partition's version-1 network)."""
        arange = torch.arange(self.L, dtype=torch.int64, device=blocks.device)
        rows = [permute(arange, self.L, round_keys(splitmix64(self.stream_key ^ int(b)) >> 1), 1) for b in blocks.tolist()]
        return torch.stack(rows)

    # -- forward and transpose over whole blocks --------------------------------------------------------

    def _blocks(self, theta_s: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """(len(blocks), L): P theta on those blocks, before the cut to D."""
        v = torch.zeros(len(blocks), self.L, dtype=torch.float32, device=theta_s.device)
        v[:, : self.d] = theta_s.float()
        v = fwht(v * self._signs(blocks))
        v = torch.gather(v, 1, self._perms(blocks)) * self._gauss(blocks)
        return fwht(v) * self.c

    def _blocks_t(self, u: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """(d,): the transpose of _blocks applied to per-block values u (len(blocks), L), summed over blocks."""
        u = fwht(u * self.c) * self._gauss(blocks)
        w = torch.zeros_like(u).scatter_(1, self._perms(blocks), u)
        return (fwht(w) * self._signs(blocks))[:, : self.d].sum(0)

    # -- the projection interface (gpart.functional) ---------------------------------------------------

    def scales(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Column scales applied to theta before the transform: none (c is inside the transform)."""
        return torch.ones(self.d, dtype=dtype, device=device)

    def delta(self, theta_s: torch.Tensor, start: int, length: int, positions: torch.Tensor | None = None):
        """(P theta) at positions [start, start + length), or at `positions`; flat fp32. Only the blocks
        that hold those positions are transformed."""
        flat = self._positions(start, length, positions, theta_s.device)
        blocks, where = torch.unique(flat // self.L, return_inverse=True)
        return self._blocks(theta_s, blocks)[where, flat % self.L]

    def transpose_add(self, acc: torch.Tensor, grad: torch.Tensor, start: int,
                      positions: torch.Tensor | None = None) -> None:
        """acc += P^T grad for the positions of `delta`, in fp32, in place."""
        vals = grad.reshape(-1).float()
        flat = self._positions(start, vals.numel(), positions, vals.device)
        blocks, where = torch.unique(flat // self.L, return_inverse=True)
        u = torch.zeros(len(blocks), self.L, dtype=torch.float32, device=vals.device)
        u.index_put_((where, flat % self.L), vals, accumulate=True)
        acc += self._blocks_t(u, blocks)

    def _positions(self, start: int, length: int, positions: torch.Tensor | None, device) -> torch.Tensor:
        if positions is not None:
            return positions.reshape(-1)
        if start < 0 or length < 1 or start + length > self.D:
            raise PartitionError(f"slice [{start}, {start + length}) is outside [0, D={self.D})")
        return torch.arange(start, start + length, device=device)

    def dense(self) -> torch.Tensor:
        """The D x d matrix P, materialised (for tests and small models only)."""
        if self.D * self.d > 1 << 24:
            raise PartitionError(f"refusing to materialise a {self.D} x {self.d} matrix; this is for small tests")
        eye = torch.eye(self.d)
        return torch.stack([self.delta(eye[j], 0, self.D) for j in range(self.d)], 1).double()
