"""The GPart partition: a seeded, stateless, balanced assignment of D weight positions to d groups
(docs/method.md, "The partition").

Position i belongs to group g(i) = pi(i) mod d, pi a keyed 4-round Feistel permutation of [0, D) with
cycle-walking. pi is a bijection, so group j has ceil(D/d) members when j < D mod d and floor(D/d)
otherwise: the isometric scales 1/sqrt(n_j) are known in closed form, no group is empty, and
P[i, g(i)] = 1/sqrt(n_g(i)) gives P^T P = I_d. Version 1 permutes the smallest power of two >= D (halves of
a and b bits); version 2 (new adapters) a grid of 2^p columns x B rows, whose rounds alternate between the
column and the row and which cycle-walks for fewer than 1 in B positions.

Every intermediate value stays below 2^63 (32-bit values times constants below 2^31, or 16-bit values
times B <= 2^31), so int64 tensors give bit-identical ids on any device and the kernels can use uint32
wrap-around arithmetic. A version must never change: a saved adapter is only meaningful with the exact
partition it was trained with, so a new construction gets a new version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .version import __version__

ALGORITHM = "feistel-cyclewalk"
VERSION = 2  # what new adapters use
VERSIONS = (1, 2)  # what this gpart computes; an adapter records its version and keeps it

ROUNDS = 4
M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
# Multipliers of the 32-bit round function (a well-known low-bias integer hash); both below 2^31 so
# that a 32-bit value times either stays below 2^63 in int64 arithmetic.
_MUL1 = 0x21F0AAAD
_MUL2 = 0x735A2D97
# Default slice length for chunked id generation: bounds transient memory to ~32 bytes * CHUNK.
CHUNK = 1 << 22


class PartitionError(ValueError):
    """A partition cannot be built from the given sizes."""


def splitmix64(x: int) -> int:
    """One step of splitmix64 on a Python int (exact 64-bit unsigned arithmetic)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def round_keys(seed: int, rounds: int = ROUNDS) -> list[int]:
    """32-bit round keys derived from the seed: key_r = low 32 bits of splitmix64 chained r+1 times."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0 or seed >= 1 << 63:
        raise PartitionError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    keys, state = [], seed
    for _ in range(rounds):
        state = splitmix64(state)
        keys.append(state & M32)
    return keys


def domain_bits(D: int) -> tuple[int, int]:
    """Widths (a, b) of the Feistel halves: a + b bits cover the smallest power of two >= D, a >= b."""
    total = max(1, (D - 1).bit_length())
    return (total + 1) // 2, total // 2


def hash32(x: torch.Tensor, key: int) -> torch.Tensor:
    """A 32-bit integer hash of (x + key); x holds non-negative values below 2^32 (the round function)."""
    x = (x + key) & M32
    x = x ^ (x >> 16)
    x = (x * _MUL1) & M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & M32
    return x ^ (x >> 15)


def hash64(positions: torch.Tensor, key: int) -> torch.Tensor:
    """A 32-bit hash of int64 positions (any value below 2^63) under a 64-bit key: both halves, chained."""
    return hash32(hash32(positions & M32, key & M32) ^ (positions >> 32), key >> 32)


def check_version(version, hint: str = "") -> None:
    """Refuse a partition version this gpart does not compute; `hint` ends the message (which gpart to get)."""
    if version in VERSIONS and isinstance(version, int):
        return
    newer = isinstance(version, int) and version > VERSION
    raise PartitionError(f"unknown partition version {version!r}, which gpart {__version__} does not know "
                         f"({'newer than ' if newer else ''}this gpart's versions {VERSIONS})" + (f"; {hint}" if hint else ""))


def feistel(x: torch.Tensor, keys: list[int], a: int, b: int) -> torch.Tensor:
    """Version 1's permutation of [0, 2^(a+b)): x = L * 2^b + R, round r maps (L, R) to (R, L xor F_r(R)); the
    halves swap widths each round, and an even number of rounds brings them back to (a, b)."""
    wl, wr = a, b
    left, right = x >> wr, x & ((1 << wr) - 1)
    for key in keys:
        left, right = right, left ^ (hash32(right, key) & ((1 << wl) - 1))
        wl, wr = wr, wl
    return (left << wr) | right


def grid_shape(D: int) -> tuple[int, int]:
    """Version 2's grid: (p, B) for 2^p columns and B = ceil(D / 2^p) rows; 2^p * B - D < 2^p, and
    B <= 2^16 whenever D <= 2^32."""
    p = (max(1, (D - 1).bit_length()) + 1) // 2
    return p, -(-D // (1 << p))


def spread(h: torch.Tensor, B: int) -> torch.Tensor:
    """A 32-bit hash -> [0, B) with one multiply: the top 16 bits scaled by B / 2^16."""
    return ((h >> 16) * B) >> 16


def feistel_grid(v: torch.Tensor, keys: list[int], p: int, B: int) -> torch.Tensor:
    """Version 2's permutation of [0, 2^p * B): v = row * 2^p + column, rounds alternating between the
    column (plus F(row), mod 2^p) and the row (plus spread(F(column)), mod B)."""
    mask = (1 << p) - 1
    column, row = v & mask, v >> p
    for r, key in enumerate(keys):
        if r % 2 == 0:
            column = (column + hash32(row, key)) & mask
        else:
            row = row + spread(hash32(column, key), B)
            row = torch.where(row >= B, row - B, row)
    return (row << p) | column


def permute(positions: torch.Tensor, D: int, keys: list[int], version: int) -> torch.Tensor:
    """pi(positions): the version's Feistel permutation, cycle-walked so that it maps [0, D) onto itself."""
    check_version(version)
    if version == 1:
        a, b = domain_bits(D)
        step = lambda x: feistel(x, keys, a, b)  # noqa: E731
    else:
        p, B = grid_shape(D)
        step = lambda x: feistel_grid(x, keys, p, B)  # noqa: E731
    out = step(positions)
    # Cycle-walking: re-apply pi to the values that left [0, D) (at most half in version 1, fewer
    # than 1 in B in version 2).
    idx = (out >= D).nonzero().squeeze(1)
    while idx.numel():
        out[idx] = step(out[idx])
        idx = idx[out[idx] >= D]
    return out


