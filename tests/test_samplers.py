"""MPerClassSampler: batch composition, epoch coverage, determinism, ranks, errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from contrastive.samplers import MPerClassSampler, max_full_batches

# these tests build small classes on purpose; the warning that announces them is asserted in
# tests/test_samplers_views_review.py
pytestmark = pytest.mark.filterwarnings("ignore:MPerClassSampler.*left out:UserWarning")


def make_labels(sizes, seed=0):
    """Labels with ``sizes[c]`` items of class ``10 * c + 3`` (non-contiguous ids), shuffled."""
    labels = np.repeat(10 * np.arange(len(sizes)) + 3, sizes)
    return np.random.default_rng(seed).permutation(labels)


def greedy_rounds(counts, p):
    """Reference for the epoch length: repeatedly seat the p classes with the most chunks left
    (largest-first is optimal for "p distinct classes per round")."""
    counts = [c for c in counts if c > 0]
    rounds = 0
    while len([c for c in counts if c > 0]) >= p:
        counts.sort(reverse=True)
        for i in range(p):
            counts[i] -= 1
        rounds += 1
    return rounds


def check_batch(batch, labels, m, p):
    """P distinct classes, m items each, each class's items contiguous."""
    assert len(batch) == p * m
    ys = labels[np.asarray(batch)]
    assert Counter(ys.tolist()) == dict.fromkeys(set(ys.tolist()), m)
    assert len(set(ys.tolist())) == p
    for j in range(p):
        assert len(set(ys[j * m : (j + 1) * m].tolist())) == 1


def test_balanced_epoch_uses_every_item_exactly_once():
    labels = make_labels([12] * 8)
    s = MPerClassSampler(labels, m=4, batch_size=16)
    batches = list(s)
    assert len(batches) == len(s) == 6  # 8 classes x 3 chunks / 4 classes per batch
    for b in batches:
        check_batch(b, labels, 4, 4)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(96))


