"""Class-balanced batch sampling: every batch holds P classes x m samples.

Metric losses and supervised contrastive objectives need positives *and* negatives in every
batch. ``MPerClassSampler`` builds each global batch from ``P = batch_size / m`` distinct classes
with ``m`` samples each (the "P x K" sampling of Hermans et al., "In Defense of the Triplet Loss
for Person Re-Identification", 2017), without replacement inside an epoch, deterministically from
``(seed, epoch)`` and aware of ``torch.distributed``: every rank computes the same global batch and
keeps its own contiguous share, so the all-gathered batch in rank order is the single-process one.

How an epoch is built (pure functions below, the class only holds the arguments):

1. every usable class's items are shuffled and cut into *chunks* of ``m`` items;
2. the number of batches ``B`` is the largest number of P-class batches those chunks can fill
   with P distinct classes per batch (``sum_c min(k_c, B) >= P * B`` for ``k_c`` chunks of class
   ``c``) -- "use the data once";
3. the batches are filled round by round: a class with as many chunks left as rounds left must go
   in (otherwise the schedule would get stuck), the other seats are drawn without replacement with
   probability proportional to the chunks a class has left; finally the batch order is shuffled.
   When no class has more than one chunk (instance ids, ``m = 1``) that is a random permutation
   of the classes cut into batches, and is drawn as one (linear time, not quadratic).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from .validation import check_int, check_positive_int

__all__ = [
    "MPerClassSampler",
    "class_groups",
    "chunk_counts",
    "max_full_batches",
    "epoch_batches",
]

_SMALL_CLASS_MODES = ("drop", "replace")


# ------------------------------------------------------------------------------------------------
# functional core
# ------------------------------------------------------------------------------------------------


def _as_label_array(labels: Any) -> np.ndarray:
    """Return ``labels`` as a 1-D int64 numpy array; raise a ValueError/TypeError otherwise."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    try:
        arr = np.asarray(labels)
    except Exception as exc:  # pragma: no cover - numpy's message is kept
        raise TypeError(f"labels must be a 1-D sequence of integer class ids: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D (one class id per dataset item), got {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels is empty; pass one class id per dataset item")
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if arr.dtype == object and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in arr
    ):
        arr = arr.astype(np.int64)  # Python ints in an object array (e.g. a pandas column)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError("labels must hold integer class ids, got non-integer floats")
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"labels must hold integer class ids, got dtype {arr.dtype}; map class names to "
            "integers first (e.g. np.unique(names, return_inverse=True)[1])"
        )
    return arr.astype(np.int64, copy=False)