def check_sizes(D: int, d: int) -> None:
    """Raise a PartitionError naming the problem unless 1 <= d <= D are integers."""
    for name, value in (("D", D), ("d", d)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise PartitionError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if D < 1:
        raise PartitionError(f"the adapted tensors hold D={D} weights; GPart needs at least one target weight")
    if not 1 <= d <= D:
        raise PartitionError(
            f"d={d} is out of range: it must satisfy 1 <= d <= D, and the targeted tensors hold D={D} weights. "
            f"Choose d between 1 and {D}, or target more modules."
        )


@dataclass(frozen=True)
class Partition:
    """The partition of D positions into d balanced groups, fixed by `seed`: it holds (seed, D, d, version) and
    four round keys, nothing proportional to D."""

    seed: int
    D: int
    d: int
    version: int = VERSION

    def __post_init__(self) -> None:
        check_sizes(self.D, self.d)
        check_version(self.version)
        object.__setattr__(self, "keys", tuple(round_keys(self.seed)))

    def ids(self, start: int, length: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Group ids (int64) of positions start, ..., start + length - 1."""
        if start < 0 or length < 0 or start + length > self.D:
            raise PartitionError(f"slice [{start}, {start + length}) is outside [0, D={self.D})")
        return self.ids_at(torch.arange(start, start + length, dtype=torch.int64, device=device))

    def ids_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Group ids (int64, flat) of arbitrary positions in [0, D) (int64, any shape)."""
        return permute(positions.reshape(-1), self.D, list(self.keys), self.version) % self.d  # no input mutated

    def group_sizes(self, device: torch.device | str | None = None) -> torch.Tensor:
        """n_j for every group j: ceil(D/d) for j < D mod d, else floor(D/d)."""
        q, r = divmod(self.D, self.d)
        sizes = torch.full((self.d,), q, dtype=torch.int64, device=device)
        sizes[:r] += 1
        return sizes

    def scales(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """1/sqrt(n_j) for every group: the non-zero entries of column j of P."""
        q, r = divmod(self.D, self.d)
        big, small = 1.0 / math.sqrt(q + 1), 1.0 / math.sqrt(q)
        out = torch.full((self.d,), small, dtype=torch.float64, device=device)
        out[:r] = big
        return out.to(dtype)

    def delta(self, theta_s: torch.Tensor, start: int, length: int, positions: torch.Tensor | None = None):
        """(P theta)[i] = theta_s[g(i)] at positions [start, start + length), or at `positions`; flat fp32 (the
        reference of the kernels; ids are built a chunk at a time)."""
        if positions is not None:
            return theta_s.float()[self.ids_at(positions)]
        out = torch.empty(length, dtype=torch.float32, device=theta_s.device)
        for s, n in chunks(start, length):
            out[s - start : s - start + n] = theta_s[self.ids(s, n, device=theta_s.device)]
        return out

    def transpose_add(self, acc: torch.Tensor, grad: torch.Tensor, start: int,
                      positions: torch.Tensor | None = None) -> None:
        """acc += P^T grad for the positions of `delta`: acc[g(i)] += grad[i], in fp32, in place."""
        flat = grad.reshape(-1).float()
        if positions is not None:
            acc.index_add_(0, self.ids_at(positions), flat)
            return
        for s, n in chunks(start, flat.numel()):
            acc.index_add_(0, self.ids(s, n, device=acc.device), flat[s - start : s - start + n])

    def dense(self) -> torch.Tensor:
        """The D x d matrix P, materialised (for tests and small models only)."""
        if self.D * self.d > 1 << 26:
            raise PartitionError(f"refusing to materialise a {self.D} x {self.d} matrix; this is for small tests")
        ids = self.ids(0, self.D)
        P = torch.zeros(self.D, self.d, dtype=torch.float64)
        P[torch.arange(self.D), ids] = self.scales(dtype=torch.float64)[ids]
        return P

    def describe(self) -> dict:
        """What the saved config records about the partition."""
        return {"algorithm": ALGORITHM, "version": self.version, "seed": self.seed, "D": self.D, "d": self.d}


def chunks(start: int, length: int, size: int = CHUNK):
    """Yield (chunk_start, chunk_length) pairs covering [start, start + length)."""
    end = start + length
    while start < end:
        step = min(size, end - start)
        yield start, step
        start += step
