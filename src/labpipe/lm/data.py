"""The synthetic shards as a torch Dataset, and the seeded epoch order that makes training resumable.

A split is a list of shards (see labpipe.synth.manifest): raw (sequences, seq_length) memmaps. The dataset
maps a global index to (shard, row) and reads that one row; nothing is ever loaded whole. Memmaps are
opened lazily in each process (the OPEN_SHARDS most recently used stay open) and dropped when the dataset
is pickled: a DataLoader worker (forked, or spawned where fork is not the default) starts with paths only
and opens its own memmaps, which share the page cache. A pickled np.memmap would carry a copy of all its
data: the seed's DataLoader workers died of OOM doing much the same.

The epoch order is one uniform shuffle of every row, as long as the split holds at most WINDOW_ROWS rows
(the default and the seed's datasets). A permutation of all rows costs 8 bytes per row, though: 13 GB for
a terabyte of 300-token rows (the seed's first LM run died allocating 800 GB). So the shards, in a random
order, are dealt into windows of whole shards holding at most WINDOW_ROWS rows, and the rows of each window
are shuffled together: the order needs one window's memory. Mixing many shards matters with permuted
emissions, where the rows of a block share a permutation: a batch should see many permutations, and
training should not dwell on a few of them. Every row is visited exactly once per epoch; each window's
order has its own seed, (epoch seed, window), so a resumed run skips to any batch without drawing the
orders it skips.

Under data parallelism each rank reads its share of every batch (distributed.share: contiguous, disjoint,
together the batch), so the order of the rows depends on (seed, epoch, batch size) alone, not on the number
of ranks, and every rank still sees each row of the epoch at most once.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from collections.abc import Iterator

import numpy as np
import torch

from labpipe.distributed import SINGLE, World, share
from labpipe.synth.manifest import Manifest

OPEN_SHARDS = 256  # memmaps a process keeps open


class ShardDataset(torch.utils.data.Dataset):
    """Row i of a split (its shards concatenated in manifest order) as an int64 tensor of seq_length tokens."""

    def __init__(self, manifest: Manifest, split: str):
        self.manifest = manifest
        self.shards = manifest.split(split)
        self.shard_sizes = [shard.sequences for shard in self.shards]
        self.starts = list(itertools.accumulate(self.shard_sizes, initial=0))  # global index of each shard's row 0
        self._memmaps: dict[int, np.memmap] = {}  # shard -> memmap opened in this process, least recent first

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a split with {len(self)} rows")
        shard = bisect.bisect_right(self.starts, index) - 1
        return torch.from_numpy(self._memmap(shard)[index - self.starts[shard]].astype(np.int64))

    def _memmap(self, shard: int) -> np.memmap:
        """The shard's memmap, opened on first use; only the OPEN_SHARDS most recently used stay open (each
        holds a file descriptor, and a terabyte is thousands of shards)."""
        memmap = self._memmaps.pop(shard, None)
        if memmap is None:
            memmap = self.manifest.open(self.shards[shard])
        self._memmaps[shard] = memmap  # now the most recent
        if len(self._memmaps) > OPEN_SHARDS:
            del self._memmaps[next(iter(self._memmaps))]
        return memmap

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_memmaps": {}}  # paths travel, data does not


WINDOW_ROWS = 1 << 24  # rows shuffled together: two int64 indices each, 256 MB


def shard_windows(shard_sizes: list[int], seed: int) -> list[list[int]]:
    """The shards in the order of `seed`, dealt into consecutive windows of at most WINDOW_ROWS rows (a
    larger shard is a window of its own)."""
    windows: list[list[int]] = []
    rows = 0
    for shard in np.random.default_rng(seed).permutation(len(shard_sizes)).tolist():
        if not windows or rows + shard_sizes[shard] > WINDOW_ROWS:
            windows.append([])
            rows = 0
        windows[-1].append(shard)
        rows += shard_sizes[shard]
    return windows


class EpochOrder(torch.utils.data.Sampler[int]):
    """One epoch's global row indices, shuffled within each window of shards; `skip` drops the first ones."""

    def __init__(self, shard_sizes: list[int], seed: int, skip: int = 0):
        self.shard_sizes = shard_sizes
        self.seed = seed
        self.skip = skip

    def __len__(self) -> int:
        return max(sum(self.shard_sizes) - self.skip, 0)

    def __iter__(self) -> Iterator[int]:
        starts = list(itertools.accumulate(self.shard_sizes, initial=0))
        to_skip = self.skip
        for number, window in enumerate(shard_windows(self.shard_sizes, self.seed)):
            size = sum(self.shard_sizes[shard] for shard in window)
            if to_skip >= size:
                to_skip -= size
                continue
            rows = np.concatenate([np.arange(starts[shard], starts[shard + 1]) for shard in window])
            order = np.random.default_rng([self.seed, number]).permutation(size)[to_skip:]
            to_skip = 0
            yield from map(int, rows[order])  # lazily: no Python list of a whole window's indices


