"""``nn.Module`` shells around the estimators of :mod:`losses.bounds`, called like every loss of
:mod:`losses.modules` (pytorch-metric-learning's call shape: ``loss(embeddings, labels)``,
``loss(x, ref_emb=y, paired=True)``, ...): a critic (default ``Cosine(0.1)``, as InfoNCE's) turns
the batch into ``(S, P, Q)`` and one function of :mod:`losses.bounds` gives the loss.

Lower bounds: :class:`TUBA` (constant or learned baseline ``a(y)``), :class:`MINE`, :class:`SMILE`,
:class:`AlphaInfoNCE` and :class:`FLO` (with its own shadow head ``u(x, y)``). Upper bounds as
training losses: :class:`L1Out` and :class:`CLUB`, whose critic is a conditional density
(:class:`contrastive.conditional.GaussianConditional`, scores ``L_ij = log q(y_j | x_i)``) trained
in the same step as the encoder (CLUB's scheme, Cheng et al. 2020).

:class:`MINE` keeps its moving average of the partition term as a buffer (``log_average``), so it
is saved and restored with the module's ``state_dict``; it is updated on every training-mode call
that builds a graph. These estimators read the batch on the host (``check=False`` is not
sync-free for them); a batch without a positive or a negative pair gives the zero loss of
:class:`~losses.modules.PairLoss` (or its error with ``strict=True``). ``check=True`` also
refuses non-finite scores with the functional core's ``ValueError`` (the bounds' own check,
:mod:`losses.bounds`); ``check=False`` hands that check off too. ``reduction`` is
``"mean"`` (default), ``"sum"`` or ``"none"`` as in :mod:`losses.functional`: ``"none"`` gives one
term per anchor whose mean is the loss (the terms are defined in :mod:`losses.bounds`).

The baseline network, the shadow head and the conditional need the embeddings of the call, not
only ``(S, P, Q)``: :meth:`PairLoss._score` hands them to :meth:`compute` for the length of one
call (:class:`_WithEmbeddings`), so these losses are computed by calling the module.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from contrastive.conditional import GaussianConditional
from contrastive.critics import Critic, mlp
from contrastive.pairs import Pairs, any_true
from contrastive.validation import check_positive_int

from . import bounds as LB
from . import kernels as K
from .modules import PairLoss, _critic_or_temperature

__all__ = ["TUBA", "MINE", "SMILE", "AlphaInfoNCE", "FLO", "L1Out", "CLUB"]


def _zero(scores: Tensor, reduction: str) -> Tensor:
    """The zero loss of a batch without a term, in the graph (``[N]`` zeros for ``"none"``)."""
    return scores.sum(1) * 0.0 if reduction == "none" else scores.sum() * 0.0


class _Estimator(PairLoss):
    """A critic and one estimator of :mod:`losses.bounds`."""

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 strict: bool = False, reduction: str = "mean", check: bool = True):
        super().__init__(_critic_or_temperature(critic, temperature, 0.1), strict,
                         K.check_reduction(reduction), check)

    def loss(self, scores: Tensor, positives: Tensor, negatives: Tensor,
             check: bool = True) -> Tensor:
        """The loss of a batch with a term; ``check``: the bound's own input checks (finite
        scores, :mod:`losses.bounds`)."""
        raise NotImplementedError

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        if not (bool(positives.any()) and bool(negatives.any())):
            return _zero(scores, self.reduction)  # a batch without a term
        return self.loss(scores, positives, negatives, check)


class _WithEmbeddings(_Estimator):
    """An estimator whose :meth:`loss` also reads the call's anchors and candidates
    (``self.batch``, set by :meth:`_score` and cleared when the call returns)."""

    batch: tuple[Tensor, Tensor] | None = None

    def _inputs(self, p: Pairs) -> tuple[Tensor, Tensor]:
        a = K.full_precision(p.anchors)
        return a, (a if p.self_reference else K.full_precision(p.candidates))

    def _score(self, p: Pairs) -> Tensor:
        with K.no_autocast(p.anchors.device.type):
            self.batch = self._inputs(p)
            return self.critic(*self.batch)

    def embeddings(self) -> tuple[Tensor, Tensor]:
        if self.batch is None:
            raise ValueError(f"{type(self).__name__} needs the embeddings of the call, not only "
                             "(S, P, Q): call the module, loss(embeddings, labels, ...)")
        return self.batch

    def forward(self, *args, **kwargs) -> Tensor:
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.batch = None

    def scores(self, *args, **kwargs):
        try:
            return super().scores(*args, **kwargs)
        finally:
            self.batch = None


class TUBA(_WithEmbeddings):
    """TUBA loss ``-I_TUBA`` (:func:`losses.bounds.tuba_bound`, Poole et al. 2019 eq. 8)::

        I_TUBA = 1 + mean_P (S - b) - mean_Q exp(S - b),   b = log a(y_j)

    ``baseline="constant"`` (default): ``b = log_baseline`` (``1`` is NWJ).
    ``baseline="learned"``: a per-candidate log-baseline ``b_j = log_baseline + a(y_j)``, ``a`` an
    MLP of the candidate embedding (``baseline_layers`` hidden layers of ``baseline_hidden``,
    ReLU; needs ``embedding_size``) whose last layer starts at zero, so training starts from the
    constant baseline. Or pass any ``nn.Module`` mapping candidates ``[M, d]`` to ``[M]`` (or
    ``[M, 1]``) log-baselines. The bound holds for every baseline that depends on ``y`` alone
    and is tight at ``S - b = log p(y|x)/p(y)``; for a given critic the best is
    ``a(y) = E_{p(x)} e^{S(x, y)}``. The baseline network is trained with the critic, by the same
    loss; the readouts read the critic's own scores (without the baseline).
    """

    what = "the TUBA loss"

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 log_baseline: float = 0.0, baseline: str | nn.Module = "constant",
                 embedding_size: int | None = None, baseline_hidden: int = 64,
                 baseline_layers: int = 1, **kwargs):
        super().__init__(temperature, critic, **kwargs)
        self.log_baseline = float(log_baseline)
        self.baseline_net: nn.Module | None = None
        if isinstance(baseline, nn.Module):
            self.baseline_net = baseline
        elif baseline == "learned":
            if embedding_size is None:
                raise ValueError("baseline='learned' needs embedding_size (the candidates' "
                                 "embedding size), or pass baseline=<an nn.Module a(y)>")
            net = mlp(check_positive_int(embedding_size, "embedding_size"),
                      check_positive_int(baseline_hidden, "baseline_hidden"), 1,
                      int(baseline_layers))
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
            self.baseline_net = net
        elif baseline != "constant":
            raise ValueError(f"baseline must be 'constant', 'learned' or an nn.Module a(y), got "
                             f"{baseline!r}")
        self.baseline = baseline if isinstance(baseline, str) else "module"

    def log_baselines(self, candidates: Tensor) -> float | Tensor:
        """The log-baseline: per candidate ``[1, M]`` (learned), or the constant."""
        if self.baseline_net is None:
            return self.log_baseline
        return self.log_baseline + self.baseline_net(candidates).reshape(1, -1)

    def loss(self, scores, positives, negatives, check=True):
        b = self.log_baselines(self.embeddings()[1])
        return LB.tuba(scores, positives, negatives, b, self.reduction, check)

    def extra_repr(self) -> str:
        return f"log_baseline={self.log_baseline}, baseline={self.baseline!r}"


class MINE(_Estimator):
    """MINE: the DV loss with the moving-average gradient correction
    (:func:`losses.bounds.mine`, Belghazi et al. 2018). The average (``log_average``, a buffer,
    NaN until the first training step) is checkpointed with the module. ``reduction="none"``:
    per-anchor terms valued as DV's, each carrying its anchor's share of the corrected
    gradient (the partition term's negatives weighted by ``exp(S) / avg'``, the batch-wide
    average), so their mean has exactly the corrected gradient; the average moves once per
    call whatever the reduction."""

    what = "the MINE loss"
    log_average: Tensor

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 momentum: float = 0.01, **kwargs):
        super().__init__(temperature, critic, **kwargs)
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.register_buffer("log_average", torch.tensor(math.nan))

    def loss(self, scores, positives, negatives, check=True):
        value, new = LB.mine(scores, positives, negatives, self.log_average, self.momentum,
                             self.reduction, check)
        if self.training and torch.is_grad_enabled():
            self.log_average.copy_(new.to(self.log_average.dtype))
        return value

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


class SMILE(_Estimator):
    """SMILE loss (:func:`losses.bounds.smile`): valued ``-I_SMILE`` with clipping ``tau``, the
    critic trained by the Jensen-Shannon gradient (``gradient="js"``, Song & Ermon's) or by
    ``-I_SMILE``'s own (``"dv"``)."""

    what = "the SMILE loss"

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 tau: float = 5.0, gradient: str = "js", **kwargs):
        super().__init__(temperature, critic, **kwargs)
        if not float(tau) > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        if gradient not in ("js", "dv"):
            raise ValueError(f"gradient must be 'js' or 'dv', got {gradient!r}")
        self.tau, self.gradient = float(tau), gradient

    def loss(self, scores, positives, negatives, check=True):
        return LB.smile(scores, positives, negatives, self.tau, self.gradient, self.reduction,
                        check)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, gradient={self.gradient!r}"


