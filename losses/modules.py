"""``nn.Module`` shells around :mod:`losses.functional`.

Each module holds a critic and its hyper-parameters, and is called exactly like a
pytorch-metric-learning (PML) 2.x loss, positional order included::

    loss(embeddings, labels)                              # supervised, or views with instance ids
    loss(embeddings, labels, miner(embeddings, labels))   # PML's indices_tuple, third
    loss(embeddings, labels, None, ref_emb, ref_labels)   # against a separate reference set
    loss(x_emb, ref_emb=y_emb, paired=True)               # paired views: positives on the diagonal

(:mod:`contrastive.pairs` lists what each call means.) Every module takes the same path,
:meth:`PairLoss.forward`: resolve the call into anchors, candidates and masks, score them with the
critic, restrict the masks to a miner's pairs (:mod:`contrastive.pairs` owns the mining), and hand
``(S, P, Q)`` to :meth:`PairLoss.compute`, one call of a function of :mod:`losses.functional`.
A plain small call (a batch against itself, no miner's tuple, a normalising critic, a loss
with a fused kernel: :meth:`PairLoss.lane_kernel`) runs the same operations in one autograd
node (:mod:`losses.lane`), with the same numbers.

``reduction=`` is the functional core's (``"mean"``, ``"sum"``, ``"none"``; the triplet and
contrastive losses also ``"nonzero"``), so ``loss(emb, labels)`` can return per-anchor terms for
sample weights. ``check=True`` (default) validates the batch at the boundary, with device-to-host
syncs: finite embeddings and scores, index bounds, and the batch that gives the loss nothing to
average -- no positive pair, no negative, no triplet -- which returns a zero loss that is still
part of the graph, as in PML, with a :class:`~contrastive.pairs.NoPairsWarning` the first time
*per loss instance*; ``strict=True`` raises a ``ValueError`` that explains the batch instead.
Mined tuples that leave nothing (the miner found no hard pair) give the same zero without a
warning, also under ``strict``. ``check=False`` skips all of that (for ``torch.compile`` and CUDA
graphs): the functional core then gives the same zero through masks, without a sync.

The critic and the loss always run in float32 (float64 inputs stay float64), with autocast
switched off locally, so mixed-precision training cannot overflow ``exp(S)`` at small
temperatures.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from contrastive.critics import Cosine, Critic, Dot, NegativeL2
from contrastive.pairs import (
    NoPairsError,
    NoPairsWarning,
    Pairs,
    any_true,
    check_call,
    diagonal_masks,
    first_mined_pair_per_label,
    first_pair_per_class,
    mined_masks,
    mined_triplets,
    require_terms,
    resolve_pairs,
    terms_flag,
)
from contrastive.validation import check_embeddings, check_temperature

from . import functional as LF
from . import kernels as K
from . import native
from .lane import lane_loss

__all__ = ["PairLoss", "InfoNCE", "NWJ", "JS", "DV", "MultiClassNPair", "Triplet", "Contrastive",
           "first_pair_per_class"]


class PairLoss(nn.Module):
    """Base class: resolve the call into (anchors, candidates, masks), score them with the
    critic in full precision, and hand ``(S, P, Q)`` to :meth:`compute`.

    ``strict=False`` (default, PML's behaviour): a batch with no term gives a zero loss in the
    graph and a warning once per instance; ``strict=True``: it raises ``ValueError``.
    ``reduction``: as the functional core's; ``check``: see the module docstring.
    """

    what = "this loss"
    #: whether mined pairs keep their multiplicity (PML's pair-based losses count a pair
    #: mined twice twice; its matrix-based ones, e.g. SupCon, once)
    counts_repeats = False
    #: whether :meth:`pairs` consumes the miner's tuple itself (the N-pair loss picks its rows)
    mines_in_pairs = False
    #: whether :meth:`compute` with ``check=True`` raises :class:`NoPairsError` exactly when
    #: :meth:`has_terms` is False (the shipped losses, each tested for it): the module then
    #: lets the functional core's check, read in the same host sync as the finite scores
    #: (:func:`losses.kernels.prepare`), stand for its own. False (a subclass's default-safe
    #: choice): :meth:`has_terms` is read first, as before
    core_checks_terms = False
    #: what the loss needs for a term (:data:`contrastive.pairs.TERMS`), read by
    #: :meth:`has_terms` and :meth:`require_terms`; the functional core checks the same
    terms = "both"

    def __init__(self, critic: Critic | nn.Module | None = None, strict: bool = False,
                 reduction: str | None = "mean", check: bool = True):
        super().__init__()
        self.critic = critic if critic is not None else self.default_critic()
        self.strict = bool(strict)
        self.reduction = reduction
        self.check = bool(check)
        self._warned = False

    def default_critic(self) -> nn.Module:
        return Cosine(0.1)

    # -- the shell -------------------------------------------------------------------------
    def pairs(self, embeddings, labels=None, ref_emb=None, ref_labels=None, paired=False,
              indices_tuple=None) -> Pairs:
        return resolve_pairs(embeddings, labels, ref_emb, ref_labels, paired, self.check,
                             self.check and not self._defers_finite(indices_tuple))

    def _defers_finite(self, indices_tuple) -> bool:
        """Whether the embeddings' finiteness read is left to the functional core's read of
        the scores (one host read per call instead of two): for a checked call without a
        miner's tuple, of a loss whose core checks its terms (:attr:`core_checks_terms`: its
        ``compute`` reads the whole score matrix's finiteness first) with a critic that turns
        every NaN or Inf of its inputs into a non-finite score
        (:attr:`contrastive.critics.Critic.propagates_nonfinite`). The error then still
        names the embeddings (:meth:`_name_nonfinite`)."""
        return (self.check and indices_tuple is None and self.core_checks_terms
                and bool(getattr(self.critic, "propagates_nonfinite", False)))

    @staticmethod
    def _name_nonfinite(embeddings: Tensor, ref_emb: Tensor | None) -> None:
        """Raise the embeddings' own error (the rows with NaN or Inf) when they are what made
        the scores non-finite; return when they are finite."""
        check_embeddings(embeddings, "embeddings")
        if ref_emb is not None:
            check_embeddings(ref_emb, "ref_emb")

    def _score(self, p: Pairs) -> Tensor:
        with K.no_autocast(p.anchors.device.type):
            a = K.full_precision(p.anchors)
            b = a if p.self_reference else K.full_precision(p.candidates)
            return self.critic(a, b)

    def mined(self, indices_tuple, positives: Tensor, negatives: Tensor):
        """``(P, Q, triplets)`` restricted to a miner's tuple (:mod:`contrastive.pairs`);
        ``triplets`` is None except for losses that take a triplet tuple as triplets."""
        pos, neg = mined_masks(indices_tuple, positives, negatives, counts=self.counts_repeats,
                               check=self.check)
        return pos, neg, None

    def scores(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        paired: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The score matrix ``S`` and masks ``(P, Q)`` this loss sees for a call (the masks
        restricted to the mined pairs when ``indices_tuple`` is given)."""
        p = self.pairs(embeddings, labels, ref_emb, ref_labels, paired, indices_tuple)
        if self._defers_finite(indices_tuple):  # no loss reads these scores: check here
            self._name_nonfinite(embeddings, ref_emb)
        s, pos, neg = self._score(p), p.positives, p.negatives
        if indices_tuple is not None and not self.mines_in_pairs:
            pos, neg, _ = self.mined(indices_tuple, pos, neg)
        return s, pos, neg

    def compute(self, scores: Tensor, positives: Tensor, negatives: Tensor, *,
                triplets=None, check: bool = True) -> Tensor:
        """The loss of ``(S, P, Q)``: one call of the functional core."""
        raise NotImplementedError

    def penalty(self, p: Pairs) -> Tensor | None:
        """A term added to the loss (a regulariser of the embeddings); None by default."""
        return None

    def has_terms(self, positives: Tensor, negatives: Tensor) -> bool:
        """Whether the masks give this loss anything to average (:attr:`terms`; default: a
        positive and a negative pair somewhere in the batch)."""
        return bool(terms_flag(self.terms, positives, negatives))

    def require_terms(self, positives: Tensor, negatives: Tensor) -> None:
        """Raise :class:`~contrastive.pairs.NoPairsError` explaining why there is no term."""
        require_terms(self.terms, positives, negatives, self.what)

    def no_terms(self, scores: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        """The batch has no term: raise (``strict``) or warn once and return the zero loss."""
        try:
            self.require_terms(positives, negatives)
            reason = f"the batch gives {self.what} no term"
        except NoPairsError as exc:
            if self.strict:
                raise
            reason = str(exc)
        if self.strict:
            raise NoPairsError(reason)
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{type(self).__name__}: {reason}. Returning a zero loss that stays in the graph "
                "(pytorch-metric-learning's behaviour); pass strict=True to raise instead. "
                "Warned once per loss instance.",
                NoPairsWarning,
                stacklevel=3,
            )
        return self.compute(scores, positives, negatives, check=False)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        paired: bool = False,
    ) -> Tensor:
        """The loss of a batch, in PML's positional order. ``indices_tuple`` takes the output
        of a PML miner -- pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)`` -- and restricts
        the positives and negatives to the mined pairs (NT-Xent and the contrastive loss count
        a pair mined twice twice, as PML's pair-based losses; the others once; the triplet loss
        uses mined triplets as given). ``paired=True`` (keyword only): ``ref_emb`` is a second
        view, positives on the diagonal. The zero of a batch without a term comes from the
        functional core (masks), so ``reduction="none"`` keeps its shape there too."""
        p = self.pairs(embeddings, labels, ref_emb, ref_labels, paired, indices_tuple)
        if (indices_tuple is None and p.self_reference and self.check and self.core_checks_terms
                and _lane_is_own(type(self)) and "compute" not in self.__dict__):
            kernel = self.lane_kernel(p.anchors.shape[0])
            if kernel is not None:
                loss = lane_loss(p.anchors, p.positives, p.negatives, self.critic, self.terms,
                                 kernel, self._general(p))
                if loss is not None:
                    reg = self.penalty(p)
                    return loss if reg is None else loss + reg
        s = self._score(p)
        with K.no_autocast(s.device.type):
            pos, neg, triplets = p.positives, p.negatives, None
            mined = indices_tuple is not None
            if mined and not self.mines_in_pairs:
                if self.check and not self.has_terms(pos, neg):
                    return self.no_terms(s, pos, neg)
                pos, neg, triplets = self.mined(indices_tuple, pos, neg)
            if self.check and not mined and self.core_checks_terms:
                loss = self._checked_compute(s, pos, neg, embeddings, ref_emb)
                if loss is None:
                    return self.no_terms(s, pos, neg)
            else:
                if self.check and not self.has_terms(pos, neg):
                    if mined:  # the miner kept nothing: PML's zero, no warning
                        return self.compute(s, pos, neg, triplets=triplets, check=False)
                    return self.no_terms(s, pos, neg)
                loss = self.compute(s, pos, neg, triplets=triplets, check=self.check)
            reg = self.penalty(p)
        return loss if reg is None else loss + reg

    def lane_kernel(self, n: int) -> tuple | None:
        """``(kernel, args)``: this loss's fused kernel (:func:`losses.kernels.fused`) and its
        arguments after ``(S, P, Q)``, for a plain call on ``n`` embeddings, so that the call
        takes :mod:`losses.lane` (the critic and the kernel in one node); None (the default,
        and for a reduction the kernel does not give): the general path. The kernel must be
        the one :meth:`compute` takes for such a call, so that both give the same numbers."""
        return None

    def _general(self, p: Pairs) -> Callable[[Tensor], Tensor]:
        """The loss of ``x`` (the call's anchors) through the general path's differentiable
        operations, for the lane's double backward."""
        pos, neg = p.positives, p.negatives
        return lambda x: self.compute(self.critic(x, x), pos, neg, check=False)

    def _checked_compute(self, s: Tensor, pos: Tensor, neg: Tensor, embeddings: Tensor,
                         ref_emb: Tensor | None) -> Tensor | None:
        """``compute`` with the core's checks, one host read for the finite scores and a term
        (:attr:`core_checks_terms`); None when the batch has no term. Non-finite scores name
        the embeddings when they are the cause (:meth:`_defers_finite`). (A method of its own:
        ``torch.compile`` of :meth:`forward` with ``check=False`` then never meets its
        ``try``.)"""
        try:
            return self.compute(s, pos, neg, check=True)
        except NoPairsError:
            return None
        except K.NonFiniteScoresError:
            self._name_nonfinite(embeddings, ref_emb)  # raises when they are the cause
            raise

    @torch.no_grad()
    def readout(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        paired: bool = False,
        estimators: tuple[str, ...] = ("infonce", "nwj"),
    ) -> dict[str, float]:
        """MI estimates (nats) of this loss's own score matrix on a batch (arguments as
        :meth:`forward`): by default I_NCE and I_NWJ; ``estimators`` takes any lower bound
        registered in :data:`losses.registry.ESTIMATORS` (names or aliases, e.g. ``("dv",
        "smile", "tuba")``; the upper bounds need a conditional critic and are refused). Keys
        are the canonical names; a bound that needs negatives reads NaN on a batch without
        them. Raises ``ValueError`` on a batch without positives."""
        from .registry import ESTIMATORS  # the registry imports this module

        s, pos, neg = self.scores(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                  paired=paired)
        has_neg = any_true(neg)
        out: dict[str, float] = {}
        for name in estimators:
            entry = ESTIMATORS.get(name)
            if entry.meta.get("kind") == "upper":
                raise ValueError(f"estimator {name!r} is an upper bound on a conditional "
                                 "log-density and needs a conditional critic, not this loss's "
                                 "score matrix")
            _, bound = entry.factory()
            if entry.name == "infonce" or has_neg:
                out[entry.name] = float(bound(s, pos, neg))
            else:
                out[entry.name] = float("nan")
        return out


