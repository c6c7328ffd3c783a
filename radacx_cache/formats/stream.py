"""Torch access to shards: the training stream, the one in-order reader, a map-style view.

``ShardStream`` (training) is an IterableDataset with exact, resumable partitioning.

The order of an epoch is a pure function of (seed, epoch, consumers, buffer): the split's rows are
cut into contiguous, chunk-aligned blocks; the block order is shuffled per epoch; consumer ``c`` of
``n = world * workers`` (rank-major) takes blocks ``c, c + n, ...`` so that every row is seen exactly
once per epoch overall; inside a consumer a bounded shuffle buffer mixes rows of recent blocks.
Because the order is computed on indices, a resumed run skips the batches already consumed and
continues with exactly the batches it would have seen (``state_dict``/``load_state_dict``).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from .shard import ShardSet

log = logging.getLogger(__name__)


def epoch_block_order(n_blocks: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which an epoch deals blocks to consumers (round robin)."""
    return np.random.default_rng([seed, epoch]).permutation(n_blocks) if shuffle else np.arange(n_blocks)


def consumer_order(block_sizes: list[int], *, seed: int, epoch: int, consumer: int,
                   n_consumers: int, buffer: int, shuffle: bool = True) -> list[tuple[int, int]]:
    """Emission order of (block, offset) pairs for one consumer: a pure, testable function."""
    order = epoch_block_order(len(block_sizes), seed=seed, epoch=epoch, shuffle=shuffle)
    mine = order[consumer::n_consumers]
    if not shuffle:
        return [(int(b), r) for b in mine for r in range(block_sizes[b])]
    rng = np.random.default_rng([seed, epoch, consumer, n_consumers])
    pool: list[tuple[int, int]] = []
    out = []
    for b in mine:
        pool.extend((int(b), r) for r in range(block_sizes[b]))
        while len(pool) > buffer:
            j = int(rng.integers(len(pool)))
            pool[j], pool[-1] = pool[-1], pool[j]
            out.append(pool.pop())
    rng.shuffle(pool)
    out.extend(pool)
    return out


def batches_per_consumer(block_sizes, *, seed, epoch, n_consumers, batch_size, shuffle=True) -> list[int]:
    order = epoch_block_order(len(block_sizes), seed=seed, epoch=epoch, shuffle=shuffle)
    sizes = np.asarray(block_sizes)
    return [math.ceil(int(sizes[order[c::n_consumers]].sum()) / batch_size) for c in range(n_consumers)]


def skip_per_worker(worker_batches: list[int], consumed: int) -> tuple[list[int], int]:
    """Batches each DataLoader worker already delivered after ``consumed`` batches in total, and
    the worker that delivers the next one.

    DataLoader returns iterable-dataset batches round-robin over the workers that still have data,
    starting at worker 0; a resumed loader starts at worker 0 again, so the stream rotates the
    workers' roles to start where the interrupted run would have continued.
    """
    n = len(worker_batches)
    skips = [0] * n
    w = 0
    for _ in range(consumed):
        for _ in range(n):
            if skips[w] < worker_batches[w]:
                break
            w = (w + 1) % n
        else:
            break
        skips[w] += 1
        w = (w + 1) % n
    for _ in range(n):  # the next batch comes from the next worker that still has data
        if skips[w] < worker_batches[w]:
            break
        w = (w + 1) % n
    return skips, w


