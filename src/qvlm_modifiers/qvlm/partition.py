"""Q-VLM block partition (Eq. 6-7): greedy grouping of consecutive decoder layers.

``D[k] = D(k, k+1)`` is the dependency of layer k+1 on layer k (Eq. 4, see
:mod:`qvlm_modifiers.qvlm.entropy`). Eq. 6 sums the links inside a candidate block
``[k_r, k_s]``: ``D(k_r, k_s) = sum_{k=k_r}^{k_s-1} D(k, k+1)`` (``k_s - k_r`` terms; the paper's
printed upper limit ``k_s`` is off by one). Eq. 7 keeps layers in one block while

    D(k_r, k_s) > (k_s - k_r) * h0      i.e.  mean of the block's link dependencies > h0

Greedy rule: walk the layers in order; layer k+1 joins the open block iff the block has fewer
than ``max_block_layers`` layers and the mean of its links *including* ``D(k, k+1)`` exceeds
``h0``; otherwise the open block is closed and layer k+1 starts a new one.

Threshold ``h0``: given, or -- when ``None`` -- derived from the observed dependencies as their
**running mean** ``h0(k) = mean(D[0..k])`` at the time link ``D(k, k+1)`` is decided (the rule of
the reference code since commit 6ceab64). This is causal, so the partition can be decided online
while the sequential pipeline walks the layers, without a separate pass over all layers. It puts a
layer boundary wherever the dependencies drop below the average seen so far.

:class:`OnlinePartitioner` is the incremental form used by the Modifier;
:func:`partition_layers` runs it over a full sequence (for tests / offline use), so both always
agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["OnlinePartitioner", "partition_layers"]


@dataclass
class OnlinePartitioner:
    """Incremental Eq. 7 greedy partition.

    Call :meth:`observe_link` with ``D(k, k+1)`` after layer k; it returns ``True`` if layer
    k+1 joins layer k's block. ``blocks`` holds the closed blocks; ``current`` the open one.

    :param max_block_layers: cap on layers per block (paper: 3)
    :param threshold: h0, or ``None`` for the running mean of the observed dependencies
    """

    max_block_layers: int = 3
    threshold: float | None = None
    dependencies: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    blocks: list[list[int]] = field(default_factory=list)
    current: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self):
        if self.max_block_layers < 1:
            raise ValueError(f"max_block_layers must be >= 1, got {self.max_block_layers}")

    def current_h0(self) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        return sum(self.dependencies) / len(self.dependencies)

    def observe_link(self, dependency: float) -> bool:
        """Record ``D(k, k+1)`` for the last layer ``k`` of the open block; decide whether
        layer ``k+1`` joins the open block (True) or starts a new block (False)."""
        k = self.current[-1]
        self.dependencies.append(float(dependency))
        h0 = self.current_h0()
        self.thresholds.append(h0)
        start = self.current[0]
        links = self.dependencies[start : k + 1]  # D(k_r, k_r+1) .. D(k, k+1)
        mean_dependency = sum(links) / len(links)
        join = len(self.current) < self.max_block_layers and mean_dependency > h0
        if join:
            self.current.append(k + 1)
        else:
            self.blocks.append(self.current)
            self.current = [k + 1]
        return join

    def finish(self) -> list[list[int]]:
        """Close the open block (after the last layer) and return all blocks."""
        if self.current:
            self.blocks.append(self.current)
            self.current = []
        return self.blocks


def partition_layers(
    dependencies: Sequence[float], max_block_layers: int = 3, threshold: float | None = None
) -> list[list[int]]:
    """Partition ``len(dependencies) + 1`` consecutive layers into blocks (Eq. 7, greedy).

    ``dependencies[k] = D(k, k+1)``. Returns lists of layer indices, e.g. ``[[0, 1], [2], [3, 4, 5]]``.
    """
    partitioner = OnlinePartitioner(max_block_layers=max_block_layers, threshold=threshold)
    for value in dependencies:
        partitioner.observe_link(value)
    return partitioner.finish()
