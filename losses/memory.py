"""Memory of past batches for any loss of the library: a cross-batch memory (XBM) and a
MoCo-style queue of negatives, both on one FIFO of embeddings (and labels) kept in buffers.

* :class:`Memory`: the FIFO. ``size`` rows of embeddings and labels, a write pointer and a fill
  count, all registered buffers, so ``state_dict()`` (and the trainer's checkpoint) carries the
  memory and a resumed run continues with the same negatives. Under DDP the wrappers enqueue the
  *gathered* batch (:func:`contrastive.distributed.all_gather_nograd`, rank order), so every
  rank holds the same memory.
* :class:`CrossBatchMemory` (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR
  2020): pytorch-metric-learning's ``CrossBatchMemory(loss, embedding_size, memory_size,
  miner)``. Each call first validates and enqueues the batch (a batch the loss's checks reject
  leaves the memory as it was), then scores the batch (anchors) against the
  whole memory (candidates, no gradient), ``P_ij = y_i == m_j``, ``Q_ij = y_i != m_j``, with
  the pair of an embedding and its own just-enqueued copy removed from ``P`` -- exactly PML's
  pairs, as masks rather than index lists. A miner (``miner(emb, labels, mem, mem_labels)``)
  restricts them as PML's does (its pairs with an own copy removed too); an ``indices_tuple``
  of the caller's (indices into the memory) is added to them as given, as PML adds it;
  ``enqueue_mask`` splits the batch into rows that only go into the memory and rows that are
  anchors (PML's MoCo-style use; a mask that sends every row to
  the memory is a fill-only step, a zero loss in the graph). The wrapped loss is any
  :class:`~losses.modules.PairLoss`.
* :class:`NegativeQueue` (He et al., "Momentum Contrast", CVPR 2020; lightly's
  ``NTXentLoss(memory_bank_size=(K, d))``): ``loss(query, key)`` with ``query [B, d]`` anchors,
  the positive of anchor ``i`` its own key ``key_i``, and the negatives the queue only, read
  *before* this batch's keys are queued (the batch's other keys are neither positive nor
  negative). On ``(S, P, Q)``: ``S = [critic(q_i, key_i) | critic(query, queue)]``
  ``[B, 1 + K]``, ``P`` its first column, ``Q`` the rest, and the wrapped loss (default
  :class:`~losses.self_supervised.SimCLR`'s NT-Xent at temperature 0.5, lightly's default) is
  one call of the functional core. The keys
  are queued (without gradient) when ``query`` requires a gradient, as lightly does, unless
  ``update=`` says otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from contrastive import distributed as D
from contrastive.pairs import NoPairsError, Pairs
from contrastive.validation import check_embeddings, check_labels

from . import kernels as K
from .modules import InfoNCE, PairLoss

__all__ = ["Memory", "CrossBatchMemory", "NegativeQueue", "drop_self_pairs", "queue_scores",
           "queue_masks", "split_views"]


class Memory(nn.Module):
    """A FIFO ring of ``size`` embeddings ``[size, d]`` and labels ``[size]`` (buffers).

    ``init="empty"``: only the rows written so far are read (PML's ``CrossBatchMemory``);
    ``init="random"``: the ring starts full of L2-normalised Gaussian rows (lightly's and MoCo's
    memory bank), all of which are read from the first call. ``embedding_size=None`` allocates
    the ring on the first :meth:`enqueue` (and :meth:`load_state_dict` takes the size it finds).

    The ring keeps the most precise dtype it has been given: float32, float64 once a float64
    batch arrives (or ``.double()``, or a float64 checkpoint, whose dtype :meth:`load_state_dict`
    adopts, so a round trip is bit-exact); a float32 batch is written into a float64 ring
    exactly. Readers cast what they read to the batch's dtype (the wrappers do, as PML casts its
    memory), so a float32 batch after a float64 one is scored in float32. The buffers follow the
    batch's device on :meth:`enqueue` (:meth:`follow`; PML moves its memory on use too). The
    pointer and the fill count are mirrored as Python ints, so enqueueing never waits on the
    device.
    """

    def __init__(self, size: int, embedding_size: int | None = None, init: str = "empty",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if int(size) < 1:
            raise ValueError(f"the memory size must be >= 1, got {size!r}")
        if init not in ("empty", "random"):
            raise ValueError(f"init must be 'empty' or 'random', got {init!r}")
        self.size, self.init = int(size), init
        d = 0 if embedding_size is None else int(embedding_size)
        self.register_buffer("embeddings", torch.zeros(self.size if d else 0, d, dtype=dtype))
        self.register_buffer("labels", torch.zeros(self.size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._ptr, self._filled = 0, 0
        if d:
            self._allocate(d, dtype, self.embeddings.device)

    def _allocate(self, d: int, dtype: torch.dtype, device) -> None:
        self.follow(device)  # the labels (and the pointer) live where the embeddings will
        if self.init == "random":
            g = torch.randn(self.size, d, dtype=dtype, device=device)
            self.embeddings = nn.functional.normalize(g, dim=1)
            self._set(0, self.size)
        else:
            self.embeddings = torch.zeros(self.size, d, dtype=dtype, device=device)
            self._set(0, 0)

    def _set(self, ptr: int, filled: int) -> None:
        self._ptr, self._filled = ptr, filled
        self.ptr.fill_(ptr)
        self.filled.fill_(filled)

    def reset(self) -> None:
        """Empty the memory (``init="random"``: fresh random rows)."""
        if self.embeddings.numel():
            self._allocate(self.embeddings.shape[1], self.embeddings.dtype,
                           self.embeddings.device)

    def __len__(self) -> int:
        return self._filled

    def follow(self, device) -> None:
        """Move every buffer to ``device`` (a batch's) when it is elsewhere."""
        device = torch.device(device)
        for name in ("embeddings", "labels", "ptr", "filled"):
            buf = getattr(self, name)
            if buf.device != device:
                setattr(self, name, buf.to(device))

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """Write ``embeddings [n, d]`` (detached) and ``labels [n]`` at the pointer, wrapping
        around; return the slots written, ``[n]`` long. ``n`` must not exceed ``size``."""
        n = embeddings.shape[0]
        if n > self.size:
            raise ValueError(
                f"cannot enqueue {n} rows into a memory of {self.size}; use a memory at least "
                "as large as the (global) batch"
            )
        self.follow(embeddings.device)
        # never less precise than the batch: float64 batches keep their precision
        dtype = torch.promote_types(self.embeddings.dtype, K.full_precision(embeddings).dtype)
        if self.embeddings.numel() == 0:
            self._allocate(embeddings.shape[1], dtype, embeddings.device)
        if embeddings.shape[1] != self.embeddings.shape[1]:
            raise ValueError(
                f"the memory holds {self.embeddings.shape[1]}-d embeddings, got "
                f"{embeddings.shape[1]}-d"
            )
        if self.embeddings.dtype != dtype:
            self.embeddings = self.embeddings.to(dtype)
        mem, lab = self.embeddings, self.labels
        e = embeddings.detach().to(mem.dtype)
        lb = None if labels is None else labels.detach().to(lab.device, lab.dtype)
        p = self._ptr
        first = min(n, self.size - p)
        mem[p:p + first] = e[:first]
        if lb is not None:
            lab[p:p + first] = lb[:first]
        if first < n:
            mem[: n - first] = e[first:]
            if lb is not None:
                lab[: n - first] = lb[first:]
        slots = (torch.arange(n, device=mem.device) + p) % self.size
        self._set((p + n) % self.size, min(self._filled + n, self.size))
        return slots

    def read(self) -> tuple[Tensor, Tensor]:
        """The rows in use, ``(embeddings [K, d], labels [K])`` (views of the buffers, in slot
        order; all ``size`` rows once the ring has wrapped around). The next :meth:`enqueue`
        writes into them in place: a reader that keeps them past it (for a backward pass) takes
        a copy."""
        k = self._filled
        if k == self.size:
            return self.embeddings, self.labels
        return self.embeddings[:k], self.labels[:k]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "embeddings"
        if key in state_dict and (state_dict[key].shape != self.embeddings.shape
                                  or state_dict[key].dtype != self.embeddings.dtype):
            self.embeddings = torch.empty_like(state_dict[key], device=self.embeddings.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ptr, self._filled = int(self.ptr), int(self.filled)

    def extra_repr(self) -> str:
        d = self.embeddings.shape[1] if self.embeddings.numel() else None
        return f"size={self.size}, embedding_size={d}, init={self.init!r}, filled={self._filled}"


def _gathered(x: Tensor, labels: Tensor | None, gather: bool):
    """``(x_all, labels_all, offset)``: the batch of every rank in rank order (without gradient)
    and where this rank's rows start; the batch itself outside DDP or with ``gather=False``."""
    if not gather or not D.is_distributed() or D.get_world_size() == 1:
        return x, labels, 0
    sizes = D.all_gather_nograd(torch.tensor([x.shape[0]], device=x.device)).tolist()
    x_all = D.all_gather_nograd(x)
    lab_all = None if labels is None else D.all_gather_nograd(labels.to(x.device))
    return x_all, lab_all, sum(sizes[: D.get_rank()])


def drop_self_pairs(indices_tuple: tuple[Tensor, ...], own_slots: Tensor) -> tuple[Tensor, ...]:
    """Remove from a miner's tuple the positive pairs (or triplets) whose positive is the
    anchor's own copy in the memory (``own_slots[i]``, the slot anchor ``i`` was written to);
    PML's ``remove_self_comparisons``."""
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        keep = p != own_slots[a]
        return a[keep], p[keep], n[keep]
    a1, p, a2, n = indices_tuple
    keep = p != own_slots[a1]
    return a1[keep], p[keep], a2, n


def _check_pair_loss(loss) -> PairLoss:
    if not isinstance(loss, PairLoss):
        raise TypeError(
            f"the memory wraps a loss of this library (a losses.PairLoss, e.g. "
            f"losses.get('ntxent')), got {type(loss).__name__}; for a pytorch-metric-learning "
            "loss use its own CrossBatchMemory"
        )
    return loss


def _concat_tuples(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(torch.cat([x, torch.as_tensor(y, device=x.device).long()]) for x, y in zip(a, b))


class CrossBatchMemory(nn.Module):
    """Cross-batch memory (XBM, Wang et al. 2020) around any loss of the library, with
    pytorch-metric-learning's ``CrossBatchMemory`` call and values (see the module docstring).

    ``loss(embeddings, labels, indices_tuple=None, enqueue_mask=None)``. ``memory_size`` rows;
    ``embedding_size`` may be left out (the memory is sized by the first batch). ``gather=True``:
    under DDP each rank passes its own batch, and the gathered batch is enqueued (every rank's
    memory stays the same); pass ``gather=False`` when the loss already receives the global
    batch (the trainer's :func:`contrastive.distributed.gather_embeddings`). Labels must be
    class labels that keep their meaning across batches (not per-batch instance ids).
    """

    def __init__(self, loss: PairLoss, embedding_size: int | None = None,
                 memory_size: int = 1024, miner: nn.Module | None = None, gather: bool = True):
        super().__init__()
        self.loss = _check_pair_loss(loss)
        if loss.mines_in_pairs:
            raise ValueError(
                f"{type(loss).__name__} picks its own pairs (the N-pair loss one per class) or "
                "weighs them (NCA reads a miner's tuple as weights), so the memory cannot leave "
                "out each embedding's pair with its own copy; wrap a pair-based loss (ntxent, "
                "supcon, triplet, contrastive, ...)"
            )
        self.miner = miner
        self.gather = bool(gather)
        self.memory = Memory(memory_size, embedding_size, init="empty")

    @property
    def memory_size(self) -> int:
        return self.memory.size

    def reset_queue(self) -> None:
        """Empty the memory (PML's name)."""
        self.memory.reset()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state dict of PML's CrossBatchMemory: its rows under PML's names, and no write
        # pointer or fill count (plain attributes there), which keep their values here as they
        # do in PML's module (a fresh one then reads nothing before it writes)
        pml_rows, pml_labels = prefix + "embedding_memory", prefix + "label_memory"
        if pml_rows in state_dict and prefix + "memory.embeddings" not in state_dict:
            state_dict[prefix + "memory.embeddings"] = state_dict.pop(pml_rows)
            if pml_labels in state_dict:
                state_dict[prefix + "memory.labels"] = state_dict.pop(pml_labels)
            for name in ("ptr", "filled"):
                state_dict.setdefault(f"{prefix}memory.{name}", getattr(self.memory, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple=None,
                enqueue_mask: Tensor | None = None) -> Tensor:
        if labels is None:
            raise ValueError(
                "the cross-batch memory needs class labels (instance ids restart every batch, "
                "so past rows would become false positives)"
            )
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive (as PML)")
        # the batch is validated before any row of it is enqueued: a rejected batch leaves the
        # memory as it was (the loss would reject it only after it had been written)
        check = self.loss.check
        batch = check_embeddings(embeddings, "embeddings", check=False)  # type and shape
        labels = check_labels(labels, batch.shape[0], check=check).to(batch.device)
        if enqueue_mask is not None:
            enqueue_mask = torch.as_tensor(enqueue_mask, device=batch.device).bool()
            if enqueue_mask.shape != labels.shape:
                raise ValueError("enqueue_mask needs one entry per embedding row")
            q_emb, q_lab = batch[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = batch[~enqueue_mask], labels[~enqueue_mask]
        else:
            q_emb, q_lab = batch, labels
        q_emb = q_emb.detach()
        all_emb, all_lab, offset = _gathered(q_emb, q_lab, self.gather)
        if check:  # after the gather, so that under DDP every rank raises, none enqueues
            check_embeddings(batch, "embeddings")
            if all_emb is not q_emb:
                check_embeddings(all_emb, "the gathered embeddings (every rank's batch)")
        slots = self.memory.enqueue(all_emb, all_lab)
        own = None if enqueue_mask is not None else slots[offset:offset + embeddings.shape[0]]
        ring, ref_labels = self.memory.read()
        # a float64 ring scores a float32 batch in float32
        ref = ring.to(K.full_precision(embeddings).dtype)
        if torch.is_grad_enabled() and _aliases(ref, ring):
            # the next call writes into the ring in place, possibly before this call's backward
            # pass (gradient accumulation): a critic that keeps the rows for its gradient (Dot,
            # Bilinear) needs the rows of now
            ref = ref.clone()
        if embeddings.shape[0] == 0:  # enqueue_mask sent every row to the memory
            return self._fill_step(embeddings, ref)
        return self._loss(embeddings, labels, ref, ref_labels, own, indices_tuple)

    def _fill_step(self, emb: Tensor, ref: Tensor) -> Tensor:
        """The loss of a step without anchors (a fill-only step): the functional core's zero
        on the ``[0, K]`` scores (PML's zero), in the graph, with the loss's reduction's shape;
        no warning (the step asked for it)."""
        with K.no_autocast(emb.device.type):
            s = self.loss.critic(K.full_precision(emb), ref)
            none = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
            return self.loss.compute(s, none, none, check=False)

    def _loss(self, emb, labels, ref, ref_labels, own, indices_tuple) -> Tensor:
        loss = self.loss
        if self.miner is not None:
            mined = tuple(self.miner(emb, labels, ref, ref_labels))
            if own is not None:
                mined = drop_self_pairs(mined, own)
            if indices_tuple is not None:
                indices_tuple = _pml_form(indices_tuple, len(mined), labels)
                mined = _concat_tuples(mined, indices_tuple)
            indices_tuple = mined
        s, pos, neg = loss.scores(emb, labels, None, ref, ref_labels)
        if self.miner is None and indices_tuple is not None:
            # PML: the user's tuple is added to all pairs (repeated pairs then count twice);
            # the own copies are left out of the pairs made here, the user's tuple is taken as
            # given (PML removes self-comparisons only from the pairs it makes)
            made = pos
            if own is not None:
                made = pos.clone()
                made[torch.arange(emb.shape[0], device=pos.device), own] = False
            a1, p = made.nonzero(as_tuple=True)
            a2, n = neg.nonzero(as_tuple=True)
            indices_tuple = _concat_tuples((a1, p, a2, n), _pml_form(indices_tuple, 4, labels))
        with K.no_autocast(s.device.type):
            triplets = None
            if indices_tuple is not None:
                if loss.check and not loss.has_terms(pos, neg):
                    return loss.no_terms(s, pos, neg)
                pos, neg, triplets = loss.mined(indices_tuple, pos, neg)
                if loss.check and not loss.has_terms(pos, neg):
                    return loss.compute(s, pos, neg, triplets=triplets, check=False)
            else:
                if own is not None:  # not the pair of an embedding with its own copy
                    pos[torch.arange(emb.shape[0], device=pos.device), own] = False
                if loss.check and not loss.has_terms(pos, neg):
                    return loss.no_terms(s, pos, neg)
            out = loss.compute(s, pos, neg, triplets=triplets, check=loss.check)
            reg = loss.penalty(Pairs(emb, ref, pos, neg, False))
        return out if reg is None else out + reg

    def extra_repr(self) -> str:
        return f"gather={self.gather}"


def _pml_form(indices_tuple, length: int, labels: Tensor):
    """A user's tuple in the miner's form (pairs or triplets), PML's conversion."""
    if len(indices_tuple) == length:
        return indices_tuple
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    if length == 4:
        return lmu.convert_to_pairs(indices_tuple, labels)
    return lmu.convert_to_triplets(indices_tuple, labels)


def _aliases(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` share memory (``.to()`` returned a view, not a copy)."""
    return a.device == b.device and (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def _check_finite(*named) -> None:
    """``check_embeddings`` on each ``(tensor, name)`` pair, with one host read when all are
    finite (the sum of their sums; a finite sum that overflows is told apart exactly)."""
    tensors, names = named[0::2], named[1::2]
    total = torch.stack([t.detach().sum().float() for t in tensors]).sum()
    if not math.isfinite(float(total)):
        for t, name in zip(tensors, names):
            check_embeddings(t, name)


class NegativeQueue(nn.Module):
    """A MoCo-style FIFO of negatives around a multi-view loss (see the module docstring).

    ``loss(query, key)`` equals lightly's ``NTXentLoss(t, memory_bank_size=(size, d))(query,
    key)`` call by call, given the same starting queue (``init="random"``, lightly's and MoCo's;
    ``"empty"`` reads only the keys queued so far), as long as no batch of keys crosses the end
    of the queue: every wrap-around lands exactly on the last slot, which holds whenever the
    (global) batch size stays the same and divides ``size``. A batch that crosses the end is
    wrapped around to the front here, whereas lightly writes only the rows up to the end, drops
    the rest and restarts at slot 0; from then on the two queues hold different keys. ``loss`` is
    any
    :class:`~losses.modules.PairLoss` (default :class:`~losses.self_supervised.SimCLR` at
    ``temperature``, 0.5); its critic scores each query against its own key and the queue
    (:func:`queue_scores`). ``gather``: as
    :class:`CrossBatchMemory` (under DDP the gathered keys are queued). ``update=None``
    (default) queues the keys when ``query`` requires a gradient (lightly's rule), so an
    evaluation pass leaves the queue as it is.

    With the loss's ``check`` on, ``query`` and ``key`` are checked to be finite (the error names
    the argument) before anything is scored or queued. When this call queues its keys and
    autograd records, the critic scores a copy of the queue (the keys are written into the ring
    in place, before the caller's backward pass, and a critic such as ``Dot`` keeps the queue for
    its gradient). ``strict=True`` on an empty queue (``init="empty"``) raises
    :class:`~contrastive.pairs.NoPairsError` after queuing the batch's keys, so the next call
    has negatives.
    """

    def __init__(self, loss: PairLoss | None = None, size: int = 4096,
                 embedding_size: int | None = None, temperature: float | None = None,
                 init: str = "random", gather: bool = True):
        super().__init__()
        if loss is None:
            from .self_supervised import SimCLR

            loss = SimCLR(0.5 if temperature is None else temperature)
        elif temperature is not None:
            raise ValueError("pass temperature= to the loss, or no loss (then SimCLR's)")
        self.loss = _check_pair_loss(loss)
        self.gather = bool(gather)
        self.memory = Memory(size, embedding_size, init=init)
        self._mask_key, self._mask_cache = None, None

    def forward(self, query: Tensor, key: Tensor, update: bool | None = None) -> Tensor:
        """``loss(query, key)`` (lightly's and MoCo's call), or ``loss(embeddings, ids)``: a
        stacked two-view batch with instance ids (the trainer's call), each id's first row the
        query and its second the key."""
        if isinstance(key, Tensor) and key.dim() == 1 and not key.is_floating_point():
            query, key = split_views(query, key)
        if key.shape != query.shape or query.dim() != 2:
            raise ValueError(
                f"query and key must be [B, d] of the same shape, got {tuple(query.shape)} and "
                f"{tuple(key.shape)}"
            )
        loss = self.loss
        check_embeddings(query, "query", check=False)  # type and shape (no value read)
        check_embeddings(key, "key", check=False)
        update = query.requires_grad if update is None else bool(update)
        local_key = key.detach()
        # gathered before the checks, so that under DDP every rank raises on a bad key
        all_key = _gathered(local_key, None, self.gather)[0] if update else local_key
        if loss.check:  # before the scores: the error names the argument
            _check_finite(query, "query", key, "key")
            if all_key is not local_key:
                check_embeddings(all_key, "the gathered keys (every rank's batch)")
        self.memory.follow(key.device)
        if self.memory.embeddings.numel() == 0:
            self.memory._allocate(key.shape[1], torch.float32, key.device)
        q, k = K.full_precision(query), K.full_precision(key)
        ring = self.memory.read()[0]
        bank = ring.to(q.dtype)
        if update and torch.is_grad_enabled() and bank.numel() and _aliases(bank, ring):
            # the keys are enqueued in place below, before the caller's backward pass: a critic
            # that keeps the bank for its gradient (Dot, NegativeL2) needs the rows of now
            bank = bank.clone()
        pooled = self.pooled and bank.shape[0] > 0
        try:
            with K.no_autocast(query.device.type):
                s = queue_scores(loss.critic, q, k, bank, pooled)
                pos, neg = self._masks(s.shape[0], s.shape[1] - 1, s.device)
                if loss.check and not loss.has_terms(pos, neg):
                    out = loss.no_terms(s, pos, neg)
                else:
                    out = loss.compute(s, pos, neg, check=loss.check)
        except NoPairsError as exc:  # strict=True on an empty queue (init="empty")
            if bank.shape[0]:
                raise
            name = type(loss).__name__
            if not update:
                raise NoPairsError(
                    f"{name}: the queue is still empty (init='empty'), so this batch has no "
                    "negative, and this call queues no key (update=False, or a query without "
                    "gradient). Queue keys first (update=True), pass a loss with strict=False "
                    "for a zero loss on such a batch, or use init='random'"
                ) from exc
            self.memory.enqueue(all_key)  # the next call has negatives
            raise NoPairsError(
                f"{name}: the queue is still empty (init='empty'), so this batch has no "
                f"negative; its {all_key.shape[0]} keys have been queued, so the next call has "
                "negatives. Pass a loss with strict=False for a zero loss on such a batch, or "
                "use init='random'"
            ) from exc
        if update:
            self.memory.enqueue(all_key)
        return out

    @property
    def pooled(self) -> bool:
        """Whether the wrapped loss sees the queue only through the log-sum-exp of its scores
        (the InfoNCE family and DCL), so :func:`queue_scores` may pool it into one column."""
        from .self_supervised import DCL

        return isinstance(self.loss, (InfoNCE, DCL))

    def extra_repr(self) -> str:
        return f"gather={self.gather}"

    def _masks(self, batch: int, negatives: int, device) -> tuple[Tensor, Tensor]:
        key = (batch, negatives, str(device))
        if self._mask_key != key:  # the same every step once the queue is full
            self._mask_cache, self._mask_key = queue_masks(batch, negatives, device), key
        return self._mask_cache


def split_views(embeddings: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(query, key)`` from a stacked batch with instance ids: for every id (ascending), its
    first row and its second; every id must occur exactly twice."""
    ids = ids.to(embeddings.device)
    if ids.shape[0] != embeddings.shape[0]:
        raise ValueError(f"ids must have one entry per row ({embeddings.shape[0]}), got "
                         f"{ids.shape[0]}")
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    if ids.numel() % 2 or not bool((sorted_ids[0::2] == sorted_ids[1::2]).all()) or (
            ids.numel() > 2 and not bool((sorted_ids[2::2] != sorted_ids[1:-1:2]).all())):
        raise ValueError("the queue takes two views per instance: every id exactly twice")
    return embeddings[order[0::2]], embeddings[order[1::2]]


def queue_scores(critic: nn.Module, query: Tensor, key: Tensor, queue: Tensor,
                 pooled: bool = False) -> Tensor:
    """The scores of a query batch against its keys and a queue: column 0 the score of each
    query with its own key (the diagonal of ``critic(query, key)``), then the queue's
    ``critic(query, queue)`` ``[B, K]`` -- lightly's and MoCo's logits, from any critic. The
    queue has no gradient; the keys and the queries have.

    ``pooled=True`` replaces the ``K`` queue columns by their log-sum-exp, one column
    (``[B, 2]``): ``log(exp(S_pos) + sum_k exp(S_k)) = logsumexp(S_pos, logsumexp_k S_k)``, so
    a loss that sees its negatives only through the log-sum-exp of their scores (InfoNCE,
    NT-Xent, SupCon, DCL, DCLW) has exactly the same value and gradient, with one fused pass
    over the ``[B, K]`` block instead of the masked passes of the general core."""
    pos = critic(query, key).diagonal()[:, None]
    if queue.shape[0] == 0:
        return pos
    neg = critic(query, queue)
    if pooled:
        return torch.cat([pos, K.masked_lse(neg, None, 1)[:, None]], 1)
    return torch.cat([pos, neg], 1)


def queue_masks(batch: int, negatives: int, device=None) -> tuple[Tensor, Tensor]:
    """``(P, Q)`` ``[B, 1 + negatives]`` of :func:`queue_scores`: the own key positive
    (column 0), the queue (or its pooled column) negative."""
    pos = torch.zeros(batch, 1 + negatives, dtype=torch.bool, device=device)
    pos[:, 0] = True
    return pos, ~pos