class ShardStream(torch.utils.data.IterableDataset):
    """Shuffled batches of uint8 images and targets from one split and variant of a shard set, for
    training (docs/training.md). Use it with ``DataLoader(stream, batch_size=None, num_workers=N)``:
    the stream batches itself.

    Yields dicts ``pixels`` (B, H, W) or (B, H, W, 3) uint8, ``targets`` (B, K) float32, ``index``
    (B,) positions in the split's index, ``skipped`` (rows this worker lost to unreadable shards).
    ``num_workers``: the DataLoader's (0 and 1 both mean one reader); None learns it from the loader
    when iteration starts (``torch.utils.data.get_worker_info``), but ``len()`` then cannot be known
    in advance. The batch order is a function of ``seed``, the epoch (``set_epoch``) and the worker
    count, so a resumed run (``state_dict`` / ``load_state_dict``) must keep the worker count.
    """

    def __init__(self, shards: ShardSet, variant: str = "original", batch_size: int = 32, *, seed: int = 0,
                 block_rows: int = 64, shuffle_buffer: int = 512, shuffle: bool = True,
                 rank: int = 0, world: int = 1, num_workers: int | None = None):
        shards.check_variant(variant)  # original, masked or a derived variant (render.variants)
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: expected >= 1 (and DataLoader(..., batch_size=None))")
        self.shards, self.variant, self.batch_size = shards, variant, batch_size
        self.seed, self.shuffle, self.buffer = seed, shuffle, shuffle_buffer
        self.rank, self.world = rank, world
        self.blocks = list(shards.blocks(block_rows))
        self.sizes = [len(b[3]) for b in self.blocks]
        self.targets = torch.from_numpy(shards.targets())
        self.epoch = 0
        self.resume_batches = 0
        self.consumed = 0  # batches of this epoch handed to the training loop (``consume``), resumed ones included
        self.num_workers = None if num_workers is None else max(1, int(num_workers))

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.consumed = self.resume_batches = 0
        self.epoch = epoch

    def consume(self, loader):
        """Yield the batches of ``loader`` (a DataLoader over this stream, or the stream itself) and count
        each one as the training loop takes it, in the main process: DataLoader workers iterate their
        own copies, so only the consumer knows what was used. ``state_dict()`` saves that count."""
        self.consumed = self.resume_batches
        for batch in loader:
            self.consumed += 1
            yield batch

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        """What ``load_state_dict`` needs to resume mid-epoch: the epoch and the batches consumed in it
        (counted by ``consume``; pass ``batches_consumed`` when counting yourself)."""
        done = self.consumed if batches_consumed is None else batches_consumed
        return {"epoch": self.epoch, "batches_consumed": int(done), "seed": self.seed,
                "world": self.world, "num_workers": self.num_workers or 1, "batch_size": self.batch_size,
                "rows": len(self.shards)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict(0)
        for key in ("seed", "world", "num_workers", "batch_size", "rows"):
            if state[key] != mine[key]:
                raise ValueError(f"stream state: {key} was {state[key]}, now {mine[key]}; a resumed run must "
                                 f"keep it to see the same batches")
        self.epoch = state["epoch"]
        self.resume_batches = self.consumed = state["batches_consumed"]

    def _worker_batches(self, n_workers: int) -> list[int]:
        """Batches each of this rank's workers yields in the current epoch."""
        per = batches_per_consumer(self.sizes, seed=self.seed, epoch=self.epoch,
                                   n_consumers=self.world * n_workers, batch_size=self.batch_size,
                                   shuffle=self.shuffle)
        return per[self.rank * n_workers:(self.rank + 1) * n_workers]

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (all its workers together)."""
        if self.num_workers is None:
            raise TypeError("ShardStream(num_workers=None) learns the worker count when iteration starts; pass "
                            "num_workers= (the DataLoader's) to know the number of batches in advance")
        return sum(self._worker_batches(self.num_workers))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if self.num_workers is not None and n_workers != self.num_workers:
            raise RuntimeError(f"ShardStream(num_workers={self.num_workers}) but the DataLoader runs "
                               f"{n_workers} workers; pass the loader's num_workers (or None to learn it)")
        n_consumers = self.world * n_workers
        skips, start = skip_per_worker(self._worker_batches(n_workers), self.resume_batches)
        worker = (physical + start) % n_workers
        consumer = self.rank * n_workers + worker
        order = consumer_order(self.sizes, seed=self.seed, epoch=self.epoch, consumer=consumer,
                               n_consumers=n_consumers, buffer=self.buffer, shuffle=self.shuffle)
        skip = skips[worker] * self.batch_size
        todo = order[skip:]
        remaining: dict[int, int] = {}
        for b, _ in todo:
            remaining[b] = remaining.get(b, 0) + 1
        loaded: dict[int, np.ndarray | None] = {}
        skipped = 0
        for start in range(0, len(todo), self.batch_size):
            pairs = todo[start:start + self.batch_size]
            for b in dict.fromkeys(b for b, _ in pairs):
                if b not in loaded:
                    loaded[b] = self._read_block(b)
                    if loaded[b] is None:
                        skipped += remaining[b]
            good = [(b, r) for b, r in pairs if loaded[b] is not None]
            if good:
                yield self._batch(good, loaded, skipped, in_worker=info is not None)
            for b, _ in pairs:
                remaining[b] -= 1
                if remaining[b] == 0:
                    del loaded[b]

    def _read_block(self, b: int):
        shard, start, stop, _ = self.blocks[b]
        try:
            return self.shards.view(shard, self.variant)[start:stop]  # memory-mapped: no copy here
        except (OSError, KeyError, ValueError) as exc:
            log.warning("stream: skipping rows %d-%d of %s: unreadable (%s)", start, stop, shard, exc)
            return None

    def _batch(self, pairs, loaded, skipped, in_worker: bool):
        """Assemble a batch with one gather per block, straight into the output tensor (in shared
        memory inside a DataLoader worker, so handing it over copies nothing more)."""
        shape = (len(pairs), *loaded[pairs[0][0]].shape[1:])
        if in_worker:
            pixels = torch.empty(shape, dtype=torch.uint8).share_memory_()
            out = pixels.numpy()
        else:  # numpy's allocator reuses freed heap memory: no fresh page faults per batch
            out = np.empty(shape, np.uint8)
            pixels = torch.from_numpy(out)
        blocks = np.array([b for b, _ in pairs])
        rows = np.array([r for _, r in pairs])
        pos = np.empty(len(pairs), np.int64)
        for b in np.unique(blocks):
            sel = np.flatnonzero(blocks == b)
            out[sel] = loaded[b][rows[sel]]
            pos[sel] = self.blocks[b][3][rows[sel]]
        index = torch.from_numpy(pos)
        return {"pixels": pixels, "targets": self.targets[index], "index": index, "skipped": skipped}


class ShardMapDataset(torch.utils.data.Dataset):
    """Map-style view, one image per item, for evaluation and small jobs (ShardStream for training).

    Items are dicts like ShardStream's batches, for one image: ``pixels`` (H, W) or (H, W, 3) uint8,
    ``targets`` (K,) float32, ``index`` (its position); a DataLoader's default collation turns them
    into the same batches ShardStream yields (without ``skipped``)."""

    def __init__(self, shards: ShardSet, variant: str = "original"):
        shards.check_variant(variant)  # original, masked or a derived variant (render.variants)
        self.shards, self.variant = shards, variant
        self.targets = torch.from_numpy(shards.targets())

    def __len__(self):
        return len(self.shards)

    def __getitem__(self, i):
        row = self.shards.index.iloc[int(i)]
        pixels = self.shards.read(row["shard"], self.variant, int(row["row"]), int(row["row"]) + 1)[0]
        return {"pixels": torch.from_numpy(pixels), "targets": self.targets[int(i)], "index": int(i)}


def ordered_runs(shards: ShardSet, batch_size: int, block_rows: int) -> list[tuple[int, tuple]]:
    """The split in index order as (block number, (shard, start, stop, positions)) runs of at most
    ``batch_size`` rows; a block is at most ``block_rows`` contiguous rows of one shard."""
    runs = []
    for b, (shard, start, stop, pos) in enumerate(shards.blocks(block_rows)):
        for s in range(start, stop, batch_size):
            t = min(s + batch_size, stop)
            runs.append((b, (shard, s, t, pos[s - start:t - start])))
    return runs


class OrderedRuns(torch.utils.data.Dataset):
    """One item = one run of ``ordered_runs``: a bulk HDF5 read of contiguous rows (uint8 pixels,
    index positions), so that a DataLoader item is one batch."""

    def __init__(self, shards: ShardSet, variant: str, runs: list[tuple]):
        shards.check_variant(variant)  # original, masked or a derived variant (render.variants)
        self.shards, self.variant, self.runs = shards, variant, runs

    def __len__(self):
        return len(self.runs)

    def __getitem__(self, i):
        shard, start, stop, positions = self.runs[i]
        pixels = self.shards.read(shard, self.variant, start, stop)
        return torch.from_numpy(np.ascontiguousarray(pixels)), torch.from_numpy(np.array(positions))


def _one_thread(_):
    torch.set_num_threads(1)  # DataLoader workers: two cores thrash otherwise


def ordered_loader(shards: ShardSet, variant: str, runs: list[tuple], *, num_workers: int = 0,
                   pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``OrderedRuns`` (batches already formed, in order)."""
    return torch.utils.data.DataLoader(
        OrderedRuns(shards, variant, runs), batch_size=None, shuffle=False, num_workers=num_workers,
        pin_memory=pin_memory, worker_init_fn=_one_thread if num_workers else None,
        persistent_workers=False, prefetch_factor=4 if num_workers else None)
