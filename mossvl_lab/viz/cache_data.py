"""KV-cache adapters for the widgets: a `StreamState` and cache-policy events as plain dicts (JSON-able).

Only public cache API is read (`TextKVCache.layer/length/memory_bytes`, `VisionKVCache.segments/layer`), so the
numbers equal what the caches themselves report.
"""

from __future__ import annotations

import math
from typing import Any

from ..streaming.events import CacheEvicted, Event, FrameDropped


def cache_summary(state: Any) -> dict[str, int]:
    """Totals of a StreamState: cached text tokens, frames, vision tokens and bytes (K + V, all layers)."""
    text, vision = state.text, state.vision
    return {"text_tokens": int(text.length), "text_bytes": int(text.memory_bytes()),
            "vision_frames": int(vision.num_frames), "vision_tokens": int(vision.num_tokens),
            "vision_bytes": int(vision.memory_bytes()), "bytes": int(state.memory_bytes()),
            "allocated_bytes": int(text.allocated_bytes() + vision.allocated_bytes()),
            "frames_evicted": int(vision.frames_evicted)}


def _kv_bytes(keys: Any, values: Any) -> int:
    return int(keys.numel() * keys.element_size() + values.numel() * values.element_size())


def cache_layers(state: Any, config: Any) -> list[dict[str, Any]]:
    """One row per decoder layer: its kind ("self" or "cross"), and the tokens and bytes its cache holds.

    Self-attention layers hold text K/V [batch, kv_head, pos, d_head]; cross-attention layers hold vision K/V
    [batch, kv_head, vis, d_head] over every cached frame."""
    cross = set(config.text.cross_attention_layers)
    rows = []
    for layer in range(config.text.num_layers):
        cache = state.vision if layer in cross else state.text
        try:
            keys, values = cache.layer(layer)
        except KeyError:  # nothing cached for this layer yet (no frame seen, or no forward ran)
            tokens = size = 0
        else:
            tokens, size = int(keys.shape[2]), _kv_bytes(keys, values)
        rows.append({"layer": layer, "kind": "cross" if layer in cross else "self", "tokens": tokens, "bytes": size})
    return rows


def frame_segments(state: Any, config: Any) -> list[dict[str, Any]]:
    """One row per cached frame: frame index, timestamp (None if the frame had none), placeholder position,
    span on the vis axis, tokens, bytes over all cross layers and per cross layer, pool factor."""
    layers = max(len(config.text.cross_attention_layers), 1)
    rows = []
    for seg in list(state.vision.segments):  # copy: a policy may replace the list between steps
        ts = seg.timestamp
        rows.append({"frame_index": seg.frame_index, "timestamp": None if ts is None else float(ts),
                     "position": seg.position, "start": seg.token_span[0], "end": seg.token_span[1],
                     "tokens": seg.token_span[1] - seg.token_span[0], "bytes": seg.bytes,
                     "bytes_per_layer": seg.bytes // layers, "pool_factor": seg.pool_factor})
    return rows


def cache_event(event: Event, step: int) -> dict[str, Any] | None:
    """A cache-policy event (CacheEvicted, FrameDropped) as a row of the eviction timeline; None otherwise."""
    if isinstance(event, CacheEvicted):
        return {"step": step, "event": "evicted", "kind": event.kind, "policy": event.policy, "count": event.count,
                "bytes_freed": event.bytes_freed, "timestamp": None}
    if isinstance(event, FrameDropped):
        ts = None if math.isnan(event.timestamp) else float(event.timestamp)
        return {"step": step, "event": "frame_dropped", "kind": "vision", "policy": event.reason, "count": 1,
                "bytes_freed": 0, "timestamp": ts}
    return None
