"""Review of ``contrastive/samplers.py`` and ``contrastive/views.py`` against independent
references: brute-force counting, the suggested fixes of the error messages applied literally,
torch's ``DistributedSampler`` conventions and PML's ``MPerClassSampler``."""

from __future__ import annotations

import re
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from contrastive.samplers import MPerClassSampler
from contrastive.views import MultiView, collate_views


def _labels(sizes: list[int]) -> np.ndarray:
    """``sizes[c]`` items of class ``10 * c + 3`` (non-contiguous ids), shuffled."""
    labels = np.repeat(10 * np.arange(len(sizes)) + 3, sizes)
    return np.random.default_rng(0).permutation(labels)


# ------------------------------------------------------------------------------------------------
# samplers
# ------------------------------------------------------------------------------------------------


def test_dropped_small_classes_are_announced():
    """PML keeps a class smaller than m (drawn with replacement); ours drops it by default. The
    drop must be said (a warning naming the classes' count and the fix), not silent."""
    labels = _labels([12, 3, 9, 2, 8])
    with pytest.warns(UserWarning, match=r"2 classes.*small_classes='replace'"):
        s = MPerClassSampler(labels, m=4, batch_size=8)
    used = set(labels[np.concatenate(list(s))].tolist())
    assert used <= {3, 23, 43}  # the behaviour itself is unchanged
    # one-item classes are unusable even with small_classes="replace": said as well
    with pytest.warns(UserWarning, match=r"1 class"):
        MPerClassSampler(_labels([12, 1, 9]), m=4, batch_size=8, small_classes="replace")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say when every class is usable
        MPerClassSampler(_labels([12, 4, 9]), m=4, batch_size=8)
        MPerClassSampler(_labels([12, 2, 9]), m=4, batch_size=8, small_classes="replace")


def _suggested(message: str) -> dict[str, int]:
    """The ``use NAME <= VALUE`` fixes an error message suggests."""
    return {k: int(v) for k, v in re.findall(r"use (\w+) <= (-?\d+)", message)}


@pytest.mark.parametrize(
    "sizes,m,batch_size,small_classes",
    [
        ([9, 3, 3], 4, 8, "drop"),  # one class reaches m: "batch_size <= 4" is below 2 * m
        ([9, 1, 1], 2, 4, "replace"),  # "batch_size <= 2" is below 2 * m
        ([1, 1, 1, 1], 2, 4, "replace"),  # "batch_size <= 0"
        ([9, 5, 2], 7, 14, "drop"),  # "m <= 9": only one class has 9 items
        ([9, 5, 4, 6], 3, 15, "drop"),  # 4 usable classes < P = 5: batch_size <= 12 works
        ([9, 12, 5], 20, 40, "drop"),  # m above every class: "m <= 12" leaves one class
    ],
)
def test_error_suggestions_are_valid_fixes(sizes, m, batch_size, small_classes):
    """Reference: apply each fix the message suggests (a smaller ``m`` keeps the P classes per
    batch), the sampler must then build."""
    labels = _labels(sizes)
    with pytest.raises(ValueError) as info:
        MPerClassSampler(labels, m=m, batch_size=batch_size, small_classes=small_classes)
    fixes = _suggested(str(info.value))
    assert fixes, f"no concrete fix in {info.value}"
    for name, value in fixes.items():
        kwargs = dict(m=m, batch_size=batch_size, small_classes=small_classes)
        kwargs[name] = value
        if name == "m":
            kwargs["batch_size"] = batch_size // m * value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            MPerClassSampler(labels, **kwargs)  # the suggested fix works


def test_num_replicas_without_rank_is_an_error_without_process_group():
    """``DistributedSampler(ds, num_replicas=2)`` without a process group raises (it cannot know
    the rank); silently taking rank 0 on every process gives every rank the same share."""
    assert not torch.distributed.is_initialized()
    labels = _labels([8] * 6)
    with pytest.raises(ValueError, match="rank"):
        MPerClassSampler(labels, m=2, batch_size=8, num_replicas=2)
    with pytest.raises(ValueError, match="num_replicas"):
        MPerClassSampler(labels, m=2, batch_size=8, rank=1)
    # explicit and complete, or a single process: fine
    assert MPerClassSampler(labels, m=2, batch_size=8, num_replicas=1).rank == 0
    assert MPerClassSampler(labels, m=2, batch_size=8, num_replicas=2, rank=1).rank == 1


def test_object_array_of_integer_labels():
    """An object array of Python ints (e.g. a pandas column) is valid integer labels: the same
    batches as the int64 array."""
    labels = _labels([6, 7, 8, 5])
    ref = list(MPerClassSampler(labels, m=2, batch_size=4, seed=1))
    obj = np.array(labels.tolist(), dtype=object)
    assert list(MPerClassSampler(obj, m=2, batch_size=4, seed=1)) == ref
    with pytest.raises(TypeError, match="integer"):
        MPerClassSampler(np.array(["a", "b", "a", "b"], dtype=object), m=1, batch_size=2)


