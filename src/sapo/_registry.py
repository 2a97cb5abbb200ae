"""A name -> object table shared by the registries of objectives, reward functions and tasks."""

from __future__ import annotations

import difflib
from typing import Generic, Iterable, TypeVar

T = TypeVar("T")


def unknown_name_message(field_name: str, value: object, known: Iterable[str]) -> str:
    names = sorted(known)
    close = difflib.get_close_matches(str(value), names, n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"{field_name}={value!r} is not known; choose one of {names}.{hint}"


class Registry(Generic[T]):
    """Entries by name. Registering something else under a taken name is an error, so a typo
    cannot silently replace a built-in; re-registering the same object is harmless."""

    def __init__(self, field_name: str) -> None:
        self.field_name = field_name  # the config field or argument that takes these names
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T, *, replace: bool = False) -> T:
        """`replace`: another object may take the name (a function defined again in a notebook)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.field_name}: a registered name must be a non-empty string, got {name!r}")
        existing = self._entries.get(name)
        if existing is not None and existing is not entry and not replace:
            raise ValueError(f"{self.field_name}: {name!r} is already registered ({existing!r}); choose another name")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(unknown_name_message(self.field_name, name, self._entries)) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