def class_groups(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Distinct class ids (sorted) and, for each, the dataset indices holding it (ascending)."""
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=classes.size))[:-1]
    return classes, np.split(order, bounds)


def chunk_counts(sizes: np.ndarray, m: int, drop_last: bool) -> np.ndarray:
    """Chunks of ``m`` items a class of each size yields per epoch.

    ``n // m`` with ``drop_last`` (the ``n mod m`` leftover items wait for another epoch),
    ``ceil(n / m)`` without (the last chunk is padded with other items of the class). A usable
    class smaller than ``m`` (``small_classes="replace"``) yields one chunk either way.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    k = sizes // m if drop_last else -(-sizes // m)
    return np.maximum(k, (sizes > 0).astype(np.int64))


def max_full_batches(counts: np.ndarray, p: int) -> int:
    """Largest ``B`` such that ``B`` batches of ``p`` distinct classes can be filled from
    ``counts[c]`` chunks of class ``c``: ``max {B : sum_c min(counts_c, B) >= p B}``.

    The condition is necessary (a class fills at most one seat per batch) and sufficient (the
    round-by-round schedule of :func:`epoch_batches` meets it). ``f(B) = sum_c min(counts_c, B) -
    p B`` is concave with ``f(0) = 0``, so the feasible ``B`` form an interval ``[0, B*]`` and a
    binary search finds ``B*``.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lo, hi = 0, int(counts.sum()) // p
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(counts, mid).sum()) >= p * mid:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _draw_chunk(group: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` items of one class: distinct when the class has ``m`` or more items, otherwise all
    of them plus ``m - n`` drawn with replacement."""
    if group.size >= m:
        return rng.choice(group, m, replace=False)
    extra = rng.choice(group, m - group.size, replace=True)
    return rng.permutation(np.concatenate([group, extra]))


def _class_chunks(
    group: np.ndarray, m: int, drop_last: bool, rng: np.random.Generator
) -> np.ndarray:
    """One epoch's chunks ``[k, m]`` of one class, its items consumed in a shuffled order."""
    n = group.size
    if n < m:
        return _draw_chunk(group, m, rng)[None, :]
    perm = rng.permutation(group)
    full = n // m
    chunks = perm[: full * m].reshape(full, m)
    if drop_last or n % m == 0:
        return chunks
    rest = perm[full * m :]
    pad = rng.choice(perm[: full * m], m - rest.size, replace=False)
    return np.concatenate([chunks, np.concatenate([rest, pad])[None, :]])


def _schedule(counts: np.ndarray, p: int, rounds: int, rng: np.random.Generator) -> list:
    """Seat ``p`` distinct classes per round for ``rounds`` rounds using exactly ``counts``.

    Requires ``counts.sum() == p * rounds`` and ``counts <= rounds``. Invariant: with ``R`` rounds
    left, ``sum(counts) == p R`` and every count ``<= R``; classes at ``count == R`` are seated
    (at most ``p`` of them, by the sum), the other seats are drawn without replacement with
    probability proportional to the remaining counts, which keeps the invariant for ``R - 1``.
    """
    counts = counts.astype(np.int64).copy()
    if counts.size and int(counts.max()) <= 1:
        # at most one chunk per class (instance ids with m = 1, as SimCLR-style batches): the
        # loop below would draw a uniformly random ordered partition of the classes into rounds
        # of p, in O(rounds x classes) (a minute per epoch at ImageNet size); a permutation cut
        # into rounds is that distribution in O(classes) (the random stream differs)
        return list(rng.permutation(np.flatnonzero(counts)).reshape(rounds, p))
    seats = []
    for t in range(rounds):
        left = rounds - t
        forced = np.flatnonzero(counts == left)
        need = p - forced.size
        if need > 0:
            optional = np.flatnonzero((counts > 0) & (counts < left))
            weights = counts[optional] / counts[optional].sum()
            chosen = np.concatenate([forced, rng.choice(optional, need, replace=False, p=weights)])
        else:
            chosen = forced
        chosen = rng.permutation(chosen)
        counts[chosen] -= 1
        seats.append(chosen)
    return seats


def epoch_batches(
    groups: Sequence[np.ndarray],
    m: int,
    p: int,
    seed: int,
    epoch: int,
    drop_last: bool = True,
) -> list[np.ndarray]:
    """All global batches of one epoch: a list of ``[p * m]`` index arrays, class-grouped (the
    ``m`` items of a class are contiguous), the same for every rank.

    ``groups`` holds the dataset indices of each *usable* class. With ``drop_last`` the epoch has
    :func:`max_full_batches` batches and no index repeats; without it, every item of every usable
    class appears at least once: the epoch has ``max(ceil(T / p), max_c k_c)`` batches for ``T``
    chunks in all, and the missing seats are filled with extra chunks (fresh random ``m``-subsets)
    of classes chosen in proportion to their spare room, so some items repeat.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
    chunks = [_class_chunks(g, m, drop_last, rng) for g in groups]
    counts = np.array([c.shape[0] for c in chunks], dtype=np.int64)
    if drop_last:
        rounds = max_full_batches(counts, p)
        counts = np.minimum(counts, rounds)
        surplus = int(counts.sum()) - p * rounds
        if surplus > 0:
            slots = np.repeat(np.arange(counts.size), counts)
            drop = rng.choice(slots.size, surplus, replace=False)
            counts -= np.bincount(slots[drop], minlength=counts.size)
    else:
        rounds = max(-(-int(counts.sum()) // p), int(counts.max()))
        missing = p * rounds - int(counts.sum())
        if missing > 0:
            slots = np.repeat(np.arange(counts.size), rounds - counts)
            add = np.bincount(slots[rng.choice(slots.size, missing, replace=False)],
                              minlength=counts.size)
            for c in np.flatnonzero(add):
                extra = np.stack([_draw_chunk(groups[c], m, rng) for _ in range(add[c])])
                chunks[c] = np.concatenate([chunks[c], extra])
            counts += add
    used = np.zeros(counts.size, dtype=np.int64)
    batches = []
    for seat in _schedule(counts, p, rounds, rng):
        parts = []
        for c in seat:
            parts.append(chunks[c][used[c]])
            used[c] += 1
        batches.append(np.concatenate(parts))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


# ------------------------------------------------------------------------------------------------
# module shell
# ------------------------------------------------------------------------------------------------


def _distributed_world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``(num_replicas, rank)`` from the arguments, else the initialised process group, else 1/0."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not initialised:
        # Like DistributedSampler: without a process group the missing half cannot be read, and
        # guessing (rank 0 everywhere, or one replica) would give ranks the same or no share.
        if rank is None and num_replicas is not None and num_replicas != 1:
            raise ValueError(
                f"num_replicas={num_replicas!r} was given without rank and no torch.distributed "
                "process group is initialised; pass rank= (this process's index) as well"
            )
        if num_replicas is None and rank is not None and rank != 0:
            raise ValueError(
                f"rank={rank!r} was given without num_replicas and no torch.distributed process "
                "group is initialised; pass num_replicas= (the number of processes) as well"
            )
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    num_replicas = check_positive_int(num_replicas, "num_replicas")
    rank = check_int(rank, "rank")
    if rank >= num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
    return num_replicas, rank


def _min_class_size(m: int, small_classes: str) -> int:
    """The fewest items a class needs to be usable with ``m`` items per class."""
    return m if small_classes == "drop" else min(m, 2)


def _size_fixes(sizes: np.ndarray, m: int, p: int, small_classes: str) -> str:
    """Fixes that work when too few classes are usable for ``p`` classes of ``m`` items: fewer
    classes per batch (when at least 2 are usable) and/or the largest smaller ``m`` that keeps
    ``p`` classes per batch, else ``small_classes='replace'``."""
    usable = int((sizes >= _min_class_size(m, small_classes)).sum())
    fixes = []
    if usable >= 2:
        fixes.append(f"use batch_size <= {usable * m} ({usable} classes per batch)")
    smaller = next(
        (k for k in range(m - 1, 0, -1)
         if int((sizes >= _min_class_size(k, small_classes)).sum()) >= p),
        None,
    )
    if smaller is not None:
        fixes.append(f"use m <= {smaller} (batch_size = {p} * m)")
    if small_classes == "drop" and int((sizes >= min(m, 2)).sum()) >= max(p, 2) > usable:
        fixes.append("pass small_classes='replace'")
    if not fixes:
        fixes.append(f"the labels hold only {sizes.size} classes; a batch needs at least 2")
    return "; or ".join(fixes)


class MPerClassSampler(Sampler[list[int]]):
    """Batch sampler: each global batch is ``P = batch_size / m`` distinct classes x ``m`` items.

    Use it as ``DataLoader(dataset, batch_sampler=MPerClassSampler(dataset.labels, m, B))``; it
    yields lists of dataset indices (positions in ``labels``). (pytorch-metric-learning's
    ``MPerClassSampler`` is a ``sampler=`` with ``length_before_new_iter`` fourth; here the
    arguments after ``batch_size`` are keywords, so its fourth argument cannot silently become
    ``seed``, and ``length_before_new_iter=`` is refused with what to do instead.)

    Args:
        labels: one integer class id per dataset item (list, numpy array or tensor).
        m: items per class in a batch.
        batch_size: the *global* batch size ``P * m`` (summed over all ranks).
        seed: the epoch's batches are a deterministic function of ``(seed, epoch)``, identical on
            every rank and independent of ``num_replicas``.
        num_replicas, rank: the distributed world; read from the initialised
            ``torch.distributed`` process group when ``None`` (1 and 0 without one; without one,
            ``num_replicas > 1`` needs ``rank`` and ``rank > 0`` needs ``num_replicas``).
        drop_last: ``True`` (default): the epoch has as many full batches as the shuffled
            ``m``-chunks of the classes can fill with ``P`` distinct classes each; no index repeats
            within an epoch and the ``n mod m`` leftover items of a class (and chunks that cannot
            be seated) wait for a later epoch. ``False``: every item of every usable class
            appears at least once per epoch; to keep batches whole, chunks are padded with other
            items of the same class and extra chunks are drawn, so some items repeat (like the
            padding of ``DistributedSampler(drop_last=False)``). Every batch is full either way.
        small_classes: a class with fewer than ``m`` items is ``"drop"`` (default: excluded, so no
            index ever repeats inside a batch) or ``"replace"`` (included when it has at least 2
            items: its chunk holds all its items plus ``m - n`` drawn again with replacement, as
            PML's sampler does). Classes with one item are never usable for ``m >= 2``. Leaving
            classes out is announced with a ``UserWarning`` (their number and items).

    Distributed: rank ``r`` yields ``batch[r * s:(r + 1) * s]`` with ``s = batch_size /
    num_replicas``, so concatenating the ranks' shares in rank order (an all-gather) gives the
    single-process batch. The ``m`` items of a class are contiguous in a batch, so a class lies
    whole on one rank when ``m`` divides ``s``; otherwise classes straddle neighbouring ranks
    (harmless when the loss sees the gathered batch).

    Epochs: call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``); without it
    every epoch repeats the same batches. ``len(sampler)`` is the number of batches the next
    iteration yields (``batches_per_epoch - start_batch``); it does not depend on the epoch.
    """

    def __init__(
        self,
        labels: Any,
        m: int,
        batch_size: int,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = True,
        small_classes: str = "drop",
        length_before_new_iter: int | None = None,
    ) -> None:
        if length_before_new_iter is not None:
            raise ValueError(
                "length_before_new_iter is pytorch-metric-learning's (a fixed number of items "
                "per iteration, drawn with replacement); this sampler's epoch uses each item "
                "once (see drop_last): leave it out and call set_epoch(e) before each epoch"
            )
        self.labels = _as_label_array(labels)
        self.m = check_positive_int(m, "m")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.seed = check_int(seed, "seed")
        self.drop_last = bool(drop_last)
        if small_classes not in _SMALL_CLASS_MODES:
            raise ValueError(
                f"small_classes must be one of {_SMALL_CLASS_MODES}, got {small_classes!r}"
            )
        self.small_classes = small_classes
        if self.batch_size % self.m:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by m ({self.m}): a batch is "
                f"P classes x m items; try batch_size={max(2, self.batch_size // self.m) * self.m}"
            )
        self.num_classes_per_batch = self.batch_size // self.m
        if self.num_classes_per_batch < 2:
            raise ValueError(
                f"batch_size ({self.batch_size}) / m ({self.m}) gives 1 class per batch, so no "
                "batch would have negatives; use batch_size >= 2 * m"
            )
        self.num_replicas, self.rank = _distributed_world(num_replicas, rank)
        if self.batch_size % self.num_replicas:
            raise ValueError(
                f"batch_size ({self.batch_size}) is the global batch and must be divisible by "
                f"num_replicas ({self.num_replicas}) so that every rank gets an equal share"
            )
        self.local_batch_size = self.batch_size // self.num_replicas

        classes, groups = class_groups(self.labels)
        if classes.size < 2:
            raise ValueError(
                f"labels has {classes.size} distinct class; MPerClassSampler needs at least two "
                "(for self-supervised views use MultiView's instance ids)"
            )
        sizes = np.array([g.size for g in groups], dtype=np.int64)
        min_size = _min_class_size(self.m, small_classes)
        usable = sizes >= min_size
        p = self.num_classes_per_batch
        if small_classes == "drop" and not usable.any():
            raise ValueError(
                f"m ({self.m}) is larger than every class (the largest has {sizes.max()} "
                f"items); {_size_fixes(sizes, self.m, p, small_classes)}"
            )
        if int(usable.sum()) < p:
            raise ValueError(
                f"batch_size ({self.batch_size}) / m ({self.m}) asks for {p} classes per batch "
                f"but only {int(usable.sum())} classes have at least {min_size} items; "
                f"{_size_fixes(sizes, self.m, p, small_classes)}"
            )
        if not usable.all():
            left_out = int((~usable).sum())
            items = int(sizes[~usable].sum())
            why = (
                f"fewer than m={self.m} items" if small_classes == "drop"
                else "a single item (a positive needs a second one)"
            )
            fix = (
                "; pass small_classes='replace' to use them (their items drawn again with "
                "replacement) or a smaller m" if small_classes == "drop" else ""
            )
            one = left_out == 1
            warnings.warn(
                f"MPerClassSampler: {left_out} {'class' if one else 'classes'} ({items} "
                f"{'item' if items == 1 else 'items'}) with {why} "
                f"{'is' if one else 'are'} left out of every batch{fix}",
                UserWarning,
                stacklevel=2,
            )
        self.classes = classes[usable]
        self._groups = [g for g, u in zip(groups, usable) if u]
        counts = chunk_counts(sizes[usable], self.m, self.drop_last)
        if self.drop_last:
            self.batches_per_epoch = max_full_batches(counts, self.num_classes_per_batch)
        else:
            total = int(counts.sum())
            self.batches_per_epoch = max(-(-total // self.num_classes_per_batch),
                                         int(counts.max()))
        self.epoch = 0
        self.start_batch = 0

    # -- epochs and checkpoints -------------------------------------------------------------------

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose batches the next iteration yields; ``start_batch`` skips the
        first batches (to resume in the middle of an epoch)."""
        self.epoch = check_int(epoch, "epoch")
        start_batch = check_int(start_batch, "start_batch")
        if start_batch > self.batches_per_epoch:
            raise ValueError(
                f"start_batch ({start_batch}) exceeds the {self.batches_per_epoch} batches per "
                "epoch"
            )
        self.start_batch = start_batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "seed"}`` (plus ``"start_batch"`` when resuming mid-epoch)."""
        state = {"epoch": self.epoch, "seed": self.seed}
        if self.start_batch:
            state["start_batch"] = self.start_batch
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore ``{"epoch", "seed"}`` (and an optional ``"start_batch"``)."""
        missing = {"epoch", "seed"} - set(state)
        if missing:
            raise ValueError(
                f"sampler state is missing {sorted(missing)}; pass the dict from state_dict()"
            )
        self.seed = check_int(state["seed"], "seed")
        self.set_epoch(state["epoch"], state.get("start_batch", 0))

    # -- iteration --------------------------------------------------------------------------------

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """All global ``P x m`` batches of ``epoch`` (default: the current one), for any rank."""
        epoch = self.epoch if epoch is None else check_int(epoch, "epoch")
        return epoch_batches(self._groups, self.m, self.num_classes_per_batch, self.seed, epoch,
                             self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.local_batch_size
        hi = lo + self.local_batch_size
        for batch in self.global_batches()[self.start_batch :]:
            yield batch[lo:hi].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(m={self.m}, batch_size={self.batch_size}, "
            f"classes_per_batch={self.num_classes_per_batch}, usable_classes={len(self._groups)}, "
            f"batches_per_epoch={self.batches_per_epoch}, num_replicas={self.num_replicas}, "
            f"rank={self.rank}, drop_last={self.drop_last}, small_classes={self.small_classes!r})"
        )
