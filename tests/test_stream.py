import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from radacx_cache import open_shards
from radacx_cache.augment import augment
from radacx_cache.formats.stream import ShardStream, consumer_order, skip_per_worker


def test_every_row_exactly_once_across_consumers_pure():
    sizes = [64, 64, 64, 17, 64, 5, 64]  # uneven blocks and an uneven block count
    for n in (1, 2, 3, 4):
        rows = []
        for c in range(n):
            rows += consumer_order(sizes, seed=1, epoch=2, consumer=c, n_consumers=n, buffer=50)
        assert sorted(rows) == sorted((b, r) for b, s in enumerate(sizes) for r in range(s))
    a = consumer_order(sizes, seed=1, epoch=2, consumer=0, n_consumers=2, buffer=50)
    assert a == consumer_order(sizes, seed=1, epoch=2, consumer=0, n_consumers=2, buffer=50)
    assert a != consumer_order(sizes, seed=1, epoch=3, consumer=0, n_consumers=2, buffer=50)


def test_skip_per_worker_follows_dataloader_round_robin():
    assert skip_per_worker([3, 1], 3) == ([2, 1], 0)
    assert skip_per_worker([3, 1], 4) == ([3, 1], 1)
    assert skip_per_worker([2, 2, 2], 4) == ([2, 1, 1], 1)


def collect(stream, workers):
    stream.num_workers = max(1, workers)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [b["index"].tolist() for b in loader]


def test_two_workers_times_two_ranks_see_each_row_once(pipeline):
    train = open_shards(Path(pipeline["cfg"].workdir) / "shards").split("train")
    seen = []
    for rank in (0, 1):
        stream = ShardStream(train, "original", 16, seed=3, block_rows=32, shuffle_buffer=64, rank=rank, world=2)
        batches = collect(stream, 2)
        assert len(batches) == len(stream)
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(len(train)))


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(pipeline):
    train = open_shards(Path(pipeline["cfg"].workdir) / "shards").split("train")
    make = lambda: ShardStream(train, "masked", 16, seed=5, block_rows=32, shuffle_buffer=64)
    full = make()
    full.set_epoch(1)
    everything = collect(full, 2)
    first = make()
    first.set_epoch(1)
    first.num_workers = 2
    state = first.state_dict(batches_consumed=7)
    resumed = make()
    resumed.num_workers = 2
    resumed.load_state_dict(state)
    assert collect(resumed, 2) == everything[7:]
    other = make()
    other.num_workers = 1
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)


def test_batches_carry_pixels_and_targets_in_order(pipeline):
    shards = open_shards(Path(pipeline["cfg"].workdir) / "shards")
    test = shards.split("test")
    stream = ShardStream(test, "masked", 8, shuffle=False, block_rows=32)
    batch = next(iter(stream))
    assert batch["pixels"].dtype == torch.uint8 and tuple(batch["pixels"].shape) == (8, 224, 224, 3)
    first = test[0]
    np.testing.assert_array_equal(batch["pixels"][0].numpy(), first["masked"])
    np.testing.assert_array_equal(batch["targets"][0].numpy(), first["targets"])


def test_unreadable_shard_is_skipped_and_counted(pipeline, tmp_path):
    src = Path(pipeline["cfg"].workdir) / "shards"
    shutil.copytree(src, tmp_path / "shards")
    shards = open_shards(tmp_path / "shards").split("train")
    victim = sorted((tmp_path / "shards").glob("train-*.h5"))[0]
    victim.write_bytes(b"not hdf5 any more")
    stream = ShardStream(shards, "original", 16, seed=0, block_rows=32)
    batches = list(stream)
    lost = int((shards.index["shard"] == victim.name).sum())
    assert sum(len(b["index"]) for b in batches) == len(shards) - lost
    assert batches[-1]["skipped"] == lost


def test_augment_is_small_and_deterministic():
    ramp = torch.linspace(0, 1, 64)
    x = (ramp.view(1, 1, 64, 1) * ramp.view(1, 1, 1, 64)).expand(4, 3, 64, 64).contiguous()
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert 0 < (a - x).abs().mean() < 0.1


def test_every_setting_in_the_constructor_and_the_worker_count_learnt(pipeline):
    """``ShardStream(train, "masked")`` works with defaults; with ``num_workers=None`` it learns the
    loader's worker count and yields exactly what ``num_workers=2`` yields; a wrong count is refused."""
    train = open_shards(Path(pipeline["cfg"].workdir) / "shards").split("train")
    learnt = ShardStream(train, "masked", 16, seed=4, block_rows=32)
    assert learnt.batch_size == 16 and ShardStream(train, "masked").batch_size == 32
    with pytest.raises(TypeError, match="num_workers"):
        len(learnt)
    told = ShardStream(train, "masked", 16, seed=4, block_rows=32, num_workers=2)
    loader = lambda s: [b["index"].tolist() for b in torch.utils.data.DataLoader(s, batch_size=None, num_workers=2)]
    assert loader(learnt) == loader(told) and len(told) == len(loader(told))
    wrong = ShardStream(train, "masked", 16, num_workers=3)
    with pytest.raises(RuntimeError, match="the DataLoader runs 2 workers"):
        loader(wrong)


def test_the_stream_counts_the_batches_its_consumer_took(pipeline):
    """``state_dict()`` with no argument: ``consume`` counted the batches the loop took in the main
    process (DataLoader workers iterate copies of the stream), so a resume yields exactly the rest."""
    import itertools
    train = open_shards(Path(pipeline["cfg"].workdir) / "shards").split("train")
    make = lambda: ShardStream(train, "original", 16, seed=5, block_rows=32, shuffle_buffer=64, num_workers=2)
    everything = collect(make(), 2)
    first = make()
    loader = torch.utils.data.DataLoader(first, batch_size=None, num_workers=2)
    taken = [b["index"].tolist() for b in itertools.islice(first.consume(loader), 5)]
    assert taken == everything[:5] and first.state_dict()["batches_consumed"] == 5
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    loader = torch.utils.data.DataLoader(resumed, batch_size=None, num_workers=2)
    rest = [b["index"].tolist() for b in resumed.consume(loader)]
    assert rest == everything[5:] and resumed.state_dict()["batches_consumed"] == len(everything)
    resumed.set_epoch(1)  # a new epoch starts from its first batch
    assert resumed.state_dict()["batches_consumed"] == 0
