"""Interventions as small functions that return hook lists for `model.hooks(...)` or read an ActivationCache.

    with model.hooks(zero_gates(model)):                       # remove cross-attention entirely
        ...
    with model.hooks(ablate_frames([2], mode="mean")):          # frame 2's vision tokens -> mean of all frames
        ...
    with model.hooks(hide_frames(model, frames=[0], rows=slice(10, None))):
        ...
    _, source = model.run_with_cache(**clip_b)
    with model.hooks(patch_from(source, ["vision.hook_frame_tokens"])):   # activation patching across clips
        patched = model(**clip_a)
    mass = frame_attention_mass(cache["blocks.3.cross_attn.hook_pattern"], state.vision.key_frame)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .hooks import ActivationCache, HookFn

HookList = list[tuple[Any, HookFn]]


def _cross_layers(model: Any, layers: Iterable[int] | None) -> list[int]:
    return list(model.config.text.cross_attention_layers if layers is None else layers)


def set_gates(model: Any, value: float, layers: Iterable[int] | None = None,
              branch: str = "both") -> HookList:
    """Replace the applied gate value (after tanh) of the chosen cross-attention layers and branches."""
    if branch not in ("both", "attn", "mlp"):
        raise ValueError(f"branch {branch!r}; expected 'both', 'attn' or 'mlp'")
    names = [f"blocks.{layer}.hook_{kind}_gate" for layer in _cross_layers(model, layers)
             for kind in (("attn", "mlp") if branch == "both" else (branch,))]
    return [(name, lambda gate, hook: torch.full_like(gate, value)) for name in names]


def zero_gates(model: Any, layers: Iterable[int] | None = None, branch: str = "both") -> HookList:
    return set_gates(model, 0.0, layers, branch)


def ablate_frames(frames: Sequence[int], mode: str = "zero",
                  tokens_per_frame: Sequence[int] | None = None) -> HookList:
    """Zero- or mean-ablate the vision tokens of the given frames (indices among the frames of this forward).

    For towers whose `vision.hook_frame_tokens` is [frame, vis_per_frame, d_model] nothing else is needed; for
    packed towers (MOSS-VL, [vis, d_model]) pass `tokens_per_frame` (e.g. `model.vision.tokens_for_grid(grid_thw)`).
    "mean" replaces a frame's tokens by the mean token over all frames of the forward.
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode {mode!r}; expected 'zero' or 'mean'")

    def edit(tokens: torch.Tensor, hook) -> torch.Tensor:
        out = tokens.clone()
        if tokens_per_frame is None:  # [frame, vis_per_frame, d_model]
            fill = tokens.mean(dim=(0, 1)) if mode == "mean" else 0.0
            for f in frames:
                out[f] = fill
            return out
        bounds = torch.tensor([0, *tokens_per_frame]).cumsum(0).tolist()  # packed [vis, d_model]
        fill = tokens.mean(dim=0) if mode == "mean" else 0.0
        for f in frames:
            out[bounds[f]:bounds[f + 1]] = fill
        return out

    return [("vision.hook_frame_tokens", edit)]


def hide_frames(model: Any, frames: Sequence[int], rows: slice | Sequence[int] | None = None,
                layers: Iterable[int] | None = None) -> HookList:
    """Make the chosen query rows (default: all) unable to see the given frames in the chosen layers.
    Rows left seeing no frame then get no cross-attention contribution at all (row mask)."""

    def edit(visibility: torch.Tensor, hook) -> torch.Tensor:  # [batch, query_pos, frame] bool
        out = visibility.clone()
        picked = slice(None) if rows is None else rows
        for f in frames:
            if f < out.shape[2]:
                out[:, picked, f] = False
        return out

    return [(f"blocks.{layer}.cross_attn.hook_visibility", edit) for layer in _cross_layers(model, layers)]


def patch_from(source: ActivationCache, names: Iterable[str] | Callable[[str], bool] | None = None) -> HookList:
    """Replace activations with those recorded from another run (same shapes), e.g. clip B into clip A."""
    if names is None:
        selected = list(source)
    elif callable(names):
        selected = [n for n in source if names(n)]
    else:
        selected = list(names)

    def make(name: str) -> HookFn:
        def patch(x: torch.Tensor, hook) -> torch.Tensor:
            value = source[name]
            if value.shape != x.shape:
                raise ValueError(f"cannot patch {name}: source {tuple(value.shape)} vs run {tuple(x.shape)}")
            return value.to(device=x.device, dtype=x.dtype)
        return patch

    return [(name, make(name)) for name in selected]


def frame_attention_mass(pattern: torch.Tensor, key_frame: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
    """Cross-attention mass each query puts on each frame.

    pattern [batch, head, query_pos, vis] (a cross_attn.hook_pattern); key_frame [batch, vis] (the vision
    cache's frame of every key, -1 padding) -> [batch, head, query_pos, frame]. Rows sum to 1 over frames
    (0 for rows that see no frame).
    """
    frames = num_frames if num_frames is not None else int(key_frame.max()) + 1
    index = key_frame.clamp(min=0)[:, None, None, :].expand_as(pattern)
    weights = pattern * (key_frame >= 0)[:, None, None, :].to(pattern.dtype)
    out = pattern.new_zeros(*pattern.shape[:3], frames)
    return out.scatter_add_(3, index, weights)
