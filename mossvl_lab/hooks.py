"""Named hook sites (TransformerLens style) and scoped hook attachment.

A `HookPoint` is an identity module placed at a fixed site of the forward pass. Its name is assigned
when the model is built (`name_hook_points`). Hooks are attached only through scoped contexts that
remove them in `finally`, so an exception inside a hook never leaves the model dirty.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

HookFn = Callable[..., "torch.Tensor | None"]


class HookError(ValueError):
    """A hook name does not exist on this model, or a hook function is unusable."""


class HookPoint(nn.Module):
    """Identity at a named site; `fn(tensor, hook=self)` may return a replacement tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self._fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        return bool(self._fns)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # An idle site must cost almost nothing (the instrumented model stays within ~3% of an uninstrumented
        # one), so skip nn.Module's call machinery; hooks attach through `attach`, never torch module hooks.
        return self.forward(x) if self._fns else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self._fns:
            out = fn(x, hook=self)
            if out is not None:
                x = out
        return x

    def extra_repr(self) -> str:
        return self.name


def name_hook_points(root: nn.Module, rename: Callable[[str], str] = lambda s: s) -> dict[str, HookPoint]:
    """Give every HookPoint under `root` its public name (module path, optionally rewritten)."""
    points = {}
    for parent in root.modules():
        for attr, child in parent.named_children():
            if isinstance(child, HookPoint):
                # also an instance attribute: `self.hook_x(...)` then skips nn.Module.__getattr__, which matters
                # at ~150 idle sites per forward; `_modules` still owns it for named_modules and moves
                object.__setattr__(parent, attr, child)
    for path, module in root.named_modules():
        if isinstance(module, HookPoint):
            module.name = rename(path)
            points[module.name] = module
    return points


def _resolve(points: dict[str, HookPoint], name_or_filter: str | Callable[[str], bool]) -> list[HookPoint]:
    if callable(name_or_filter):
        return [p for n, p in points.items() if name_or_filter(n)]
    if name_or_filter in points:
        return [points[name_or_filter]]
    if any(ch in name_or_filter for ch in "*?["):
        pattern = re.compile("^" + re.escape(name_or_filter).replace(r"\*", ".*").replace(r"\?", ".") + "$")
        found = [p for n, p in points.items() if pattern.match(n)]
        if found:
            return found
    close = [n for n in points if name_or_filter.split(".")[-1] in n][:5]
    raise HookError(f"no hook point named {name_or_filter!r}; similar: {close or 'none'} "
                    f"(model.hook_names() lists all)")


@contextlib.contextmanager
def attach(points: dict[str, HookPoint],
           hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]]) -> Iterator[None]:
    """Attach `(name or filter, fn)` pairs for the duration of the block; always detached on exit."""
    attached: list[tuple[HookPoint, HookFn]] = []
    try:
        for name, fn in hooks:
            if not callable(fn):
                raise HookError(f"hook for {name!r} is not callable")
            for point in _resolve(points, name):
                point._fns.append(fn)
                attached.append((point, fn))
        yield
    finally:
        for point, fn in reversed(attached):
            point._fns.remove(fn)


class ActivationCache:
    """Activations recorded by `run_with_cache`, indexed by hook name."""

    def __init__(self, store: dict[str, torch.Tensor]) -> None:
        self._store = store

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._store:
            raise KeyError(f"{name!r} was not recorded; recorded: {len(self._store)} names, e.g. "
                           f"{list(self._store)[:3]}")
        return self._store[name]

    def __contains__(self, name: object) -> bool:
        return name in self._store

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def keys(self) -> list[str]:
        return list(self._store)

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._store.items())

    def to(self, device: str | torch.device) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self._store.items()})

    def cpu(self) -> "ActivationCache":
        return self.to("cpu")

    def memory_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._store.values())

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} tensors, {self.memory_bytes() / 2**20:.2f} MiB)"


def recording_hooks(points: dict[str, HookPoint], names_filter: Any, device: str | None,
                    store: dict[str, torch.Tensor]) -> list[tuple[str, HookFn]]:
    """Hooks that copy each selected activation into `store` (detached, optionally moved)."""
    if names_filter is None:
        selected = list(points)
    elif isinstance(names_filter, str):
        selected = [p.name for p in _resolve(points, names_filter)]
    elif callable(names_filter):
        selected = [n for n in points if names_filter(n)]
    else:
        selected = [p.name for n in names_filter for p in _resolve(points, n)]

    def record(x: torch.Tensor, hook: HookPoint) -> None:
        value = x.detach()
        store[hook.name] = value.to(device) if device is not None else value

    return [(name, record) for name in selected]