@functools.lru_cache(maxsize=256)
def _lane_is_own(cls: type) -> bool:
    """Whether ``cls``'s :meth:`PairLoss.lane_kernel` belongs to its ``compute``: both defined
    by the same class, and the scores not made another way (``_score`` not overridden). A
    subclass that overrides ``compute`` or ``_score`` (a user's variant of a shipped loss)
    keeps the general path, which calls its own methods, instead of its parent's kernel."""
    def owner(name: str) -> type | None:
        return next((c for c in cls.__mro__ if name in c.__dict__), None)

    return owner("lane_kernel") is owner("compute") and owner("_score") is PairLoss


def _critic_or_temperature(critic, temperature, default_t: float) -> nn.Module:
    if critic is not None and temperature is not None:
        raise ValueError(
            "pass either critic= or temperature=, not both; set the temperature on the critic "
            "(e.g. critics.Cosine(temperature=0.05))"
        )
    if critic is not None:
        return critic
    return Cosine(check_temperature(default_t if temperature is None else temperature))


INFONCE_FORMS = ("all", "pair")


class InfoNCE(PairLoss):
    """InfoNCE with several positives per anchor, in one of two forms:

    * ``positives="all"`` (default): SupCon's term, all of an anchor's positives in one
      log-sum-exp (:func:`losses.functional.supcon`; PML's ``SupConLoss``), one term per anchor;
    * ``positives="pair"``: NT-Xent's term, one per positive pair, each positive against the
      anchor's negatives only (:func:`losses.functional.ntxent`; PML's ``NTXentLoss``).

    With one positive per anchor (two views per instance, paired views) both are CPC's InfoNCE.
    ``"all"`` is the default because it is the form the project's MI readout
    (:func:`losses.functional.infonce_bound`) and published numbers use; PML users get NT-Xent
    under its own names (``losses.get("ntxent")``, :class:`losses.NTXentLoss`).

    Default critic: ``Cosine(temperature)`` with ``temperature=0.1``.
    """

    core_checks_terms = True

    what = "InfoNCE"

    def __init__(
        self,
        temperature: float | None = None,
        critic: nn.Module | None = None,
        positives: str = "all",
        strict: bool = False,
        reduction: str = "mean",
        check: bool = True,
    ):
        if positives not in INFONCE_FORMS:
            raise ValueError(
                f"positives must be 'all' (SupCon: all positives in one term) or 'pair' "
                f"(NT-Xent: one term per positive pair), got {positives!r}"
            )
        super().__init__(_critic_or_temperature(critic, temperature, 0.1), strict,
                         K.check_reduction(reduction), check)
        self.positives = positives
        self.counts_repeats = positives == "pair"  # NT-Xent is pair-based in PML

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return LF.infonce(scores, positives, negatives, self.positives, self.reduction, check)

    def lane_kernel(self, n):
        if self.reduction not in ("mean", "sum"):
            return None
        kernel = LF._ntxent_kernel if self.positives == "pair" else LF._supcon_kernel
        return kernel, (self.reduction,)

    def extra_repr(self) -> str:
        return f"positives={self.positives!r}, reduction={self.reduction!r}"