class RankBatches(torch.utils.data.Sampler[list[int]]):
    """The rows `world`'s rank reads of each batch of batch_size rows of `order`: its share of the batch."""

    def __init__(self, order: EpochOrder, batch_size: int, world: World):
        self.order, self.batch_size, self.world = order, batch_size, world

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rows = iter(self.order)
        while batch := list(itertools.islice(rows, self.batch_size)):
            yield batch[share(len(batch), self.world)]


def stack_rows(rows: list[torch.Tensor], seq_length: int) -> torch.Tensor:
    """A batch of rows; an empty share of a short last batch is a (0, seq_length) batch."""
    return torch.stack(rows) if rows else torch.empty((0, seq_length), dtype=torch.int64)


def epoch_loader(dataset: ShardDataset, batch_size: int, seed: int, num_workers: int = 0, skip_batches: int = 0,
                 pin_memory: bool = False, world: World = SINGLE) -> torch.utils.data.DataLoader:
    """The rank's share of each batch of batch_size rows of one epoch, in the order of EpochOrder(seed), from
    batch skip_batches on. The last batch of an epoch may be smaller: every row is used once per epoch."""
    order = EpochOrder(dataset.shard_sizes, seed, skip=skip_batches * batch_size)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=RankBatches(order, batch_size, world), num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=functools.partial(stack_rows, seq_length=dataset.manifest.seq_length))


def steps_per_epoch(dataset: ShardDataset, batch_size: int) -> int:
    return -(-len(dataset) // batch_size)


def training_batches(dataset: ShardDataset, batch_size: int, seed: int, num_workers: int, start_step: int = 0,
                     pin_memory: bool = False, world: World = SINGLE) -> Iterator[tuple[torch.Tensor, int]]:
    """The endless stream of (the rank's rows, the rows of the whole batch) of each training step: epoch e in
    the order of seed + e, starting after `start_step` batches, so that a resumed run sees exactly the batches
    an uninterrupted one would."""
    epoch, done = divmod(start_step, steps_per_epoch(dataset, batch_size))
    while True:
        for number, rows in enumerate(epoch_loader(dataset, batch_size, seed + epoch, num_workers, done, pin_memory,
                                                   world), start=done):
            yield rows, min(batch_size, len(dataset) - number * batch_size)
        epoch, done = epoch + 1, 0


def shards_read(dataset: ShardDataset, batch_size: int, seed: int, steps: int) -> list[int]:
    """Indices (into dataset.shards) of the shards that `steps` training batches may read: all of them once
    the run reaches a second epoch, else those of the windows that epoch 0's first batches reach."""
    if steps >= steps_per_epoch(dataset, batch_size):
        return list(range(len(dataset.shards)))
    read, rows = [], 0
    for window in shard_windows(dataset.shard_sizes, seed):
        if rows >= steps * batch_size:
            break
        read += window
        rows += sum(dataset.shard_sizes[shard] for shard in window)
    return sorted(read)
