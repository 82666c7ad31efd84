"""The losses and MI estimators by name, timm-style: ``losses.get(name, **kwargs)``,
``losses.available()``; ``"pml:ClassName"`` builds a pytorch-metric-learning loss.

Each registered loss carries, once:

* ``defaults`` -- the published settings every caller (trainer, ``compare``, command line) gets
  unless it overrides them (NT-Xent/SupCon temperature, FaceNet-style triplet margin 0.2 with all
  triplets, Sohn's N-pair L2 penalty 0.002, Hadsell's margins 0 / 1). The classes themselves keep
  pytorch-metric-learning's constructor defaults, so that a drop-in user gets PML's numbers;
  ``losses.get`` is the library's recommended configuration.
* ``meta`` -- what the application reads: ``family`` (``"mi"`` or ``"metric"``), ``supervision``
  (the positives it can learn from: class ``"labels"``, augmented ``"views"``), ``critic``
  (whether ``critic=`` replaces its score function; ``"temperature"`` is then dropped from the
  defaults), ``search_space`` (the hyper-parameters worth tuning: ``{name: {"low", "high",
  "log"}}`` for numbers, ``{name: {"choices": [...]}}`` for categories) and, where the loss has
  parameters sized to the data, ``needs`` (the sizes :func:`contrastive.app.factory.build_loss`
  fills in: ``num_classes``, ``embedding_size``). The upper bounds (``l1out``, ``club``) carry
  ``kind: "upper"``.

MI estimators (:data:`ESTIMATORS`) map a name to ``(loss_fn, bound_fn)`` of
:mod:`losses.functional`: the objective a critic minimises and the bound in nats it reports.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from contrastive.registry import Registry

from . import bounds as LB
from . import estimator_modules as EM
from . import functional as LF
from . import memory as MEM
from . import modules as M
from . import pair_based as PB
from . import proxies as PX
from . import self_supervised as SS

__all__ = ["LOSSES", "ESTIMATORS", "register", "get", "available", "canonical", "pml_names",
           "pml_class", "estimator"]

#: Every loss of the library by name (see the module docstring for ``defaults`` and ``meta``).
LOSSES: Registry[nn.Module] = Registry("loss")

#: MI estimators: name -> ``(loss_fn, bound_fn)``, each a function of
#: ``(scores, positives, negatives)``.
ESTIMATORS: Registry[tuple[Callable, Callable]] = Registry("MI estimator")


def register(name: str, factory: Callable[..., nn.Module], aliases: tuple[str, ...] = (),
             *, defaults: dict[str, Any] | None = None,
             meta: dict[str, Any] | None = None) -> Callable[..., nn.Module]:
    """Add a loss under ``name`` (and ``aliases``) with its ``defaults`` and ``meta``; returns
    ``factory``. A name already taken is a ``ValueError``."""
    return LOSSES.register(name, factory, aliases=aliases, defaults=defaults, meta=meta)


def available(filter: Any = None) -> list[str]:
    """Canonical names of the registered losses; ``filter`` as in
    :meth:`contrastive.registry.Registry.available`, e.g. ``available({"family": "mi"})``."""
    return LOSSES.available(filter)


def canonical(name: str) -> str:
    """The registered name behind ``name`` or an alias; ``ValueError`` listing the choices."""
    return LOSSES.canonical(name)


def pml_names() -> list[str]:
    """The loss classes of pytorch-metric-learning (``pml:<ClassName>`` in :func:`get`)."""
    from pytorch_metric_learning import losses as pml_losses

    return sorted(n for n in dir(pml_losses)
                  if n.endswith("Loss") and isinstance(getattr(pml_losses, n), type))


def pml_class(class_name: str) -> type:
    """The pytorch-metric-learning loss class ``class_name``; ``ValueError`` naming the closest
    one when there is no such class."""
    import difflib

    from pytorch_metric_learning import losses as pml_losses

    cls = getattr(pml_losses, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        near = difflib.get_close_matches(class_name, pml_names(), n=1)
        hint = f"; did you mean 'pml:{near[0]}'?" if near else f"; known: {pml_names()}"
        raise ValueError(f"unknown pytorch-metric-learning loss {class_name!r}{hint}")
    return cls


def defaults(name: str, critic: bool = False) -> dict[str, Any]:
    """The registered defaults of loss ``name``; with ``critic=True`` (a critic replaces the
    loss's score function) without the keywords the critic takes over (its temperature)."""
    entry = LOSSES.get(name)
    out = dict(entry.defaults)
    if critic:
        for key in entry.meta.get("critic_replaces", ()):
            out.pop(key, None)
    return out


def get(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered loss with its registered defaults, e.g. ``get("infonce",
    temperature=0.1)``, or a pytorch-metric-learning loss by ``"pml:ClassName"``, e.g.
    ``get("pml:NTXentLoss", temperature=0.1)`` (as the command line's ``--loss`` does).
    ``kwargs`` override the defaults; a ``critic=`` drops the defaults it replaces."""
    if isinstance(name, str) and name.startswith("pml:"):
        return pml_class(name[4:])(**kwargs)
    entry = LOSSES.get(name)
    return entry.factory(**{**defaults(name, kwargs.get("critic") is not None), **kwargs})


def estimator(name: str) -> tuple[Callable, Callable]:
    """``(loss_fn, bound_fn)`` of the MI estimator ``name`` (``infonce``/``nce``, ``nwj``,
    ``js``, ``dv``/``mine``)."""
    return ESTIMATORS.get(name).factory()


def _ntxent(temperature: float | None = None, critic: nn.Module | None = None,
            **kwargs) -> nn.Module:
    """NT-Xent as PML's ``NTXentLoss``: one term per positive pair, temperature 0.07."""
    if temperature is None and critic is None:
        temperature = 0.07
    return M.InfoNCE(temperature=temperature, critic=critic, positives="pair", **kwargs)


def _supcon(temperature: float | None = None, critic: nn.Module | None = None,
            **kwargs) -> nn.Module:
    """SupCon as PML's ``SupConLoss``: all positives in one term, temperature 0.1."""
    return M.InfoNCE(temperature=temperature, critic=critic, positives="all", **kwargs)


def _temperature(low: float = 0.02, high: float = 1.0) -> dict[str, Any]:
    return {"temperature": {"low": low, "high": high, "log": True}}


_BOTH = ("labels", "views")
_MI = {"family": "mi", "supervision": _BOTH, "critic": True, "critic_replaces": ("temperature",),
       "search_space": _temperature()}

register("infonce", M.InfoNCE, aliases=("nce", "cpc"), defaults={"temperature": 0.1}, meta=_MI)
register("ntxent", _ntxent, aliases=("nt_xent",), defaults={"temperature": 0.07}, meta=_MI)
register("supcon", _supcon, aliases=("sup_con",), defaults={"temperature": 0.1}, meta=_MI)
register("nwj", M.NWJ, defaults={"temperature": 0.1}, meta=_MI)
register("js", M.JS, aliases=("jsd",), defaults={"temperature": 0.1}, meta=_MI)
register("dv", M.DV, aliases=("mine",), defaults={"temperature": 0.1}, meta=_MI)
register("npair", M.MultiClassNPair, aliases=("multiclass_npair", "n_pair", "npairs"),
         defaults={"l2_reg": 0.002},
         meta={"family": "metric", "supervision": _BOTH, "critic": True,
               "search_space": {"l2_reg": {"low": 1e-4, "high": 1e-1, "log": True}}})
register("triplet", M.Triplet, defaults={"margin": 0.2, "mining": "all"},
         meta={"family": "metric", "supervision": _BOTH, "critic": True,
               "search_space": {"margin": {"low": 0.01, "high": 1.0, "log": True},
                                "mining": {"choices": ["all", "semihard", "hard"]}}})
register("contrastive", M.Contrastive, defaults={"pos_margin": 0.0, "neg_margin": 1.0},
         meta={"family": "metric", "supervision": _BOTH, "critic": True,
               "search_space": {"pos_margin": {"low": 0.0, "high": 0.5, "log": False},
                                "neg_margin": {"low": 0.2, "high": 1.5, "log": False}}})

# pair-based losses (losses.pair_based) and proxy losses (losses.proxies); a proxy loss's
# meta["needs"] names the sizes the trainer fills in (number of classes, embedding size)
_LABELS = ("labels",)
_PROXY = {"needs": ("num_classes", "embedding_size")}


def _space(**ranges: tuple) -> dict[str, Any]:
    """``name=(low, high, log)`` -> the ``search_space`` format above."""
    return {k: {"low": lo, "high": hi, "log": log} for k, (lo, hi, log) in ranges.items()}


register("multi_similarity", PB.MultiSimilarity, aliases=("ms", "multisimilarity"),
         defaults={"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1},
         meta={"family": "metric", "supervision": _BOTH, "critic": True,
               "search_space": _space(alpha=(0.5, 10.0, True), beta=(10.0, 100.0, True),
                                      base=(0.0, 0.8, False), epsilon=(0.01, 0.5, True))})
register("circle", PB.Circle, defaults={"m": 0.4, "gamma": 80.0},
         meta={"family": "metric", "supervision": _BOTH, "critic": True,
               "search_space": _space(m=(0.1, 0.5, False), gamma=(16.0, 512.0, True))})
register("lifted_structure", PB.LiftedStructure,
         aliases=("lifted", "generalized_lifted_structure"),
         defaults={"neg_margin": 1.0, "pos_margin": 0.0},
         meta={"family": "metric", "supervision": _BOTH, "critic": True,
               "search_space": _space(neg_margin=(0.2, 1.5, False),
                                      pos_margin=(0.0, 0.5, False))})
register("margin", PB.Margin, aliases=("margin_loss",),
         defaults={"margin": 0.2, "beta": 1.2, "nu": 0.0, "learn_beta": True},
         meta={"family": "metric", "supervision": _BOTH, "critic": True,
               "search_space": _space(margin=(0.01, 0.5, True), beta=(0.5, 1.6, False))})
register("nca", PB.NCA, defaults={"softmax_scale": 1.0},
         meta={"family": "metric", "supervision": _BOTH, "critic": True,
               "search_space": _space(softmax_scale=(1.0, 64.0, True))})
register("proxy_nca", PX.ProxyNCA, aliases=("proxynca",), defaults={"softmax_scale": 1.0},
         meta={"family": "metric", "supervision": _LABELS, "critic": True, **_PROXY,
               "search_space": _space(softmax_scale=(1.0, 64.0, True))})
register("proxy_anchor", PX.ProxyAnchor, aliases=("proxyanchor",),
         defaults={"margin": 0.1, "alpha": 32.0},
         meta={"family": "metric", "supervision": _LABELS, "critic": True, **_PROXY,
               "search_space": _space(margin=(0.0, 0.3, False), alpha=(8.0, 64.0, True))})
register("normalized_softmax", PX.NormalizedSoftmax, aliases=("norm_softmax",),
         defaults={"temperature": 0.05},
         meta={"family": "metric", "supervision": _LABELS, "critic": False, **_PROXY,
               "search_space": _space(temperature=(0.01, 0.5, True))})
register("cosface", PX.CosFace, aliases=("cos_face", "lmcl"),
         defaults={"margin": 0.35, "scale": 64.0},
         meta={"family": "metric", "supervision": _LABELS, "critic": False, **_PROXY,
               "search_space": _space(margin=(0.1, 0.5, False), scale=(16.0, 64.0, True))})
register("arcface", PX.ArcFace, aliases=("arc_face",), defaults={"margin": 28.6, "scale": 64.0},
         meta={"family": "metric", "supervision": _LABELS, "critic": False, **_PROXY,
               "search_space": _space(margin=(10.0, 45.0, False), scale=(16.0, 64.0, True))})

# self-supervised losses (losses.self_supervised) and the memories (losses.memory); the memory
# factories do not gather again (gather=False): the trainer hands the loss the gathered batch
_SSL = {**_MI, "critic_replaces": ("temperature",)}
register("simclr", SS.SimCLR, defaults={"temperature": 0.5}, meta=_SSL)
register("dcl", SS.DCL, aliases=("decoupled",), defaults={"temperature": 0.1},
         meta={**_SSL, "family": "metric"})
register("dclw", SS.DCLW, aliases=("decoupled_weighted",),
         defaults={"temperature": 0.1, "sigma": 0.5},
         meta={**_SSL, "family": "metric",
               "search_space": {**_temperature(), **_space(sigma=(0.1, 1.0, True))}})


def _xbm(loss: str = "supcon", memory_size: int = 4096, embedding_size: int | None = None,
         miner: nn.Module | None = None, gather: bool = False, **loss_kwargs) -> nn.Module:
    """A cross-batch memory (XBM, Wang et al. 2020) around the registered loss ``loss``."""
    return MEM.CrossBatchMemory(get(loss, **loss_kwargs), embedding_size, memory_size, miner,
                                gather)


def _moco_queue(loss: str = "simclr", size: int = 4096, embedding_size: int | None = None,
                init: str = "random", gather: bool = False, **loss_kwargs) -> nn.Module:
    """A MoCo-style FIFO queue of negatives around the registered loss ``loss``."""
    return MEM.NegativeQueue(get(loss, **loss_kwargs), size, embedding_size, init=init,
                             gather=gather)


register("xbm", _xbm, aliases=("cross_batch_memory",),
         defaults={"loss": "supcon", "memory_size": 4096},
         meta={"family": "metric", "supervision": _LABELS, "critic": False,
               "search_space": {"memory_size": {"choices": [1024, 4096, 16384]}}})
register("moco_queue", _moco_queue, aliases=("negative_queue",),
         defaults={"loss": "simclr", "size": 4096},
         meta={"family": "mi", "supervision": ("views",), "critic": False,
               "search_space": {"size": {"choices": [4096, 16384, 65536]}}})

# the rest of the MI estimator family as losses (losses.bounds, losses.estimator_modules)
# TUBA's learned baseline a(y), FLO's shadow head and the conditional q(y|x) of the upper bounds
# are sized to the embedding: meta["needs"] has the trainer fill it in (as for the proxies)
_EMB = {"needs": ("embedding_size",)}
register("tuba", EM.TUBA, defaults={"temperature": 0.1, "log_baseline": 0.0},
         meta={**_MI, **_EMB, "search_space": {**_temperature(),
                                               **_space(log_baseline=(-2.0, 2.0, False))}})
register("mine_ma", EM.MINE, aliases=("mine_corrected",),
         defaults={"temperature": 0.1, "momentum": 0.01},
         meta={**_MI, "search_space": {**_temperature(), **_space(momentum=(1e-3, 0.5, True))}})
register("smile", EM.SMILE, defaults={"temperature": 0.1, "tau": 5.0},
         meta={**_MI, "search_space": {**_temperature(), **_space(tau=(0.5, 20.0, True))}})
register("alpha_infonce", EM.AlphaInfoNCE, aliases=("interpolated_nce",),
         defaults={"temperature": 0.1, "alpha": 0.5},
         meta={**_MI, "search_space": {**_temperature(), **_space(alpha=(0.0, 1.0, False))}})
register("flo", EM.FLO, defaults={"temperature": 0.1},
         meta={**_MI, **_EMB, "search_space": {**_temperature(),
                                               "shadow_hidden": {"choices": [32, 64, 128]}}})
# the upper bounds: their critic is the conditional (no score critic replaces it), trained in
# the same step (losses.estimator_modules._ConditionalBound)
_UPPER = {"family": "mi", "supervision": _BOTH, "critic": False, "kind": "upper", **_EMB,
          "search_space": {"hidden_dim": {"choices": [64, 128, 256]},
                           "layers": {"choices": [1, 2]}}}
register("l1out", EM.L1Out, aliases=("leave_one_out",), defaults={"hidden_dim": 128, "layers": 1},
         meta=_UPPER)
register("club", EM.CLUB, defaults={"hidden_dim": 128, "layers": 1}, meta=_UPPER)

ESTIMATORS.register("infonce", lambda: (LF.infonce, LF.infonce_bound), aliases=("nce", "cpc"),
                    meta={"bound": "I_NCE <= log(batch)", "paper": "van den Oord et al. 2018",
                          "kind": "lower"})
ESTIMATORS.register("nwj", lambda: (LF.nwj, LF.nwj_bound),
                    meta={"bound": "I_NWJ", "paper": "Nguyen, Wainwright & Jordan 2010",
                          "kind": "lower"})
ESTIMATORS.register("js", lambda: (LF.js, LF.js_bound), aliases=("jsd",),
                    meta={"bound": "I_JS (NWJ of the JS-trained critic)",
                          "paper": "Hjelm et al. 2019", "kind": "lower"})
ESTIMATORS.register("dv", lambda: (LF.dv, LF.dv_bound), aliases=("mine",),
                    meta={"bound": "I_DV",
                          "paper": "Donsker & Varadhan 1983; Belghazi et al. 2018",
                          "kind": "lower"})
ESTIMATORS.register("tuba", lambda: (LB.tuba, LB.tuba_bound),
                    meta={"bound": "I_TUBA (log-baseline 0)", "paper": "Poole et al. 2019",
                          "kind": "lower"})
ESTIMATORS.register("mine_ma", lambda: (EM.MINE(momentum=0.01).compute, LB.mine_bound),
                    aliases=("mine_corrected",),
                    meta={"bound": "I_DV, moving-average gradient",
                          "paper": "Belghazi et al. 2018", "kind": "lower"})
ESTIMATORS.register("smile", lambda: (functools.partial(LB.smile, tau=5.0),
                                      functools.partial(LB.smile_bound, tau=5.0)),
                    meta={"bound": "I_SMILE (tau 5)", "paper": "Song & Ermon 2020",
                          "kind": "lower"})
ESTIMATORS.register("alpha_infonce", lambda: (functools.partial(LB.interpolated, alpha=0.5),
                                              functools.partial(LB.interpolated_bound,
                                                                alpha=0.5)),
                    meta={"bound": "I_alpha", "paper": "Poole et al. 2019 eq. 12",
                          "kind": "lower"})
ESTIMATORS.register("l1out", lambda: (LB.conditional_nll, LB.l1out_bound),
                    meta={"bound": "I_L1Out (upper)", "paper": "Poole et al. 2019",
                          "kind": "upper", "critic": "conditional"})
ESTIMATORS.register("club", lambda: (LB.conditional_nll, LB.club_bound),
                    meta={"bound": "I_CLUB (upper)", "paper": "Cheng et al. 2020",
                          "kind": "upper", "critic": "conditional"})