class _Bound(PairLoss):
    """NWJ, JS and DV: a critic (default ``Cosine(0.1)``, the same as InfoNCE, so comparisons
    isolate the objective) and one function of the functional core."""

    core_checks_terms = True

    fn = staticmethod(LF.nwj)

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 strict: bool = False, reduction: str = "mean", check: bool = True):
        super().__init__(_critic_or_temperature(critic, temperature, 0.1), strict,
                         K.check_reduction(reduction), check)

    #: the fused kernel of :attr:`fn` (``losses.functional._fused_bound``'s)
    kernel = staticmethod(LF._nwj_kernel)

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return self.fn(scores, positives, negatives, self.reduction, check)

    def lane_kernel(self, n):
        if self.reduction not in ("mean", "sum"):
            return None
        return self.kernel, (float(n) if self.reduction == "sum" else 1.0,)


class NWJ(_Bound):
    """NWJ bound as a loss, ``-I_NWJ`` (:func:`losses.functional.nwj`).
    Default critic: ``Cosine(0.1)`` (the same as InfoNCE, so comparisons isolate the objective)."""

    what = "the NWJ loss"
    fn = staticmethod(LF.nwj)


class JS(_Bound):
    """Jensen-Shannon critic loss (:func:`losses.functional.js`); default critic ``Cosine(0.1)``.
    Its MI readout is :func:`losses.functional.js_bound`."""

    what = "the JS loss"
    fn = staticmethod(LF.js)
    kernel = staticmethod(LF._js_kernel)


