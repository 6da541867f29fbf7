"""Sample orders: a pure function of (seed, epoch), sharded without loss under DDP, resumable mid-epoch."""
import pytest
import torch

from training.loaders import epoch_order, loader_workers, make_loader, shard_order


class Numbers(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    first = epoch_order(11, seed=3, epoch=2)
    assert sorted(first) == list(range(11)) and first == epoch_order(11, seed=3, epoch=2)
    assert first != epoch_order(11, seed=3, epoch=3) and first != epoch_order(11, seed=4, epoch=2)


@pytest.mark.parametrize("n, world", [(7, 2), (8, 4), (5, 3)])
def test_shards_cover_the_epoch(n, world):
    training = [shard_order(n, 0, 1, rank, world) for rank in range(world)]
    assert len({len(s) for s in training}) == 1  # same number of steps on every rank
    assert set(sum(training, [])) == set(range(n))


def test_a_resumed_loader_takes_the_batches_an_unbroken_one_had_left():
    full = [b.tolist() for b in make_loader(Numbers(10), 3, seed=5, epoch=2)]
    resumed = [b.tolist() for b in make_loader(Numbers(10), 3, seed=5, epoch=2, skip_batches=2)]
    assert resumed == full[2:] and sorted(sum(full, [])) == list(range(10))
    with pytest.raises(TypeError):
        make_loader(Numbers(10), 3, 0)  # everything after the batch size is a keyword


def test_loader_workers_default_to_none_on_cpu():
    assert loader_workers(-1, torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cpu")) == 3
    assert 1 <= loader_workers(-1, torch.device("cuda")) <= 4
