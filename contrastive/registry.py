"""One small registry type for everything the library builds by name: losses, critics, data sets,
MI estimators and experiments (in the spirit of timm's model registry).

A :class:`Registry` maps a canonical name (and its aliases) to an :class:`Entry`: the factory,
the keyword defaults that go with the name (they live here, once, and every caller -- the
trainer, ``compare``, the command line -- gets them through :meth:`Registry.create`) and free
metadata the application reads (a loss's family, whether it needs labels or views, the
hyper-parameters worth tuning and their ranges; which size argument a critic takes).

Names are matched case-insensitively, with ``-`` and spaces read as ``_``; an unknown name is a
``ValueError`` that lists the choices and names the closest one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "Entry", "normalize_name"]

T = TypeVar("T")


def normalize_name(name: str) -> str:
    """The registry key of ``name``: stripped, lower case, ``-`` and spaces as ``_``."""
    return "_".join(name.strip().lower().replace("-", " ").split())


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: ``factory(**{**defaults, **kwargs})`` builds it."""

    name: str
    factory: Callable[..., T]
    aliases: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def create(self, **kwargs: Any) -> T:
        """Build with the registered defaults, ``kwargs`` taking precedence."""
        return self.factory(**{**self.defaults, **kwargs})


class Registry(Generic[T]):
    """Names -> :class:`Entry` for one kind of thing (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    # ------------------------------------------------------------------ registering
    def register(
        self,
        name: str,
        factory: Callable[..., T] | None = None,
        *,
        aliases: tuple[str, ...] | list[str] = (),
        defaults: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Any:
        """Add ``factory`` under ``name`` and ``aliases``; returns ``factory``. Without
        ``factory`` it is a decorator: ``@registry.register("name", defaults={...})``.
        A name or alias already taken is a ``ValueError`` (nothing is overwritten silently)."""
        if factory is None:
            return lambda f: self.register(name, f, aliases=aliases, defaults=defaults, meta=meta)
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise TypeError(f"factory must be callable, got {type(factory).__name__}")
        key = normalize_name(name)
        keys = [key, *(normalize_name(a) for a in aliases)]
        for k in keys:
            if k in self._entries or k in self._aliases:
                raise ValueError(f"a {self.kind} named {k!r} is already registered")
        self._entries[key] = Entry(
            key, factory, tuple(keys[1:]),
            MappingProxyType(dict(defaults or {})), MappingProxyType(dict(meta or {})),
        )
        for a in keys[1:]:
            self._aliases[a] = key
        return factory

    # ------------------------------------------------------------------ looking up
    def canonical(self, name: str) -> str:
        """The registered name behind ``name`` or one of its aliases."""
        if not isinstance(name, str):
            raise TypeError(f"a {self.kind} name must be a string, got {type(name).__name__}")
        key = normalize_name(name)
        key = self._aliases.get(key, key)
        if key not in self._entries:
            near = difflib.get_close_matches(key, [*self._entries, *self._aliases], n=1)
            hint = f"; did you mean {self._aliases.get(near[0], near[0])!r}?" if near else ""
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.available()}"
                             f"{hint}")
        return key

    def get(self, name: str) -> Entry[T]:
        """The :class:`Entry` of ``name`` (factory, defaults, metadata)."""
        return self._entries[self.canonical(name)]

    def create(self, name: str, **kwargs: Any) -> T:
        """Build ``name`` with its registered defaults; ``kwargs`` override them."""
        return self.get(name).create(**kwargs)

    def defaults(self, name: str) -> dict[str, Any]:
        """The keyword defaults registered with ``name`` (a copy)."""
        return dict(self.get(name).defaults)

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata registered with ``name`` (a copy)."""
        return dict(self.get(name).meta)

    def available(self, filter: Callable[[Entry[T]], bool] | Mapping[str, Any] | None = None,
                  ) -> list[str]:
        """Sorted canonical names; ``filter`` keeps entries for which it returns true, or (a
        mapping) whose metadata has those values, e.g. ``available({"family": "mi"})``."""
        if filter is None:
            return sorted(self._entries)
        if isinstance(filter, Mapping):
            wanted = dict(filter)
            return sorted(k for k, e in self._entries.items()
                          if all(e.meta.get(m) == v for m, v in wanted.items()))
        return sorted(k for k, e in self._entries.items() if filter(e))

    def aliases(self) -> dict[str, str]:
        """Alias -> canonical name."""
        return dict(self._aliases)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = normalize_name(name)
        return key in self._entries or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.available()})"