class DV(_Bound):
    """Donsker-Varadhan / MINE loss ``-I_DV`` (:func:`losses.functional.dv`); default critic
    ``Cosine(0.1)``."""

    what = "the DV loss"
    fn = staticmethod(LF.dv)
    kernel = staticmethod(LF._dv_kernel)


class MultiClassNPair(PairLoss):
    """Multi-class N-pair loss (Sohn 2016; :func:`losses.functional.multiclass_npair`).

    From labels it takes one (anchor, positive) pair per class (see :func:`first_pair_per_class`;
    with a PML miner's ``indices_tuple``, the first mined positive pair of every anchor label, as
    PML's ``NPairsLoss``) and scores anchors against positives with the critic (default ``Dot``,
    i.e. ``NPairsLoss(distance=DotProductSimilarity(normalize_embeddings=False))``; PML's own
    default normalises, which is ``critic=Cosine(1.0)``), positives on the diagonal: the
    cross-entropy of each anchor against its own positive. ``l2_reg`` adds
    ``l2_reg * mean ||f||^2 / 2`` over the used embeddings (Sohn's regulariser; 0 by default).
    Unlike PML it also takes a reference set (anchors from the batch, positives from
    ``ref_emb``).
    """

    core_checks_terms = True

    what = "the multi-class N-pair loss"
    mines_in_pairs = True

    def __init__(self, critic: nn.Module | None = None, l2_reg: float = 0.0,
                 strict: bool = False, reduction: str = "mean", check: bool = True):
        super().__init__(critic, strict, K.check_reduction(reduction), check)
        self.l2_reg = float(l2_reg)

    def default_critic(self) -> nn.Module:
        return Dot()

    def pairs(self, embeddings, labels=None, ref_emb=None, ref_labels=None, paired=False,
              indices_tuple=None) -> Pairs:
        c = check_call(embeddings, labels, ref_emb, ref_labels, paired, self.check)
        if c.labels is None:  # paired views: anchors x ref_emb, positives on the diagonal
            pos, neg = diagonal_masks(c.embeddings.shape[0], c.embeddings.device)
            return Pairs(c.embeddings, c.ref_emb, pos, neg, False)
        cand = c.embeddings if c.ref_emb is None else c.ref_emb
        if indices_tuple is not None:
            cand_labels = c.labels if c.ref_labels is None else c.ref_labels
            ai, pi = first_mined_pair_per_label(indices_tuple, c.labels, cand_labels,
                                                c.ref_emb is None, self.check)
        elif c.ref_labels is not None:
            ai, pi = first_pair_per_class(c.labels, c.ref_labels)
        elif c.paired:  # the two views of each item share its label
            ai, pi = first_pair_per_class(c.labels, c.labels)
        else:  # the batch itself, or PML's ref_emb whose row j has labels[j]
            pairs = native.first_pairs(c.labels)  # one C call on a CPU
            ai, pi = first_pair_per_class(c.labels) if pairs is None else pairs
        pos, neg = diagonal_masks(ai.numel(), c.embeddings.device)
        return Pairs(c.embeddings[ai], cand[pi], pos, neg, False)

    terms = "positives"  # one pair is a term (0): no negative needed, as PML

    def require_terms(self, positives, negatives):
        raise NoPairsError(
            "the batch has no positive pair, which the multi-class N-pair loss needs: every "
            "label occurs only once. Sample several items per class (MPerClassSampler with "
            "m >= 2) or several views per instance (MultiView)"
        )

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return LF.multiclass_npair(scores, positives, negatives, self.reduction, check)

    def penalty(self, p: Pairs) -> Tensor | None:
        if not self.l2_reg:
            return None
        a, b = K.full_precision(p.anchors), K.full_precision(p.candidates)
        n = max(a.shape[0], 1)
        return self.l2_reg * 0.5 * ((a * a).sum() / n + (b * b).sum() / n)


