"""Groupings: which weights share a coordinate of theta.

- "random" (GPart, the default): the seeded partition of gpart.partition, computed per position from the
  seed, nothing stored.
- "signed_magnitude" (experimental, an ablation of the authors' post-paper variant): the weights are split
  by the sign of their pretrained value W0 (zero counts as positive), each sign pool into equal-count bins
  of increasing |W0|, and the d bins are shared between the two pools in proportion to their sizes. The
  groups depend on W0, so they are computed from the base weights when the adapter is injected and kept
  as an index buffer of D int64 ids (8 bytes per adapted weight), and the config records a sha256 of
  those ids: an adapter loaded onto other base weights would get other groups, and is refused. No fused
  kernel serves it (the plain-PyTorch path runs). Columns are scaled by 1/sqrt(n_j), so P^T P = I.
"""

from __future__ import annotations

import hashlib

import torch

from .partition import PartitionError, check_sizes

GROUPINGS = ("random", "signed_magnitude")


class SignedMagnitudeGroups:
    """P[i, g(i)] = 1/sqrt(n_g(i)) with g(i) the signed-magnitude bin of W0[i]; the projection interface of
    gpart.functional over an index buffer."""

    def __init__(self, weights: list[torch.Tensor], d: int):
        w = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in weights])
        self.D, self.d = w.numel(), d
        check_sizes(self.D, d)
        positive = w >= 0
        n_pos = int(positive.sum())
        n_neg = self.D - n_pos
        # bins in proportion to the pools' sizes, at least one per non-empty pool, no more than its weights
        d_pos = min(max(round(d * n_pos / self.D), 1 if n_pos else 0), n_pos, d - (1 if n_neg else 0))
        d_pos = max(d_pos, d - n_neg)
        self.ids = torch.empty(self.D, dtype=torch.int64)
        for mask, first, bins in ((positive, 0, d_pos), (~positive, d_pos, d - d_pos)):
            members = mask.nonzero().squeeze(1)
            if members.numel() == 0:
                continue
            order = torch.sort(w[members].abs(), stable=True).indices  # ties: canonical order
            ranks = torch.arange(members.numel(), dtype=torch.int64)
            self.ids[members[order]] = first + ranks * bins // members.numel()
        self._sizes = torch.bincount(self.ids, minlength=d)
        self._on: dict[str, torch.Tensor] = {}

    def fingerprint(self) -> str:
        """sha256 of the group ids: what the config records, to refuse other base weights on load."""
        return hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()

    def scales(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._sizes.double().rsqrt().to(dtype=dtype, device=device)

    def _ids(self, device, start: int, length: int, positions: torch.Tensor | None) -> torch.Tensor:
        """The group ids of positions [start, start + length), or of `positions`, on `device`."""
        key = str(device)
        if key not in self._on:
            self._on[key] = self.ids.to(device)
        ids = self._on[key]
        return ids[start : start + length] if positions is None else ids[positions.reshape(-1)]

    def delta(self, theta_s: torch.Tensor, start: int, length: int, positions: torch.Tensor | None = None):
        return theta_s.float()[self._ids(theta_s.device, start, length, positions)]

    def transpose_add(self, acc: torch.Tensor, grad: torch.Tensor, start: int,
                      positions: torch.Tensor | None = None) -> None:
        flat = grad.reshape(-1).float()
        acc.index_add_(0, self._ids(acc.device, start, flat.numel(), positions), flat)

    def dense(self) -> torch.Tensor:
        """The D x d matrix P (for tests and small models only)."""
        if self.D * self.d > 1 << 26:
            raise PartitionError(f"refusing to materialise a {self.D} x {self.d} matrix; this is for small tests")
        P = torch.zeros(self.D, self.d, dtype=torch.float64)
        P[torch.arange(self.D), self.ids] = self.scales(dtype=torch.float64)[self.ids]
        return P