class AlphaInfoNCE(_Estimator):
    """alpha-InfoNCE loss ``-I_alpha`` (:func:`losses.bounds.interpolated_bound`, Poole et al.
    2019 eq. 12): ``alpha = 1`` InfoNCE (leave-one-out), ``alpha = 0`` TUBA with the constant
    ``log_baseline``."""

    what = "the alpha-InfoNCE loss"

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 alpha: float = 0.5, log_baseline: float = 0.0, **kwargs):
        super().__init__(temperature, critic, **kwargs)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.alpha, self.log_baseline = float(alpha), float(log_baseline)

    def loss(self, scores, positives, negatives, check=True):
        return LB.interpolated(scores, positives, negatives, self.alpha, self.log_baseline,
                               self.reduction, check)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, log_baseline={self.log_baseline}"


class FLO(_WithEmbeddings):
    """FLO loss ``-I_FLO`` (:func:`losses.bounds.flo_bound`, Guo et al. 2022, "Tight Mutual
    Information Estimation With Contrastive Fenchel-Legendre Optimization", eq. 9)::

        I_FLO = mean_{(i,p) in P} [1 - u_ip - exp(-u_ip) mean_{j in Q_i} exp(S_ij - S_ip)]

    with the critic's scores ``S`` and a shadow ``u(x, y)`` of this module's own head over each
    positive pair: ``u_ip = h([a_i; b_p; S_ip]) - S_ip``, ``h`` an MLP (``shadow_layers`` hidden
    layers of ``shadow_hidden``, ReLU; needs ``embedding_size``) whose last layer starts at zero.
    The skip ``-S_ip`` puts the start near the optimum ``u* = log mean_{Q_i} exp(S_ij - S_ip)``
    (which is ``-S_ip`` plus a function of ``x`` at the log density ratio); ``h`` learns the
    rest. The bound holds for every ``u``; the critic, the head and the encoder all maximise
    it. ``readout`` adds ``"flo"`` (this shadow) to the registered estimators.
    """

    what = "the FLO loss"

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 embedding_size: int | None = None, shadow_hidden: int = 64,
                 shadow_layers: int = 1, embedding_size_b: int | None = None, **kwargs):
        super().__init__(temperature, critic, **kwargs)
        if embedding_size is None:
            raise ValueError("FLO needs embedding_size for its shadow head u(x, y) (the trainer "
                             "fills it in; in Python pass embedding_size=)")
        d_a = check_positive_int(embedding_size, "embedding_size")
        d_b = d_a if embedding_size_b is None else check_positive_int(embedding_size_b,
                                                                     "embedding_size_b")
        self.shadow_head = mlp(d_a + d_b + 1, check_positive_int(shadow_hidden, "shadow_hidden"),
                               1, int(shadow_layers))
        nn.init.zeros_(self.shadow_head[-1].weight)
        nn.init.zeros_(self.shadow_head[-1].bias)

    def shadow(self, anchors: Tensor, candidates: Tensor, scores: Tensor,
               positives: Tensor) -> Tensor:
        """``U [N, M]``: ``u_ip`` at the positive pairs, 0 elsewhere (never read)."""
        rows, cols = positives.nonzero(as_tuple=True)
        s_pos = scores[rows, cols]
        h = self.shadow_head(torch.cat([anchors[rows], candidates[cols], s_pos[:, None]], 1))
        return scores.new_zeros(scores.shape).index_put((rows, cols), h[:, 0] - s_pos)

    def loss(self, scores, positives, negatives, check=True):
        a, b = self.embeddings()
        u = self.shadow(a, b, scores, positives)
        return LB.flo(scores, positives, negatives, u, self.reduction, check)

    @torch.no_grad()
    def readout(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None, *, paired=False,
                estimators: tuple[str, ...] = ("infonce", "nwj", "flo")) -> dict[str, float]:
        """As :meth:`PairLoss.readout`, and ``"flo"``: I_FLO with this module's shadow."""
        rest = tuple(e for e in estimators if e != "flo")
        out = super().readout(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                              paired=paired, estimators=rest) if rest else {}
        if "flo" in estimators:
            p = self.pairs(embeddings, labels, ref_emb, ref_labels, paired, indices_tuple)
            try:
                s = self._score(p)
                pos, neg = p.positives, p.negatives
                if indices_tuple is not None:
                    pos, neg, _ = self.mined(indices_tuple, pos, neg)
                if any_true(pos) and any_true(neg):
                    a, b = self.embeddings()
                    out["flo"] = float(LB.flo_bound(s, pos, neg, self.shadow(a, b, s, pos)))
                else:
                    out["flo"] = float("nan")
            finally:
                self.batch = None
        return {name: out[name] for name in (*rest, "flo") if name in out}


