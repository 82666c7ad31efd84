"""A timm-style registry of losses: ``losses.get(name, **kwargs)``, ``losses.available()``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from . import modules as M

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register(name: str, factory: Callable[..., nn.Module], aliases: tuple[str, ...] = ()):
    """Add a loss under ``name`` (and ``aliases``); returns ``factory`` so it works as a helper."""
    key = _key(name)
    if key in _REGISTRY or key in _ALIASES:
        raise ValueError(f"a loss named {name!r} is already registered")
    _REGISTRY[key] = factory
    for a in aliases:
        _ALIASES[_key(a)] = key
    return factory


def available() -> list[str]:
    """Canonical names of the registered losses."""
    return sorted(_REGISTRY)


def canonical(name: str) -> str:
    """The registered name behind ``name`` or an alias; ``ValueError`` listing the choices."""
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown loss {name!r}; choose one of {available()} "
            f"(aliases: {sorted(_ALIASES)})"
        )
    return key


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


def get(name: str, **kwargs) -> nn.Module:
    """Build a registered loss, e.g. ``get("infonce", temperature=0.1)``, or a
    pytorch-metric-learning loss by ``"pml:ClassName"``, e.g. ``get("pml:NTXentLoss",
    temperature=0.1)`` (as the command line's ``--loss`` does)."""
    if isinstance(name, str) and name.startswith("pml:"):
        return pml_class(name[4:])(**kwargs)
    return _REGISTRY[canonical(name)](**kwargs)


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


register("infonce", M.InfoNCE, aliases=("nce", "cpc"))
register("ntxent", _ntxent, aliases=("nt_xent",))
register("supcon", _supcon, aliases=("sup_con",))
register("nwj", M.NWJ)
register("js", M.JS, aliases=("jsd",))
register("dv", M.DV, aliases=("mine",))
register("npair", M.MultiClassNPair, aliases=("multiclass_npair", "n_pair", "npairs"))
register("triplet", M.Triplet)
register("contrastive", M.Contrastive)
