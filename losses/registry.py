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


def get(name: str, **kwargs) -> nn.Module:
    """Build a registered loss, e.g. ``get("infonce", temperature=0.1)``."""
    return _REGISTRY[canonical(name)](**kwargs)


register("infonce", M.InfoNCE, aliases=("nce", "ntxent", "nt_xent", "supcon", "cpc"))
register("nwj", M.NWJ)
register("js", M.JS, aliases=("jsd",))
register("dv", M.DV, aliases=("mine",))
register("npair", M.MultiClassNPair, aliases=("multiclass_npair", "n_pair", "npairs"))
register("triplet", M.Triplet)
register("contrastive", M.Contrastive)
