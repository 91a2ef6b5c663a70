"""One string-keyed registry for every pluggable family (backbones, adapters, sources, augmentations, scalers, rules,
certification methods, optimisers), in timm's habit: a module registers entries with a decorator and exposes
``create_<kind>`` (build an object) and ``list_<kind>s`` over a :class:`Registry`.

Every registry behaves the same: a duplicate name is refused at import time, and an unknown name raises
:class:`~roadwork_cli.errors.UnknownNameError` (exit 2) naming the choices and the closest one.

Example:
    >>> SCALERS = Registry("probability scaler")
    >>> @SCALERS.register("identity", "p unchanged")
    ... def identity(): return lambda p: p
    >>> SCALERS.names(), SCALERS.describe()
    (['identity'], {'identity': 'p unchanged'})
    >>> SCALERS.get("identiy")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    roadwork_cli.errors.UnknownNameError: Unknown probability scaler 'identiy' (did you mean 'identity'?); ...
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from roadwork_cli.errors import UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, each with a one-line description.

    Args:
        kind: What an entry is, for messages ("backbone", "data source", ...).
        hint: Appended to the unknown-name message, e.g. other accepted spellings ("or 'timm:<name>'").
    """

    def __init__(self, kind: str, hint: str = ""):
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    def add(self, name: str, entry: T, description: str = "") -> T:
        """Register ``entry`` under ``name``; the description defaults to the first line of its docstring.

        Raises:
            ValueError: ``name`` is already registered (a programming error, raised at import time).
        """
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        doc = (getattr(entry, "__doc__", None) or "").strip()
        self._descriptions[name] = description or (doc.splitlines()[0] if doc else "")
        return entry

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorate(entry: T) -> T:
            return self.add(name, entry, description)

        return decorate

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            UnknownNameError: No such entry; the message lists the choices and suggests the closest.
        """
        if name not in self._entries:
            raise UnknownNameError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        """The one-paragraph error for an unknown ``name`` (for callers that accept other spellings first)."""
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        hint = f" {self.hint}" if self.hint else ""
        return f"Unknown {self.kind} {name!r}{suggestion}; choose one of: {', '.join(self.names())}.{hint}"

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        """``{name: one-line description}``, sorted by name."""
        return {name: self._descriptions[name] for name in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
