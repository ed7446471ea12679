"""Partition scopes: which part of theta each adapted tensor is mapped from.

- "global" (the default): one partition of all D adapted weights over the whole of theta.
- "transformer_block" (the authors' option): every numbered transformer block gets its own balanced
  partition over its own weights and its own contiguous slice of theta. A block is the module path up
  to a container named layers/layer/h/block/blocks (or the config's layers_pattern) and the index after
  it, e.g. "bert.encoder.layer.3". Blocks are taken in the order their first tensor appears in the
  canonical order (index order for a ModuleList); d is split as evenly as possible across them (the
  first d mod n blocks get one more), and block i is seeded with seed + i. Within a block, position 0
  is its first weight in canonical order.

A plan is computed from the layout alone (names and shapes) and holds a few integers per block, so a
scope stores nothing per weight, and each block's partition is the global one's construction over
[0, D_i).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import accumulate

from .partition import PartitionError

SCOPES = ("global", "transformer_block")
BLOCK_CONTAINERS = ("layers", "layer", "h", "block", "blocks")


@dataclass(frozen=True)
class Block:
    """One partition of a scope: weights [0, D) of the block, mapped from theta[theta_offset : theta_offset + d]."""

    name: str
    seed: int
    D: int
    d: int
    theta_offset: int


@dataclass(frozen=True)
class Plan:
    """A scope applied to a layout: its blocks, and for each tensor (block index, first position in its block)."""

    blocks: tuple[Block, ...]
    placements: tuple[tuple[int, int], ...]


def block_name(tensor_name: str, containers=BLOCK_CONTAINERS) -> str | None:
    """The numbered block `tensor_name` lies in ("...layer.3"), or None: the outermost container match."""
    alternatives = "|".join(re.escape(c) for c in containers)
    found = re.search(rf"(?:^|\.)(?:{alternatives})\.\d+(?=\.|$)", tensor_name)
    return None if found is None else tensor_name[: found.end()]


def block_names(layout, layers_pattern=None) -> list[str | None]:
    """The block of every tensor of the layout ([name, shape] pairs), None outside any block."""
    containers = BLOCK_CONTAINERS if not layers_pattern else (
        [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern))
    return [block_name(name, containers) for name, _ in layout]


def plan(scope: str, layout, d: int, seed: int, layers_pattern=None) -> Plan:
    """The blocks of `scope` over `layout`; raises PartitionError naming the problem and the fix."""
    sizes = [math.prod(shape) for _, shape in layout]
    if scope == "global":
        starts = [end - size for end, size in zip(accumulate(sizes), sizes)]
        return Plan((Block("", seed, sum(sizes), d, 0),), tuple((0, start) for start in starts))
    names = block_names(layout, layers_pattern)
    containers = "/".join(BLOCK_CONTAINERS) if not layers_pattern else f"layers_pattern {layers_pattern!r}"
    if all(n is None for n in names):
        raise PartitionError("partition_scope='transformer_block' needs numbered transformer blocks, but no adapted "
                             f"tensor lies in one (a module path with a container named {containers} followed by an "
                             "index). Use partition_scope='global', or set layers_pattern to the name of the model's "
                             "block container.")
    outside = [layout[i][0] for i, n in enumerate(names) if n is None]
    if outside:
        raise PartitionError(f"partition_scope='transformer_block': the adapted tensor {outside[0]!r} lies in no "
                             f"numbered transformer block ({len(outside)} such tensors; blocks are found by "
                             f"{containers}). Leave such modules out with exclude_modules, or use "
                             "partition_scope='global'.")
    order = list(dict.fromkeys(names))
    if d < len(order):
        raise PartitionError(f"d={d} is smaller than the {len(order)} transformer blocks of "
                             "partition_scope='transformer_block', which gives every block at least one coordinate of "
                             f"theta; choose d >= {len(order)}, or partition_scope='global'.")
    index = {name: i for i, name in enumerate(order)}
    block_D, placements = [0] * len(order), []
    for name, size in zip(names, sizes):
        placements.append((index[name], block_D[index[name]]))
        block_D[index[name]] += size
    q, r = divmod(d, len(order))
    blocks, offset = [], 0
    for i, name in enumerate(order):
        d_i = q + (i < r)
        if d_i > block_D[i]:
            raise PartitionError(f"partition_scope='transformer_block': block {name!r} would get d_i={d_i} "
                                 f"coordinates of theta (d={d} over {len(order)} blocks) but holds only {block_D[i]} "
                                 f"adapted weights; choose d <= {min(block_D) * len(order)}, or "
                                 "partition_scope='global'.")
        blocks.append(Block(name, seed + i, block_D[i], d_i, offset))
        offset += d_i
    return Plan(tuple(blocks), tuple(placements))
