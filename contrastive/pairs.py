"""Positive and negative masks: how labels, multi-view instance ids and paired views become the
one lingua franca of the library, ``(scores [N, M], positives [N, M], negatives [N, M])``.

The call shapes follow pytorch-metric-learning (PML) 2.x, ``loss(embeddings, labels=None,
indices_tuple=None, ref_emb=None, ref_labels=None)``:

* ``loss(emb, labels)``: candidates are the batch itself; ``P_ij = y_i == y_j`` and
  ``Q_ij = y_i != y_j`` for ``i != j``; the diagonal (an item with itself) is neither.
  Self-supervised views are the same call with instance ids as labels.
* ``loss(emb, labels, ref_emb=r, ref_labels=ry)``: candidates are a separate reference set;
  ``P_ij = y_i == ry_j``; nothing is excluded.
* ``loss(emb, labels, ref_emb=r)`` (no ``ref_labels``, or ``ref_labels`` the very same tensor
  object as ``labels``): PML's rule -- reference row ``j`` carries ``labels[j]`` and the pair
  ``(i, i)`` is excluded, exactly as in ``loss(emb, labels)``; ``r`` needs as many rows.
* ``loss(x_emb, ref_emb=y_emb, paired=True)``: paired views ``(x_i, y_i)`` from two encoders;
  positives on the diagonal, every other pair negative. With ``labels`` the positives are
  ``y_i == y_j`` including the diagonal. (PML has no such call: without labels it raises.)

Mining lives here too, in one place: a pytorch-metric-learning miner's ``indices_tuple`` --
``(a1, p, a2, n)`` pairs or ``(a, p, n)`` triplets -- is validated by one function and becomes
restricted masks (:func:`mined_masks`), the valid triplets (:func:`mined_triplets`) or one pair
per label (:func:`first_mined_pair_per_label`, the N-pair rule). The triplet loss's own
``mining=`` modes (all / batch-hard / semi-hard) pick triplets from the masks inside
:func:`losses.functional.triplet`.

``check=False`` (every function that takes it) skips the checks that read tensor values on the
host (finite embeddings, integral float labels, index bounds), for compiled or CUDA-graph
regions; shape checks stay.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .validation import check_embeddings, check_labels


class NoPairsError(ValueError):
    """A batch that gives a loss nothing to average (no positive pair, no negative, no triplet).

    The functional core raises it; the loss modules catch the case first and, unless built with
    ``strict=True``, return a zero loss that is still part of the graph (as PML does) and issue a
    :class:`NoPairsWarning` once per loss instance.
    """


class NoPairsWarning(UserWarning):
    """Issued (once per loss instance) when a batch gave a loss no term and it returned 0."""


class Pairs(NamedTuple):
    """Anchors, candidates and the boolean masks between them. ``self_reference``: the
    candidates are the anchors themselves and the masks are :func:`label_masks` of their
    labels (so an anchor has a positive and a negative -- a triplet -- somewhere exactly when
    the batch has a positive pair and a negative pair; the one-node lane's check relies on it,
    :mod:`losses.lane`)."""

    anchors: Tensor
    candidates: Tensor
    positives: Tensor
    negatives: Tensor
    self_reference: bool


def label_masks(labels: Tensor, ref_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Positive and negative masks ``[N, M]`` from labels.

    With ``ref_labels=None`` the reference set is the batch itself and the diagonal is excluded
    from both masks (an item is not its own positive).
    """
    ref = labels if ref_labels is None else ref_labels
    same = labels[:, None] == ref  # (one view fewer than ref[None, :])
    different = torch.logical_not(same)
    if ref_labels is None:
        same.fill_diagonal_(False)
    return same, different


