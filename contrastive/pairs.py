"""Positive and negative masks: how labels, multi-view instance ids and paired views become the
one lingua franca of the library, ``(scores [N, M], positives [N, M], negatives [N, M])``.

Three ways to call a loss, as in pytorch-metric-learning:

* ``loss(emb, labels)``: candidates are the batch itself; ``P_ij = y_i == y_j`` and
  ``Q_ij = y_i != y_j`` for ``i != j``; the diagonal (an item with itself) is neither.
  Self-supervised views are the same call with instance ids as labels.
* ``loss(emb, labels, ref_emb, ref_labels)``: candidates are a separate reference set;
  ``P_ij = y_i == y'_j``; nothing is excluded.
* ``loss(x_emb, ref_emb=y_emb)``: paired views (x_i, y_i) from two encoders; positives on the
  diagonal, every other pair negative. With ``labels`` and no ``ref_labels`` the same labels serve
  both sides.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .validation import check_embeddings, check_labels


class Pairs(NamedTuple):
    """Anchors, candidates and the boolean masks between them."""

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
    same = labels[:, None] == ref[None, :]
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


def check_call(
    embeddings: Tensor,
    labels: Tensor | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
) -> Call:
    """Validate the arguments of ``loss(embeddings, labels, ref_emb, ref_labels)`` without
    building masks: shapes, dtypes, finiteness, one label per row, and a call that defines
    positives (labels, or paired ``ref_emb``). Labels come back as integer tensors on the
    embeddings' device."""
    embeddings = check_embeddings(embeddings, "embeddings")
    n = embeddings.shape[0]
    if labels is not None:
        labels = check_labels(labels, n, "labels", "embeddings").to(embeddings.device)
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels was given without ref_emb; pass ref_emb too")
        if labels is None:
            raise ValueError(
                "no labels and no ref_emb: pass labels (class or instance ids) or paired views "
                "as ref_emb"
            )
        return Call(embeddings, labels, None, None)
    ref_emb = check_embeddings(ref_emb, "ref_emb")
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_emb has dimension {ref_emb.shape[1]} but embeddings have "
            f"{embeddings.shape[1]}; both must come from encoders with the same output size"
        )
    if ref_labels is not None:
        if labels is None:
            raise ValueError("ref_labels was given without labels; pass labels for embeddings")
        ref_labels = check_labels(ref_labels, ref_emb.shape[0], "ref_labels", "ref_emb")
        return Call(embeddings, labels, ref_emb, ref_labels.to(embeddings.device))
    if ref_emb.shape[0] != n:
        raise ValueError(
            f"paired views need as many ref_emb rows as embeddings rows, got {ref_emb.shape[0]} "
            f"and {n}; for a separate reference set pass ref_labels too"
        )
    return Call(embeddings, labels, ref_emb, None)


def resolve_pairs(
    embeddings: Tensor,
    labels: Tensor | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
) -> Pairs:
    """Validate a loss call and return anchors, candidates and masks (see module docstring)."""
    c = check_call(embeddings, labels, ref_emb, ref_labels)
    if c.ref_emb is None:
        pos, neg = label_masks(c.labels)
        return Pairs(c.embeddings, c.embeddings, pos, neg, True)
    if c.ref_labels is not None:
        pos, neg = label_masks(c.labels, c.ref_labels)
    elif c.labels is not None:
        pos, neg = label_masks(c.labels, c.labels)
    else:
        pos, neg = diagonal_masks(c.embeddings.shape[0], c.embeddings.device)
    return Pairs(c.embeddings, c.ref_emb, pos, neg, False)


def require_positives(positives: Tensor, what: str = "this loss") -> None:
    """Raise a clear error when no anchor has a positive."""
    if not bool(positives.any()):
        raise ValueError(
            f"the batch has no positive pair, which {what} needs: every label occurs only once. "
            "Sample several items per class (MPerClassSampler with m >= 2) or several views per "
            "instance (MultiView), or pass paired views as ref_emb"
        )


def require_negatives(negatives: Tensor, what: str = "this loss") -> None:
    """Raise a clear error when no anchor has a negative."""
    if not bool(negatives.any()):
        raise ValueError(
            f"the batch has no negative pair, which {what} needs: all items share one label. "
            "Sample at least two classes per batch"
        )


def mined_masks(
    indices_tuple: tuple[Tensor, ...], positives: Tensor, negatives: Tensor
) -> tuple[Tensor, Tensor]:
    """Restrict ``(P, Q)`` to the pairs a miner returned (pytorch-metric-learning's
    ``indices_tuple``): ``(a1, p, a2, n)`` pairs or ``(a, p, n)`` triplets (each triplet gives
    the pairs ``(a, p)`` and ``(a, n)``). Pairs outside the original masks stay excluded."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError(
            "indices_tuple must be (anchor, positive, negative) triplets or "
            "(anchor1, positive, anchor2, negative) pairs, as pytorch-metric-learning miners "
            f"return; got {type(indices_tuple).__name__} of length "
            f"{len(indices_tuple) if hasattr(indices_tuple, '__len__') else '?'}"
        )
    idx = [torch.as_tensor(t, device=positives.device).long().flatten() for t in indices_tuple]
    if len(idx) == 3:
        a1, p, n = idx
        a2 = a1
    else:
        a1, p, a2, n = idx
    n_rows, n_cols = positives.shape
    for name, t, bound in (("anchor", a1, n_rows), ("positive", p, n_cols),
                           ("anchor", a2, n_rows), ("negative", n, n_cols)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise ValueError(f"indices_tuple has {name} indices outside [0, {bound})")
    pos = torch.zeros_like(positives)
    neg = torch.zeros_like(negatives)
    pos[a1, p] = True
    neg[a2, n] = True
    return positives & pos, negatives & neg
