"""Component swaps for ablations: build a variant config and carry over every weight that still fits.

    variant_cfg = ml.config.override(model.config, {"text.rope.kind": "default", "cross_attention.key_rope": "frame"})
    variant = ml.build_model(variant_cfg, init_from=model)
    print(variant.swap_report)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class SwapReport:
    reused: tuple[str, ...]          # copied from the source model (same name and shape)
    reinitialised: tuple[str, ...]   # new, or of a different shape: fresh initialisation
    dropped: tuple[str, ...]         # in the source only (the swapped-out component's weights)
    reshaped: tuple[str, ...]        # subset of reinitialised whose name existed with another shape

    def __str__(self) -> str:
        def show(names: tuple[str, ...]) -> str:
            return ", ".join(names[:6]) + (f", ... (+{len(names) - 6})" if len(names) > 6 else "")

        return (f"swap: {len(self.reused)} tensors reused, {len(self.reinitialised)} re-initialised"
                f"{' [' + show(self.reinitialised) + ']' if self.reinitialised else ''}, {len(self.dropped)} dropped"
                f"{' [' + show(self.dropped) + ']' if self.dropped else ''}")


def transfer_weights(target: nn.Module, source: nn.Module) -> SwapReport:
    """Copy every tensor of `source` whose name and shape exist in `target` (in place) and report the rest."""
    src, tgt = source.state_dict(), target.state_dict()
    reused, reinit, reshaped = [], [], []
    with torch.no_grad():
        for name, tensor in tgt.items():
            match = src.get(name)
            if match is not None and match.shape == tensor.shape:
                tensor.copy_(match.to(tensor.dtype))
                reused.append(name)
            else:
                reinit.append(name)
                if match is not None:
                    reshaped.append(name)
    dropped = [name for name in src if name not in tgt]
    return SwapReport(tuple(reused), tuple(reinit), tuple(dropped), tuple(reshaped))


def swap(model: Any, changes: dict[str, Any]) -> tuple[Any, SwapReport]:
    """`override(model.config, changes)` built with `init_from=model`: (variant, report)."""
    from .config import override
    from .model import build_model

    variant = build_model(override(model.config, changes), init_from=model)
    return variant.train(model.training), variant.swap_report