def diagonal_masks(n: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Masks for ``n`` paired samples: positive on the diagonal, negative elsewhere."""
    eye = torch.eye(n, dtype=torch.bool, device=device)
    return eye, ~eye


class Call(NamedTuple):
    """A validated loss call (see :func:`check_call`)."""

    embeddings: Tensor
    labels: Tensor | None
    ref_emb: Tensor | None
    ref_labels: Tensor | None
    paired: bool = False


def check_call(
    embeddings: Tensor,
    labels: Tensor | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    paired: bool = False,
    check: bool = True,
    finite: bool | None = None,
) -> Call:
    """Validate the arguments of ``loss(embeddings, labels, ref_emb=..., ref_labels=...,
    paired=...)`` without building masks: shapes, dtypes, finiteness, one label per row, and a
    call that defines positives (labels, or ``paired=True`` views). Labels come back as integer
    tensors on the embeddings' device. ``ref_labels`` that is the very tensor object ``labels``
    is dropped (PML treats that reference set as the batch's own labels, diagonal excluded).
    ``check=False`` skips the checks that read values (finiteness, integral float labels);
    ``finite=False`` skips only the embeddings' finiteness read (None: ``check``), for a caller
    whose own read of the scores stands for it (:attr:`contrastive.critics.Critic.
    propagates_nonfinite`)."""
    if ref_labels is not None and ref_labels is labels:
        ref_labels = None
    finite = check if finite is None else finite
    embeddings = check_embeddings(embeddings, "embeddings", finite)
    n = embeddings.shape[0]
    if labels is not None:
        labels = check_labels(labels, n, "labels", "embeddings", check).to(embeddings.device)
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels was given without ref_emb; pass ref_emb too")
        if paired:
            raise ValueError("paired=True needs the second view as ref_emb")
        if labels is None:
            raise ValueError(
                "no labels and no ref_emb: pass labels (class or instance ids), or paired views "
                "as loss(x, ref_emb=y, paired=True)"
            )
        return Call(embeddings, labels, None, None)
    ref_emb = check_embeddings(ref_emb, "ref_emb", finite)
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_emb has dimension {ref_emb.shape[1]} but embeddings have "
            f"{embeddings.shape[1]}; both must come from encoders with the same output size"
        )
    if paired:
        if ref_labels is not None:
            raise ValueError(
                "paired=True takes no ref_labels (the two views share labels); for a separate "
                "reference set drop paired=True"
            )
        if ref_emb.shape[0] != n:
            raise ValueError(
                f"paired views need as many ref_emb rows as embeddings rows, got "
                f"{ref_emb.shape[0]} and {n}; for a separate reference set pass ref_labels and "
                "drop paired=True"
            )
        return Call(embeddings, labels, ref_emb, None, True)
    if labels is None:
        raise ValueError(
            "ref_emb was given without labels: pass labels (and ref_labels for a separate "
            "reference set), or call loss(x, ref_emb=y, paired=True) for paired views with "
            "positives on the diagonal"
        )
    if ref_labels is not None:
        ref_labels = check_labels(ref_labels, ref_emb.shape[0], "ref_labels", "ref_emb", check)
        return Call(embeddings, labels, ref_emb, ref_labels.to(embeddings.device))
    if ref_emb.shape[0] != n:
        raise ValueError(
            f"ref_emb without ref_labels must have one row per embeddings row (row j takes "
            f"labels[j], as in pytorch-metric-learning), got {ref_emb.shape[0]} and {n}; for a "
            "separate reference set pass ref_labels too"
        )
    return Call(embeddings, labels, ref_emb, None)


def resolve_pairs(
    embeddings: Tensor,
    labels: Tensor | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    paired: bool = False,
    check: bool = True,
    finite: bool | None = None,
) -> Pairs:
    """Validate a loss call and return anchors, candidates and masks (see module docstring;
    ``finite`` as :func:`check_call`'s)."""
    c = check_call(embeddings, labels, ref_emb, ref_labels, paired, check, finite)
    if c.ref_emb is None:
        pos, neg = label_masks(c.labels)
        return Pairs(c.embeddings, c.embeddings, pos, neg, True)
    if c.ref_labels is not None:
        pos, neg = label_masks(c.labels, c.ref_labels)
    elif not c.paired:  # PML: ref row j has labels[j], (i, i) excluded
        pos, neg = label_masks(c.labels)
    elif c.labels is not None:
        pos, neg = label_masks(c.labels, c.labels)
    else:
        pos, neg = diagonal_masks(c.embeddings.shape[0], c.embeddings.device)
    return Pairs(c.embeddings, c.ref_emb, pos, neg, False)


def any_flag(mask: Tensor) -> Tensor:
    """``mask.any()`` as a 0-d tensor, read by nobody yet (no host sync): for boolean masks the
    maximum of their bytes (torch's CPU ``any`` on bool is several times slower)."""
    if mask.dtype == torch.bool and mask.numel() > 0:
        return mask.view(torch.uint8).max()
    return mask.any()


def any_true(mask: Tensor) -> bool:
    """``bool(mask.any())`` (:func:`any_flag`, read)."""
    return bool(any_flag(mask))


def rows_any(mask: Tensor) -> Tensor:
    """``mask.any(1)`` for a 2-D mask, faster for boolean masks (a ``uint8`` row maximum)."""
    if mask.dtype == torch.bool and mask.shape[0] > 0 and mask.shape[1] > 0:
        return mask.view(torch.uint8).amax(1).view(torch.bool)
    return mask.any(1)


def triplet_flag(positives: Tensor, negatives: Tensor) -> Tensor:
    """Whether some anchor has both a positive and a negative (a triplet), as a 0-d tensor (no
    sync): for boolean masks the product of the two row maxima over their bytes (fewer
    operations than ``rows_any`` twice and ``&``)."""
    if (positives.dtype == torch.bool and negatives.dtype == torch.bool
            and positives.numel() > 0 and negatives.numel() > 0):
        rows = positives.view(torch.uint8).amax(1)
        return rows.mul_(negatives.view(torch.uint8).amax(1)).max()
    return any_flag(rows_any(positives) & rows_any(negatives))


def any_triplet(positives: Tensor, negatives: Tensor) -> bool:
    """``bool(triplet_flag(positives, negatives))``."""
    return bool(triplet_flag(positives, negatives))


#: what a loss needs for a term, by name (:func:`terms_flag`, :func:`require_terms`):
#: a positive pair, a negative pair, both, either, or an anchor with both (a triplet)
TERMS = ("positives", "negatives", "both", "any", "triplet")


def terms_flag(terms: str, positives: Tensor, negatives: Tensor) -> Tensor:
    """Whether the masks give a loss that needs ``terms`` (one of :data:`TERMS`) a term, as a
    0-d tensor: one host read decides it, with other values read in the same sync
    (:func:`losses.kernels.prepare`)."""
    if terms == "positives":
        return any_flag(positives)
    if terms == "negatives":
        return any_flag(negatives)
    if terms == "both":
        return any_flag(positives) & any_flag(negatives)
    if terms == "any":
        return any_flag(positives) | any_flag(negatives)
    if terms == "triplet":
        return triplet_flag(positives, negatives)
    raise ValueError(f"terms must be one of {', '.join(map(repr, TERMS))}, got {terms!r}")


def require_terms(terms: str, positives: Tensor, negatives: Tensor, what: str) -> None:
    """Raise :class:`NoPairsError`, saying what is missing, when the masks give a loss that
    needs ``terms`` (:data:`TERMS`) no term."""
    if terms == "positives":
        require_positives(positives, what)
    elif terms == "negatives":
        require_negatives(negatives, what)
    elif terms == "both":
        require_positives(positives, what)
        require_negatives(negatives, what)
    elif terms == "any":
        require_any_pair(positives, negatives, what)
    elif terms == "triplet":
        require_triplet(positives, negatives, what)
    else:
        raise ValueError(f"terms must be one of {', '.join(map(repr, TERMS))}, got {terms!r}")


def require_positives(positives: Tensor, what: str = "this loss") -> None:
    """Raise :class:`NoPairsError` (a ``ValueError``) when no anchor has a positive."""
    if not any_true(positives):
        raise NoPairsError(
            f"the batch has no positive pair, which {what} needs: every label occurs only once. "
            "Sample several items per class (MPerClassSampler with m >= 2) or several views per "
            "instance (MultiView), or pass paired views as loss(x, ref_emb=y, paired=True)"
        )


def require_negatives(negatives: Tensor, what: str = "this loss") -> None:
    """Raise :class:`NoPairsError` (a ``ValueError``) when no anchor has a negative."""
    if not any_true(negatives):
        raise NoPairsError(
            f"the batch has no negative pair, which {what} needs: all items share one label. "
            "Sample at least two classes per batch"
        )


def require_any_pair(positives: Tensor, negatives: Tensor, what: str = "this loss") -> None:
    """Raise :class:`NoPairsError` when the masks hold no pair at all (neither a positive nor a
    negative)."""
    if not any_true(positives) and not any_true(negatives):
        raise NoPairsError(f"the batch has no pair at all, which {what} needs: pass at least two "
                           "items")


def require_triplet(positives: Tensor, negatives: Tensor, what: str = "the triplet loss") -> None:
    """Raise :class:`NoPairsError` when no anchor has both a positive and a negative."""
    require_positives(positives, what)
    require_negatives(negatives, what)
    if not any_triplet(positives, negatives):
        raise NoPairsError(
            f"no anchor has both a positive and a negative, so {what} has no triplet: check the "
            "batch labels (sample several classes with several items each, e.g. MPerClassSampler)"
        )


def _mined_indices(indices_tuple, n_rows: int, n_cols: int, device, check: bool = True):
    """A miner's ``indices_tuple`` as flat long tensors ``(a1, p, a2, n)`` (a triplet tuple
    ``(a, p, n)`` gives ``a2 = a``), its format checked and, with ``check``, its bounds."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError(
            "indices_tuple must be (anchor, positive, negative) triplets or "
            "(anchor1, positive, anchor2, negative) pairs, as pytorch-metric-learning miners "
            f"return; got {type(indices_tuple).__name__} of length "
            f"{len(indices_tuple) if hasattr(indices_tuple, '__len__') else '?'}"
        )
    idx = [torch.as_tensor(t, device=device).long().flatten() for t in indices_tuple]
    if len(idx) == 3:
        a1, p, n = idx
        a2 = a1
        if not a1.numel() == p.numel() == n.numel():
            raise ValueError(
                "indices_tuple (anchor, positive, negative) needs three tensors of one length, "
                f"got lengths {a1.numel()}, {p.numel()} and {n.numel()}; pass a miner's output "
                "unchanged"
            )
    else:
        a1, p, a2, n = idx
        if a1.numel() != p.numel() or a2.numel() != n.numel():
            raise ValueError(
                "indices_tuple (anchor1, positive, anchor2, negative) needs anchor1 and positive "
                f"of one length and anchor2 and negative of one length, got lengths "
                f"{a1.numel()}, {p.numel()}, {a2.numel()} and {n.numel()}; pass a miner's "
                "output unchanged"
            )
    if check:
        for name, t, bound in (("anchor", a1, n_rows), ("positive", p, n_cols),
                               ("anchor", a2, n_rows), ("negative", n, n_cols)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
                raise ValueError(f"indices_tuple has {name} indices outside [0, {bound})")
    return a1, p, a2, n


def mined_masks(
    indices_tuple: tuple[Tensor, ...],
    positives: Tensor,
    negatives: Tensor,
    counts: bool = False,
    check: bool = True,
) -> tuple[Tensor, Tensor]:
    """Restrict ``(P, Q)`` to the pairs a miner returned (pytorch-metric-learning's
    ``indices_tuple``): ``(a1, p, a2, n)`` pairs or ``(a, p, n)`` triplets (each triplet gives
    the pairs ``(a, p)`` and ``(a, n)``). Pairs outside the original masks stay excluded.

    ``counts=False``: boolean masks (a pair mined twice is one pair). ``counts=True``: int32
    matrices holding how often each pair occurs in the tuple (0 outside the original masks), for
    the losses that weigh repeated pairs as PML's pair-based losses do."""
    a1, p, a2, n = _mined_indices(indices_tuple, *positives.shape, positives.device, check)
    if counts:
        pos = torch.zeros(positives.shape, dtype=torch.int32, device=positives.device)
        neg = torch.zeros(negatives.shape, dtype=torch.int32, device=negatives.device)
        pos.index_put_((a1, p), torch.ones_like(a1, dtype=torch.int32), accumulate=True)
        neg.index_put_((a2, n), torch.ones_like(a2, dtype=torch.int32), accumulate=True)
        return pos * positives, neg * negatives
    pos = torch.zeros_like(positives)
    neg = torch.zeros_like(negatives)
    pos[a1, p] = True
    neg[a2, n] = True
    return positives & pos, negatives & neg


def mined_triplets(
    indices_tuple: tuple[Tensor, ...],
    positives: Tensor,
    negatives: Tensor,
    check: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The triplets ``(a, p, n)`` of a miner's triplet tuple whose ``(a, p)`` is a positive and
    ``(a, n)`` a negative pair of the masks, in the tuple's order, duplicates kept (as PML)."""
    a, p, _, n = _mined_indices(indices_tuple, *positives.shape, positives.device, check)
    ok = positives[a, p] & negatives[a, n]
    return a[ok], p[ok], n[ok]


def _group_by_label(labels: Tensor):
    """Classes in ascending order, and for each its first position in a stable sort of
    ``labels`` (``order``) and its size."""
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return classes, order, starts, counts


def first_pair_per_class(labels: Tensor, ref_labels: Tensor | None = None):
    """Indices ``(anchor_idx, positive_idx)`` with one pair per class, in ascending class order.

    Without ``ref_labels``: for every label with two or more items, its first and second
    occurrence (the pair pytorch-metric-learning's ``NPairsLoss`` picks). With ``ref_labels``:
    the first occurrence in ``labels`` and the first in ``ref_labels`` of every shared label.
    """
    classes, order, starts, counts = _group_by_label(labels)
    if ref_labels is None:
        keep = counts >= 2
        return order[starts[keep]], order[starts[keep] + 1]
    ref_classes, ref_order, ref_starts, _ = _group_by_label(ref_labels)
    a = order[starts[torch.isin(classes, ref_classes)]]
    p = ref_order[ref_starts[torch.isin(ref_classes, classes)]]
    return a, p


def first_mined_pair_per_label(indices_tuple, labels: Tensor, cand_labels: Tensor,
                               self_reference: bool, check: bool = True):
    """From a miner's ``(a1, p, ...)`` keep the positive pairs whose labels match (and, on the
    batch itself, that are not an item with itself) and, for every anchor label, the first such
    pair in the tuple's order (PML's ``NPairsLoss`` rule), in ascending label order."""
    a, p, _, _ = _mined_indices(indices_tuple, labels.numel(), cand_labels.numel(),
                                labels.device, check)
    keep = labels[a] == cand_labels[p]
    if self_reference:
        keep &= a != p
    a, p = a[keep], p[keep]
    # the first occurrence of every anchor label: a stable sort by label, then its group starts
    _, order, starts, _ = _group_by_label(labels[a])
    first = order[starts]
    return a[first], p[first]
