"""Rank-sharded, resumable batches: a seeded permutation per epoch, position kept in the checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


class ShardedBatches:
    """Yields this rank's micro-batches forever (epoch after epoch); its state resumes exactly.

    Every epoch draws one permutation of all examples from ``seed + epoch``; rank ``r`` of ``W``
    takes batches ``r, r + W, r + 2W, ...`` of that order, so ranks never share an example and
    every rank gets the same number of batches (the last incomplete round is dropped).

    Example:
        >>> batches = ShardedBatches(examples, batch_size=4, collate=fn, rank=0, world_size=2)
        >>> first = next(iter(batches)); state = batches.state_dict()
    """

    def __init__(
        self,
        examples: list[Any],
        batch_size: int,
        collate: Callable[[list[Any]], Any],
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        rounds = len(examples) // (batch_size * world_size)
        if rounds == 0:
            raise ValueError(
                f"{len(examples)} examples cannot fill one batch of {batch_size} on each of "
                f"{world_size} rank(s); add data or lower training.micro_batch_size"
            )
        self.examples = examples
        self.batch_size = batch_size
        self.collate = collate
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = rounds
        self.epoch = 0
        self.position = 0  # batches of this rank consumed in the current epoch

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def __iter__(self) -> Iterator[Any]:
        while True:
            order = self._order(self.epoch)
            while self.position < self.batches_per_epoch:
                global_batch = self.position * self.world_size + self.rank
                start = global_batch * self.batch_size
                idx = order[start : start + self.batch_size]
                self.position += 1
                yield self.collate([self.examples[i] for i in idx])
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        """Returns the position to resume from (epoch and batches consumed)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continues from a position saved by :meth:`state_dict`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
