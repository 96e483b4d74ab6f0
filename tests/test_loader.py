"""The training loader (data/loader.py): deterministic per seed, a new order each epoch, an exact resume at any
sample index, ranks that partition each global batch, the same batches with or without workers."""

import pytest
import torch

from diffit_cli.data import StreamBatchSampler, make_loader, open_source


class _Index(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i), torch.tensor(i % 3)


def _take(loader, k):
    it = iter(loader)
    return [next(it)[0].tolist() for _ in range(k)]


def test_loader_is_deterministic_and_covers_each_epoch():
    a = _take(make_loader(_Index(10), 4, seed=5, num_workers=0), 10)
    assert a == _take(make_loader(_Index(10), 4, seed=5, num_workers=0), 10)
    assert a != _take(make_loader(_Index(10), 4, seed=6, num_workers=0), 10)
    stream = sum(a, [])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new order each epoch
    assert _take(make_loader(_Index(10), 4, num_workers=0, shuffle=False), 3) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 0, 1],
    ]


def test_loader_resumes_exactly_at_start_index():
    full = _take(make_loader(_Index(13), 4, seed=1, num_workers=0), 9)
    resumed = make_loader(_Index(13), 4, seed=1, num_workers=0, start_index=12)
    assert _take(resumed, 6) == full[3:]
    assert resumed.position == 12 + 6 * 4 and resumed.state_dict() == {"position": 36}
    odd = sum(_take(make_loader(_Index(13), 4, seed=1, num_workers=0, start_index=5), 2), [])
    assert odd == sum(full, [])[5:13]
    loader = make_loader(_Index(13), 4, seed=1, num_workers=0)
    _take(loader, 2)
    assert _take(loader, 2) == full[2:4]  # iterating again continues from `position`


def test_two_ranks_partition_each_global_batch():
    whole = _take(make_loader(_Index(11), 6, seed=2, num_workers=0), 5)
    r0 = _take(make_loader(_Index(11), 6, seed=2, rank=0, world_size=2, num_workers=0), 5)
    r1 = _take(make_loader(_Index(11), 6, seed=2, rank=1, world_size=2, num_workers=0), 5)
    assert [a + b for a, b in zip(r0, r1)] == whole
    with pytest.raises(ValueError):
        StreamBatchSampler(11, 5, world_size=2)


def test_workers_give_the_same_batches(tmp_path):
    src = open_source(None, 16, synthetic_size=40)
    a = [b for _, b in zip(range(3), make_loader(src, 8, seed=0, num_workers=0))]
    b = [b for _, b in zip(range(3), make_loader(src, 8, seed=0, num_workers=2, pin_memory=False))]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.dtype == torch.uint8
    before = torch.get_rng_state()
    next(iter(make_loader(src, 8, num_workers=0)))
    assert torch.equal(before, torch.get_rng_state())  # the loader never touches the global RNG