def test_unbalanced_epoch_length_matches_reference_and_no_repeats():
    labels = make_labels([50, 3, 9, 9, 4, 17, 2, 8])
    s = MPerClassSampler(labels, m=4, batch_size=12)
    usable_sizes = [50, 9, 9, 4, 17, 8]  # classes of 2 and 3 items are dropped (m=4)
    expected = greedy_rounds([n // 4 for n in usable_sizes], 3)
    assert len(s) == expected == max_full_batches(np.array([n // 4 for n in usable_sizes]), 3)
    batches = list(s)
    assert len(batches) == expected
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == flat.size
    dropped = set(np.flatnonzero(np.isin(labels, [13, 63])).tolist())
    assert not dropped & set(flat.tolist())
    for b in batches:
        check_batch(b, labels, 4, 3)


def test_determinism_and_epochs():
    labels = make_labels([7, 9, 11, 13, 6, 8])
    a = MPerClassSampler(labels, m=2, batch_size=8, seed=3)
    b = MPerClassSampler(labels, m=2, batch_size=8, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(a) != first
    assert list(a) == list(a)  # iterating is pure
    c = MPerClassSampler(labels, m=2, batch_size=8, seed=4)
    assert list(c) != first
    assert len(a) == len(c)  # the length does not depend on seed or epoch


def test_epochs_mix_class_pairings():
    labels = make_labels([4] * 20)
    s = MPerClassSampler(labels, m=2, batch_size=8)
    pairs = set()
    for epoch in range(10):
        s.set_epoch(epoch)
        for batch in s:
            classes = sorted(set(labels[batch].tolist()))
            pairs |= {(x, y) for x in classes for y in classes if x < y}
    # 10 epochs x 10 batches x 6 pairs = 600 draws from 190 pairs: a fixed schedule gives <= 60
    assert len(pairs) > 150


@pytest.mark.parametrize(
    "num_replicas,m,batch_size", [(2, 4, 16), (4, 2, 8), (4, 4, 8), (3, 2, 12), (2, 3, 12)]
)
def test_ranks_partition_the_global_batch(num_replicas, m, batch_size):
    labels = make_labels([9, 12, 5, 8, 10, 7, 6])
    single = list(MPerClassSampler(labels, m=m, batch_size=batch_size, seed=5))
    per_rank = [
        list(MPerClassSampler(labels, m, batch_size, seed=5, num_replicas=num_replicas, rank=r))
        for r in range(num_replicas)
    ]
    share = batch_size // num_replicas
    for k, batch in enumerate(single):
        parts = [per_rank[r][k] for r in range(num_replicas)]
        assert all(len(p) == share for p in parts)
        assert sum(parts, []) == batch
        assert len(set(sum(parts, []))) == batch_size  # disjoint
        if share % m == 0:  # classes whole on a rank
            rank_classes = [set(labels[p].tolist()) for p in parts]
            for i in range(num_replicas):
                for j in range(i + 1, num_replicas):
                    assert not rank_classes[i] & rank_classes[j]
    assert all(len(r) == len(single) for r in per_rank)


def test_world_read_from_process_group(monkeypatch):
    labels = make_labels([8] * 6)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    s = MPerClassSampler(labels, m=2, batch_size=8)
    assert (s.num_replicas, s.rank, s.local_batch_size) == (2, 1, 4)
    full = MPerClassSampler(labels, m=2, batch_size=8, num_replicas=1, rank=0)
    assert [b[4:] for b in full] == list(s)


def test_drop_last_false_covers_every_item():
    sizes = [30, 5, 7, 4, 9, 2]
    labels = make_labels(sizes)
    s = MPerClassSampler(labels, m=3, batch_size=9, drop_last=False)
    batches = list(s)
    chunks = [-(-n // 3) for n in sizes if n >= 3]
    assert len(batches) == len(s) == max(-(-sum(chunks) // 3), max(chunks))
    for b in batches:
        check_batch(b, labels, 3, 3)
        assert len(set(b)) == 9  # classes with >= m items never repeat inside a batch
    usable = np.flatnonzero(labels != 53)  # the class of 2 items is dropped
    assert set(np.concatenate(batches).tolist()) == set(usable.tolist())


def test_small_classes_replace():
    labels = make_labels([2, 3, 8, 1, 6])
    s = MPerClassSampler(labels, m=4, batch_size=8, small_classes="replace")
    seen = Counter()
    for epoch in range(5):
        s.set_epoch(epoch)
        for b in s:
            check_batch(b, labels, 4, 2)
            for c in set(labels[b].tolist()):
                items = [i for i in b if labels[i] == c]
                n = int((labels == c).sum())
                if n < 4:  # every item of a small class, the rest drawn again
                    assert set(items) == set(np.flatnonzero(labels == c).tolist())
                else:
                    assert len(set(items)) == 4
                seen[c] += 1
    assert 33 not in seen  # one item: never usable
    assert {3, 13, 23, 43} <= set(seen)
    with pytest.raises(ValueError, match="only 2 classes"):
        MPerClassSampler(labels, m=4, batch_size=12)  # drop mode: 2 usable classes < P = 3
    with pytest.raises(ValueError, match="larger than every class"):
        MPerClassSampler(labels, m=9, batch_size=18)
    assert len(MPerClassSampler(labels, m=9, batch_size=18, small_classes="replace")) == 2


def test_small_classes_drop_needs_enough_classes():
    labels = make_labels([2, 3, 8, 1, 6])
    s = MPerClassSampler(labels, m=3, batch_size=6)
    assert set(labels[np.concatenate(list(s))].tolist()) <= {13, 23, 43}


def test_state_dict_and_mid_epoch_resume():
    labels = make_labels([10, 11, 12, 9, 8])
    s = MPerClassSampler(labels, m=2, batch_size=6, seed=7)
    s.set_epoch(3)
    full = list(s)
    state = s.state_dict()
    assert state == {"epoch": 3, "seed": 7}
    t = MPerClassSampler(labels, m=2, batch_size=6, seed=0)
    t.load_state_dict(state)
    assert list(t) == full
    t.load_state_dict({"epoch": 3, "seed": 7, "start_batch": 4})
    assert len(t) == len(full) - 4 and list(t) == full[4:]
    assert t.state_dict()["start_batch"] == 4
    t.set_epoch(4)
    assert len(t) == len(full)
    with pytest.raises(ValueError, match="seed"):
        t.load_state_dict({"epoch": 1})
    with pytest.raises(ValueError, match="start_batch"):
        t.set_epoch(0, start_batch=len(full) + 1)


def test_dataloader_with_digits():
    from contrastive.datasets import get_dataset

    ds = get_dataset("digits", split="train")
    s = MPerClassSampler(ds.labels, m=4, batch_size=32)
    loader = DataLoader(ds, batch_sampler=s)
    assert len(loader) == len(s)
    x, y = next(iter(loader))
    assert x.shape == (32, 64)
    counts = torch.bincount(y, minlength=10)
    assert sorted(counts[counts > 0].tolist()) == [4] * 8


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(m=3, batch_size=16), "batch_size"),
        (dict(m=0, batch_size=16), "m"),
        (dict(m=2, batch_size=-4), "batch_size"),
        (dict(m=4, batch_size=4), "batch_size"),  # one class per batch
        (dict(m=2, batch_size=16, num_replicas=3, rank=0), "num_replicas"),
        (dict(m=2, batch_size=16, num_replicas=2, rank=2), "rank"),
        (dict(m=20, batch_size=40), "m"),  # m larger than every class
        (dict(m=4, batch_size=24), "batch_size"),  # P = 6 > 5 usable classes
        (dict(m=2, batch_size=8, seed=-1), "seed"),
        (dict(m=2, batch_size=8, small_classes="pad"), "small_classes"),
    ],
)
def test_errors_name_the_argument(kwargs, name):
    labels = make_labels([9, 12, 5, 8, 10])
    with pytest.raises(ValueError, match=name):
        MPerClassSampler(labels, **kwargs)


def test_label_errors():
    with pytest.raises(ValueError, match="at least two"):
        MPerClassSampler([1, 1, 1, 1], m=2, batch_size=4)
    with pytest.raises(ValueError, match="labels"):
        MPerClassSampler(np.zeros((3, 2), dtype=int), m=2, batch_size=4)
    with pytest.raises(ValueError, match="labels"):
        MPerClassSampler([], m=2, batch_size=4)
    with pytest.raises(ValueError, match="integer"):
        MPerClassSampler([0.5, 1.0, 2.0], m=1, batch_size=2)
    with pytest.raises(TypeError, match="integer"):
        MPerClassSampler(["a", "b"], m=1, batch_size=2)
    s = MPerClassSampler(torch.tensor([0, 0, 1, 1, 2, 2]), m=2, batch_size=4)
    assert len(s) == 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 25), min_size=2, max_size=12),
    m=st.integers(1, 4),
    p=st.integers(2, 5),
    replicas=st.sampled_from([1, 2]),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_invariants_over_random_label_distributions(sizes, m, p, replicas, drop_last, seed):
    labels = make_labels(sizes, seed)
    usable = [n for n in sizes if n >= m]
    if len(usable) < p or (p * m) % replicas:
        with pytest.raises(ValueError):
            MPerClassSampler(labels, m, p * m, seed=seed, num_replicas=replicas, rank=0,
                             drop_last=drop_last)
        return
    single = MPerClassSampler(labels, m, p * m, seed=seed, drop_last=drop_last)
    batches = list(single)
    assert len(batches) == len(single)
    for b in batches:
        check_batch(b, labels, m, p)
        assert len(set(b)) == p * m
    flat = np.concatenate(batches) if batches else np.array([], dtype=int)
    if drop_last:
        assert len(batches) == greedy_rounds([n // m for n in usable], p)
        assert len(set(flat.tolist())) == flat.size  # no repeats within the epoch
    else:
        usable_items = np.flatnonzero(np.isin(labels, [10 * c + 3 for c, n in enumerate(sizes)
                                                       if n >= m]))
        assert set(flat.tolist()) == set(usable_items.tolist())
    shares = [
        list(MPerClassSampler(labels, m, p * m, seed=seed, num_replicas=replicas, rank=r,
                                 drop_last=drop_last))
        for r in range(replicas)
    ]
    assert [sum((s[k] for s in shares), []) for k in range(len(batches))] == batches
