"""The training sampler of ``fast3dis-train`` under torchrun: each rank's share of one global sample stream."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from fast3dis_ros.train.data import ResumableSampler

__all__ = ["ShardedSceneSampler"]


class ShardedSceneSampler(ResumableSampler):
    """This rank's share of the global ``(index, aug_seed)`` stream of :class:`ResumableSampler`.

    The global stream is cut into blocks of ``block`` (= the per-rank micro-batch) positions; block ``k``
    goes to rank ``k % world``. So global micro-batch ``m`` (positions ``m*block*world ...``) is the
    concatenation of the ranks' micro-batches ``m`` in rank order: a step on N ranks sees exactly the
    samples of a step on one rank with an N times larger batch. Positions of one epoch are a permutation
    of the scenes, split between ranks without overlap; the next epoch is a new permutation (keyed by
    ``(seed, epoch)``), so the data reshuffles every epoch without a ``set_epoch`` call. Augmentation
    seeds depend on the global position only, so they do not depend on the world size either.

    ``start`` is a *global* position (a multiple of ``block * world``); ``length`` counts this rank's keys.
    :meth:`set_epoch` restarts the stream at the first block of an epoch, for epoch-style loops.
    """

    def __init__(self, n: int, *, rank: int = 0, world: int = 1, block: int = 1, seed: int = 0,
                 start: int = 0, length: int | None = None, shuffle: bool = True) -> None:
        super().__init__(n, seed=seed, start=start, length=length, shuffle=shuffle)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        if start % (block * world):
            raise ValueError(f"start {start} is not a multiple of block x world = {block * world}")
        self.rank, self.world, self.block = int(rank), int(world), int(block)

    def global_position(self, i: int) -> int:
        """Global stream position of this rank's ``i``-th key."""
        blk, j = divmod(int(i), self.block)
        return self.start + (blk * self.world + self.rank) * self.block + j

    def set_epoch(self, epoch: int) -> None:
        """Start at the first global block boundary at or after epoch ``epoch``'s first position."""
        span = self.block * self.world
        self.start = -(-int(epoch) * self.n // span) * span

    def __iter__(self) -> Iterator[tuple[int, int]]:
        i = 0
        while self.length is None or i < self.length:
            yield self.key(self.global_position(i))
            i += 1

    def epoch_positions(self, epoch: int) -> np.ndarray:
        """Scene indices this rank draws from the positions of epoch ``epoch`` (for tests / inspection)."""
        lo, hi = max(epoch * self.n, self.start), (epoch + 1) * self.n
        out = [self.key(p)[0] for p in range(lo, hi) if ((p - self.start) // self.block) % self.world == self.rank]
        return np.asarray(out, dtype=np.int64)