def test_brute_force_epochs_all_ranks():
    """Brute force over many epochs and world sizes: every rank yields len() batches of its
    share, the shares are disjoint and add up to P x m batches, epochs differ and items of a class
    are used equally often."""
    labels = _labels([11, 6, 9, 4, 13, 7])
    m, p = 3, 4
    counts: Counter = Counter()
    firsts = set()
    for epoch in range(60):
        for world in (1, 2, 3, 4, 6):
            shares = []
            for r in range(world):
                s = MPerClassSampler(labels, m, p * m, seed=2, num_replicas=world, rank=r)
                s.set_epoch(epoch)
                shares.append(list(s))
                assert len(shares[-1]) == len(s)
            for k in range(len(shares[0])):
                batch = sum((sh[k] for sh in shares), [])
                ys = Counter(labels[batch].tolist())
                assert len(batch) == len(set(batch)) == p * m
                assert len(ys) == p and set(ys.values()) == {m}
            if world == 1:
                counts.update(sum(shares[0], []))
                firsts.add(tuple(shares[0][0]))
    assert len(firsts) > 50  # set_epoch changes the order
    for c in np.unique(labels):
        freq = np.array([counts[i] for i in np.flatnonzero(labels == c)])
        assert freq.max() - freq.min() <= 0.35 * freq.mean() + 3


# ------------------------------------------------------------------------------------------------
# views
# ------------------------------------------------------------------------------------------------


class _Tagging:
    """Deterministic 'augmentation': the input plus a running call number."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.as_tensor(x, dtype=torch.float32) + 1000.0 * self.calls


def test_multiview_of_an_unlabelled_dataset():
    """A dataset whose items are the inputs themselves (a tensor or array of rows, the usual
    unlabelled self-supervised set) must give views of the whole row, not of its first entry."""
    rows = torch.arange(12.0).reshape(3, 4)
    mv = MultiView(rows, _Tagging(), n_views=2)
    views, i = mv[1]
    assert i == 1 and views.shape == (2, 4)
    assert torch.equal(views[0] % 1000, rows[1]) and torch.equal(views[1] % 1000, rows[1])
    v, _ = MultiView(rows.numpy(), lambda x: x, n_views=3)[2]
    assert torch.equal(v, rows[2].expand(3, 4))
    with pytest.raises(TypeError, match="label"):
        _ = MultiView(rows, _Tagging()).class_labels  # no labels to read: say so


def test_multiview_numpy_integer_n_views():
    """``n_views`` from a numpy config value (np.int64(3)) is a valid integer."""
    ds = [(torch.zeros(2), 0), (torch.ones(2), 1)]
    mv = MultiView(ds, lambda x: x, n_views=np.int64(3))
    x, ids = collate_views([mv[0], mv[1]])
    assert x.shape == (6, 2) and ids.tolist() == [0, 1, 0, 1, 0, 1]


def test_one_chunk_per_class_epochs_are_uniform_partitions():
    """Instance ids with m = 1 (SimCLR-style batches): no class has more than one chunk, so an
    epoch is a uniformly random partition of the items into batches of p, drawn as a
    permutation (linear time; the round-by-round loop was quadratic in the number of items).
    Every item once per epoch, each batch p distinct items, and over many epochs each item
    lands in each batch slot about equally often."""
    from contrastive.samplers import epoch_batches

    n, p = 24, 6
    groups = [np.array([i]) for i in range(n)]
    slot_of_item0 = np.zeros(n // p, dtype=np.int64)
    for epoch in range(600):
        batches = epoch_batches(groups, 1, p, seed=3, epoch=epoch)
        assert len(batches) == n // p and all(b.size == p for b in batches)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(n))
        slot_of_item0[[i for i, b in enumerate(batches) if 0 in b][0]] += 1
    # 600 draws over 4 equally likely batches: 150 each, binomial sd ~10.6
    assert np.all(np.abs(slot_of_item0 - 150) < 50), slot_of_item0
    assert not np.array_equal(np.concatenate(epoch_batches(groups, 1, p, 3, 0)),
                              np.concatenate(epoch_batches(groups, 1, p, 3, 1)))
    # a surplus item is dropped with drop_last (25 items, batches of 6: 4 batches)
    groups = [np.array([i]) for i in range(25)]
    batches = epoch_batches(groups, 1, p, seed=0, epoch=0)
    assert len(batches) == 4 and len(np.unique(np.concatenate(batches))) == 24


def test_pml_call_shape_cannot_set_the_seed_silently():
    """PML's ``MPerClassSampler(labels, m, batch_size, length_before_new_iter)``: its fourth
    argument must not become our seed; the keyword is refused with what to do instead."""
    from contrastive.samplers import MPerClassSampler

    labels = np.repeat(np.arange(6), 4)
    with pytest.raises(TypeError):
        MPerClassSampler(labels, 2, 8, 100000)
    with pytest.raises(ValueError, match="length_before_new_iter is pytorch-metric-learning's"):
        MPerClassSampler(labels, 2, 8, length_before_new_iter=100000)
    assert len(MPerClassSampler(labels, 2, 8, seed=1)) == 3
