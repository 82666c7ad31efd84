"""Positive/negative masks and call resolution against numpy brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive.pairs import (
    check_call,
    diagonal_masks,
    label_masks,
    require_negatives,
    require_positives,
    resolve_pairs,
)
from contrastive.validation import check_labels, check_positive_int, check_temperature
from losses.modules import first_pair_per_class


def brute_masks(y, ref=None):
    y = np.asarray(y)
    r = y if ref is None else np.asarray(ref)
    pos = np.zeros((len(y), len(r)), bool)
    neg = np.zeros((len(y), len(r)), bool)
    for i in range(len(y)):
        for j in range(len(r)):
            if ref is None and i == j:
                continue
            pos[i, j] = y[i] == r[j]
            neg[i, j] = y[i] != r[j]
    return pos, neg


@pytest.mark.parametrize("labels", [[0, 1, 0, 2, 1, 1], [5], [3, 3, 3], [0, 1, 2, 3]])
def test_label_masks_self_reference(labels):
    pos, neg = label_masks(torch.tensor(labels))
    bp, bn = brute_masks(labels)
    assert pos.dtype == torch.bool and neg.dtype == torch.bool
    np.testing.assert_array_equal(pos.numpy(), bp)
    np.testing.assert_array_equal(neg.numpy(), bn)


def test_label_masks_reference_set():
    y, r = [0, 1, 0, 2], [1, 1, 0, 3, 2]
    pos, neg = label_masks(torch.tensor(y), torch.tensor(r))
    bp, bn = brute_masks(y, r)
    np.testing.assert_array_equal(pos.numpy(), bp)
    np.testing.assert_array_equal(neg.numpy(), bn)
    # the reference is the batch passed explicitly: the diagonal is a positive
    p2, _ = label_masks(torch.tensor(y), torch.tensor(y))
    assert p2.diagonal().all()


def test_diagonal_masks():
    pos, neg = diagonal_masks(4)
    np.testing.assert_array_equal(pos.numpy(), np.eye(4, dtype=bool))
    np.testing.assert_array_equal(neg.numpy(), ~np.eye(4, dtype=bool))


def test_resolve_pairs_three_call_shapes():
    x = torch.randn(6, 3)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    p = resolve_pairs(x, y)
    assert p.self_reference and p.anchors is x and p.candidates is x
    np.testing.assert_array_equal(p.positives.numpy(), brute_masks(y)[0])

    ref, ref_y = torch.randn(4, 3), torch.tensor([2, 0, 5, 0])
    p = resolve_pairs(x, y, ref, ref_y)
    assert not p.self_reference and p.candidates is ref
    np.testing.assert_array_equal(p.positives.numpy(), brute_masks(y, ref_y)[0])
    np.testing.assert_array_equal(p.negatives.numpy(), brute_masks(y, ref_y)[1])

    z = torch.randn(6, 3)
    p = resolve_pairs(x, ref_emb=z, paired=True)  # paired views
    np.testing.assert_array_equal(p.positives.numpy(), np.eye(6, dtype=bool))
    np.testing.assert_array_equal(p.negatives.numpy(), ~np.eye(6, dtype=bool))

    p = resolve_pairs(x, y, ref_emb=z, paired=True)  # paired views with labels: both sides
    np.testing.assert_array_equal(p.positives.numpy(), brute_masks(y, y)[0])

    # PML: ref_emb without ref_labels (or with the very labels tensor) takes labels[j] for row
    # j and leaves (i, i) out, exactly as loss(emb, labels)
    for ref_labels in (None, y):
        p = resolve_pairs(x, y, ref_emb=z, ref_labels=ref_labels)
        assert p.candidates is z and not p.self_reference
        np.testing.assert_array_equal(p.positives.numpy(), brute_masks(y)[0])
        np.testing.assert_array_equal(p.negatives.numpy(), brute_masks(y)[1])
    p = resolve_pairs(x, y, ref_emb=z, ref_labels=y.clone())  # a distinct tensor: kept
    np.testing.assert_array_equal(p.positives.numpy(), brute_masks(y, y)[0])


def test_check_call_converts_labels():
    x = torch.randn(4, 2)
    c = check_call(x, [0, 1, 0, 1])
    assert c.labels.dtype == torch.int64 and c.ref_emb is None
    c = check_call(x, torch.tensor([True, False, True, False]))
    assert c.labels.tolist() == [1, 0, 1, 0]
    c = check_call(x, torch.tensor([1.0, 2.0, 1.0, 2.0]))
    assert c.labels.dtype == torch.int64


def test_require_messages():
    with pytest.raises(ValueError, match=r"no positive pair, which the X needs.*MultiView"):
        require_positives(torch.zeros(3, 3, dtype=torch.bool), "the X")
    require_positives(torch.eye(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"no negative pair.*at least two classes"):
        require_negatives(torch.zeros(3, 3, dtype=torch.bool))


def test_validation_helpers():
    assert check_temperature(0.5) == 0.5
    assert check_positive_int(3, "k") == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            check_positive_int(bad, "k")
    with pytest.raises(ValueError, match="labels has 2 entries but embeddings has 3 rows"):
        check_labels(torch.tensor([0, 1]), 3)


@pytest.mark.parametrize("seed", range(5))
def test_first_pair_per_class_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 6, (20,), generator=gen)
    a, p = first_pair_per_class(y)
    ref_a, ref_p = [], []
    for c in sorted(set(y.tolist())):
        where = [i for i, v in enumerate(y.tolist()) if v == c]
        if len(where) >= 2:
            ref_a.append(where[0])
            ref_p.append(where[1])
    assert a.tolist() == ref_a and p.tolist() == ref_p
    r = torch.randint(3, 9, (15,), generator=gen)
    a, p = first_pair_per_class(y, r)
    common = sorted(set(y.tolist()) & set(r.tolist()))
    assert a.tolist() == [y.tolist().index(c) for c in common]
    assert p.tolist() == [r.tolist().index(c) for c in common]