#: the batch size from which the triplet losses' plain calls take the sparse lane
#: (:func:`losses.lane.is_sparse`) instead of the dense one: measured on CPU, one thread,
#: in-process medians of forward+backward, sparse against dense: batch-hard 611 against 595 us
#: at B = 128, 1035 against 1209 at 256; semi-hard 923 against 837 at 128, even at 256 (and
#: the dense lane stops at 256 rows, kernels.FUSED_MAX_ENTRIES)
SPARSE_LANE_MIN_ROWS = {"hard": 129, "semihard": 257}

#: the same with the C kernels (losses.native enabled): their dense lane is the faster up to
#: its end at 256 rows (measured as above: batch-hard 0.35 against 0.62 ms at B = 160, 0.77
#: against 0.94 at 256)
SPARSE_LANE_MIN_ROWS_NATIVE = {"hard": 257, "semihard": 257}


class Triplet(PairLoss):
    """Triplet margin loss (:func:`losses.functional.triplet`).

    Default critic: ``NegativeL2(normalize=True)`` (Euclidean distance of L2-normalised
    embeddings) and ``margin=0.05``, pytorch-metric-learning's defaults; the margin is in score
    units, i.e. distance units for a distance critic. ``soft=True`` is PML's
    ``smooth_loss=True``, ``softplus(margin + d_ap - d_an)`` (Hermans et al.'s soft margin is
    ``margin=0``).

    ``reduction``: ``"nonzero"`` (mean over the non-zero terms, PML's ``AvgNonZeroReducer``),
    ``"mean"`` (over all terms), ``"sum"`` or ``"none"``; ``None`` (default) is ``"nonzero"``
    for ``mining="all"`` and for mined triplets (PML) and ``"mean"`` over anchors for
    ``"hard"``/``"semihard"`` (Hermans et al.). PML's ``BatchHardMiner`` +
    ``TripletMarginLoss()`` is ``Triplet(mining="hard", reduction="nonzero")``. A miner's
    ``(a, p, n)`` triplets are used as given (duplicates included, as PML); mined pairs restrict
    the masks and ``mining`` then picks triplets among them.
    """

    core_checks_terms = True

    what = "the triplet loss"

    def __init__(
        self,
        margin: float = 0.05,
        mining: str = "all",
        soft: bool = False,
        critic: nn.Module | None = None,
        reduction: str | None = None,
        strict: bool = False,
        check: bool = True,
    ):
        LF._check_triplet_args(mining, reduction)
        super().__init__(critic, strict, reduction, check)
        if float(margin) < 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        self.margin, self.mining, self.soft = float(margin), mining, bool(soft)

    def default_critic(self) -> nn.Module:
        return NegativeL2(normalize=True)

    terms = "triplet"

    def mined(self, indices_tuple, positives, negatives):
        if len(indices_tuple) != 3:  # pairs: PML makes every positive pair of an anchor a
            # triplet with every negative pair of it, repeated pairs repeatedly (count masks)
            pos, neg = mined_masks(indices_tuple, positives, negatives,
                                   counts=self.mining == "all", check=self.check)
            return pos, neg, None
        pos, neg, _ = super().mined(indices_tuple, positives, negatives)
        return pos, neg, mined_triplets(indices_tuple, positives, negatives, self.check)

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return LF.triplet(scores, positives, negatives, self.margin, self.mining, self.soft,
                          self.reduction, check, triplets)

    def lane_kernel(self, n):
        reduction = LF._check_triplet_args(self.mining, self.reduction)
        if self.soft or reduction == "none":
            return None
        # a few entries per row of dL/dS (batch-hard: two; semi-hard: two per positive): past
        # SPARSE_LANE_MIN_ROWS the sparse lane (at any size), below it the dense one
        rows = SPARSE_LANE_MIN_ROWS_NATIVE if native.enabled() else SPARSE_LANE_MIN_ROWS
        if n >= rows.get(self.mining, n + 1):
            kernel = (LF._triplet_hard_sparse_kernel if self.mining == "hard"
                      else LF._triplet_semihard_sparse_kernel)
            return kernel, (self.margin, reduction)
        return LF._triplet_kernel, (self.margin, self.mining, reduction)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, mining={self.mining!r}, soft={self.soft}, "
                f"reduction={self.reduction!r}")