class _ConditionalBound(_WithEmbeddings):
    """An upper bound on ``L_ij = log q(y_j | x_i)`` as a training loss, in one step (Cheng et
    al. 2020, alg. 1)::

        loss = -I(L_enc) + NLL(L_fit),   NLL = -mean_P log q(y_p | x_i)

    ``L_enc`` is the conditional with its parameters detached (the encoder's gradient is only
    ``-grad I``); ``L_fit`` is the conditional on detached embeddings (``q``'s gradient is only
    the NLL's, the maximum-likelihood fit to the positive pairs that makes the bound an upper
    bound, Cheng et al. thm. 3.2). The two are equal in value, so the loss's value is
    ``-I + NLL``; :meth:`readout` gives ``I`` itself. The critic is a
    :class:`~contrastive.conditional.GaussianConditional` of ``embedding_size`` (``hidden_dim``,
    ``layers``), or any conditional log-density module passed as ``critic=`` (not a score
    critic of :mod:`contrastive.critics`).
    """

    estimator_name = ""
    bound = staticmethod(LB.club_bound)

    def __init__(self, embedding_size: int | None = None, critic: nn.Module | None = None,
                 hidden_dim: int = 128, layers: int = 1, strict: bool = False,
                 reduction: str = "mean", check: bool = True):
        if critic is None:
            if embedding_size is None:
                raise ValueError(f"{type(self).__name__} needs embedding_size for its Gaussian "
                                 "conditional q(y|x) (the trainer fills it in; in Python pass "
                                 "embedding_size=, or critic=GaussianConditional(...))")
            critic = GaussianConditional(check_positive_int(embedding_size, "embedding_size"),
                                         hidden_dim=hidden_dim, layers=layers)
        elif isinstance(critic, Critic):
            raise ValueError(f"{type(self).__name__} is an upper bound on a conditional "
                             f"log-density log q(y|x): pass a conditional such as "
                             f"GaussianConditional as critic=, not the score critic "
                             f"{type(critic).__name__}")
        PairLoss.__init__(self, critic, strict, K.check_reduction(reduction), check)

    def _score(self, p: Pairs) -> Tensor:
        """``L_enc``: the conditional with detached parameters (and buffers)."""
        with K.no_autocast(p.anchors.device.type):
            self.batch = self._inputs(p)
            frozen = {k: v.detach() for k, v in (*self.critic.named_parameters(),
                                                 *self.critic.named_buffers())}
            return torch.func.functional_call(self.critic, frozen, self.batch)

    def loss(self, scores, positives, negatives, check=True):
        a, b = self.embeddings()
        fit = self.critic(a.detach(), b.detach())  # L_fit: gradient to q's parameters only
        return (-self.bound(scores, positives, negatives, reduction=self.reduction, check=check)
                + LB.conditional_nll(fit, positives, negatives, reduction=self.reduction,
                                     check=check))

    @torch.no_grad()
    def readout(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None, *, paired=False,
                estimators: tuple[str, ...] | None = None) -> dict[str, float]:
        """MI estimates (nats) on ``L = log q(y_j | x_i)`` of a batch: by default this loss's
        own upper bound, then I_NCE and I_NWJ of ``L`` read as a critic's scores (lower bounds
        for any critic, so the batch's MI is sandwiched). ``estimators`` takes any name of
        :data:`losses.registry.ESTIMATORS`, upper bounds included."""
        from .registry import ESTIMATORS

        names = (self.estimator_name, "infonce", "nwj") if estimators is None else estimators
        s, pos, neg = self.scores(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                  paired=paired)
        if not any_true(pos):
            raise ValueError("the batch has no positive pair: nothing to read out")
        out: dict[str, float] = {}
        for name in names:
            entry = ESTIMATORS.get(name)
            _, bound = entry.factory()
            ok = entry.name == "infonce" or any_true(neg)
            out[entry.name] = float(bound(s, pos, neg)) if ok else float("nan")
        return out

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class L1Out(_ConditionalBound):
    """The leave-one-out upper bound (Poole et al. 2019, eq. 13;
    :func:`losses.bounds.l1out_bound`) as a loss, trained as :class:`_ConditionalBound` says::

        loss = -mean_{(i,p) in P} [L_ip - logmeanexp_{k: (k,p) in Q} L_kp]
               - mean_P L_fit,            L_ij = log q(y_j | x_i)
    """

    what = "the L1Out loss"
    estimator_name = "l1out"
    bound = staticmethod(LB.l1out_bound)


class CLUB(_ConditionalBound):
    """CLUB, the contrastive log-ratio upper bound (Cheng et al. 2020, eq. 3;
    :func:`losses.bounds.club_bound`) as a loss, trained as :class:`_ConditionalBound` says::

        loss = -(mean_P L - mean_Q L) - mean_P L_fit,   L_ij = log q(y_j | x_i)
    """

    what = "the CLUB loss"
    estimator_name = "club"
    bound = staticmethod(LB.club_bound)
