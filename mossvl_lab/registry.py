"""Name -> constructor for every swappable slot (vision tower, rope, ...).

Components register themselves at import; `build(slot, kind, ...)` looks one up by exact name and
names the alternatives when the kind is unknown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}


class UnknownComponentError(KeyError):
    """No component of that kind is registered for the slot."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register(slot: str, kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(ctor: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY.setdefault(slot, {})[kind] = ctor
        return ctor
    return decorator


def choices(slot: str) -> list[str]:
    return sorted(_REGISTRY.get(slot, {}))


def build(slot: str, kind: str, *args: Any, **kwargs: Any) -> Any:
    table = _REGISTRY.get(slot, {})
    if kind not in table:
        raise UnknownComponentError(f"no {slot} component named {kind!r}; registered: {choices(slot) or 'none'}")
    return table[kind](*args, **kwargs)