class Contrastive(PairLoss):
    """Contrastive loss (Hadsell et al. 2006; :func:`losses.functional.contrastive`).

    For a distance critic (default ``NegativeL2(normalize=True)``) the margins are distances:
    ``relu(d - pos_margin)`` on positives, ``relu(neg_margin - d)`` on negatives, defaults 0 and 1.
    For a similarity critic they are similarities: ``relu(pos_margin - s)`` and
    ``relu(s - neg_margin)``, defaults 1 and 0 (pytorch-metric-learning's conventions). A batch
    without positives (or negatives) keeps the other part, as in PML; only a batch with no pair
    at all has no term. ``reduction="nonzero"`` (default) is PML's ``AvgNonZeroReducer``.
    """

    core_checks_terms = True

    what = "the contrastive loss"
    counts_repeats = True

    def __init__(
        self,
        pos_margin: float | None = None,
        neg_margin: float | None = None,
        critic: nn.Module | None = None,
        strict: bool = False,
        reduction: str = "nonzero",
        check: bool = True,
    ):
        super().__init__(critic, strict, K.check_reduction(reduction, K.NONZERO), check)
        dist = bool(getattr(self.critic, "is_distance", False))
        self.pos_margin = float((0.0 if dist else 1.0) if pos_margin is None else pos_margin)
        self.neg_margin = float((1.0 if dist else 0.0) if neg_margin is None else neg_margin)
        sign = -1.0 if dist else 1.0
        self._t_pos, self._t_neg = sign * self.pos_margin, sign * self.neg_margin

    def default_critic(self) -> nn.Module:
        return NegativeL2(normalize=True)

    terms = "any"

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return LF.contrastive(scores, positives, negatives, self._t_pos, self._t_neg,
                              self.reduction, check)

    def lane_kernel(self, n):
        if self.reduction == "none":
            return None
        return LF._contrastive_kernel, (self._t_pos, self._t_neg, self.reduction)

    def extra_repr(self) -> str:
        return (f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, "
                f"reduction={self.reduction!r}")
