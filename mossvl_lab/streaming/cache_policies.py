"""Cache policies: what a long session forgets, applied to the `StreamState` between steps.

A policy has a `name` and `apply(state) -> list[Event]`; it edits the caches in place and reports what it
removed (`CacheEvicted`, plus one `FrameDropped` per evicted frame). A session holds a list and applies them in
order after every step (`apply_policies`). Nothing is ever re-indexed: vision keys and text keys are cached
already rotated and the position cursor keeps running, so windowing changes what later tokens can attend to,
not where they sit (spec moss-vl §3.5 and §8.3 "Long sessions").

    session = ml.RealtimeSession(model, processor, cache_policy=[
        PoolAged(after_frames=30, factor=2).for_model(model),   # frames older than the newest 30: half the tokens
        VisionWindow(seconds=60.0),                            # forget frames more than 60 s older than the newest
        TextWindow(sinks=256, window=4096),                    # system prompt + recent text
    ])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from ..cache import StreamState
from .events import CacheEvicted, Event, FrameDropped


@runtime_checkable
class CachePolicy(Protocol):
    name: str

    def apply(self, state: StreamState) -> list[Event]:
        """Edit `state`'s caches in place; return the events describing what was removed (possibly none)."""
        ...


def apply_policies(policies: Iterable[CachePolicy], state: StreamState) -> list[Event]:
    """Apply policies in order (each sees what the previous left) and collect their events."""
    events: list[Event] = []
    for policy in policies:
        events += policy.apply(state)
    return events


def _check_int(owner: str, field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {field} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Unbounded:
    """Keep everything (both families' trained behaviour; memory grows with the stream)."""

    name: str = dataclasses.field(default="unbounded", init=False)

    def apply(self, state: StreamState) -> list[Event]:
        return []


@dataclasses.dataclass(frozen=True)
class VisionWindow:
    """Keep the newest `frames` frames, or the frames whose timestamp is within `seconds` of the latest cached
    timestamp (a frame exactly `seconds` older stays).

    Only the oldest frames are ever evicted (a prefix of the cache): with out-of-order timestamps the window
    stops at the oldest frame still inside it. `seconds` needs frame timestamps (pass `frame_timestamps` to the
    forward; sessions do). Emits one `FrameDropped(reason="window")` per frame (timestamp NaN when the frame had
    none) and one `CacheEvicted(kind="vision", policy="window", count=frames)`.
    """

    frames: int | None = None
    seconds: float | None = None
    name: str = dataclasses.field(default="window", init=False)

    def __post_init__(self) -> None:
        if (self.frames is None) == (self.seconds is None):
            raise ValueError(f"VisionWindow: give exactly one of frames=N or seconds=S "
                             f"(got frames={self.frames!r}, seconds={self.seconds!r})")
        if self.frames is not None:
            _check_int("VisionWindow", "frames", self.frames, 1)
        elif isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) or \
                not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError(f"VisionWindow: seconds must be a finite number >= 0, got {self.seconds!r}")

    def to_evict(self, state: StreamState) -> int:
        """How many of the oldest cached frames fall outside the window."""
        segments = state.vision.segments
        if self.frames is not None:
            return max(len(segments) - self.frames, 0)
        if not segments:
            return 0
        stamps = [seg.timestamp for seg in segments]
        if any(ts is None for ts in stamps):
            raise ValueError("VisionWindow(seconds=...) needs every cached frame's timestamp; some frames have "
                             "none (pass frame_timestamps=[...] with the frames, or use VisionWindow(frames=N))")
        oldest_kept = max(stamps) - self.seconds
        count = 0
        while count < len(stamps) and stamps[count] < oldest_kept:
            count += 1
        return count

    def apply(self, state: StreamState) -> list[Event]:
        count = self.to_evict(state)
        if not count:
            return []
        removed, freed = state.vision.drop_frames(count)
        events: list[Event] = [FrameDropped(timestamp=float("nan") if seg.timestamp is None else float(seg.timestamp),
                                            reason=self.name) for seg in removed]
        events.append(CacheEvicted(kind="vision", policy=self.name, count=len(removed), bytes_freed=freed))
        return events


@dataclasses.dataclass(frozen=True)
class PoolAged:
    """Once a frame is older than the newest `after_frames`, mean-pool its K/V once by `factor`
    (see `VisionKVCache.pool_frames`): consecutive groups of `factor` tokens become one; `keep_first` leading
    and `keep_last` trailing tokens of each frame stay as they are. `for_model(model)` sets those for the
    model's tower (Mllama-style: the CLS token first; MOSS-VL: the separator last).

    Emits `CacheEvicted(kind="vision", policy="pool", count=vision tokens removed)`; no frame is dropped.
    """

    after_frames: int
    factor: int
    keep_first: int = 0
    keep_last: int = 0
    name: str = dataclasses.field(default="pool", init=False)

    def __post_init__(self) -> None:
        _check_int("PoolAged", "after_frames", self.after_frames, 0)
        _check_int("PoolAged", "factor", self.factor, 2)
        _check_int("PoolAged", "keep_first", self.keep_first, 0)
        _check_int("PoolAged", "keep_last", self.keep_last, 0)

    def for_model(self, model: Any) -> "PoolAged":
        """The same policy, keeping the tokens this model's tower puts around each frame's grid."""
        vision = model.config.vision
        return dataclasses.replace(self, keep_first=1 if vision.kind == "mllama_vit" else 0,
                                   keep_last=1 if getattr(vision, "separator", False) else 0)

    def apply(self, state: StreamState) -> list[Event]:
        vision = state.vision
        aged = [i for i, seg in enumerate(vision.segments[:max(vision.num_frames - self.after_frames, 0)])
                if seg.pool_factor == 1]
        if not aged:
            return []
        tokens = vision.num_tokens
        freed = vision.pool_frames(aged, self.factor, keep_first=self.keep_first, keep_last=self.keep_last)
        if tokens == vision.num_tokens:
            return []
        return [CacheEvicted(kind="vision", policy=self.name, count=tokens - vision.num_tokens, bytes_freed=freed)]


@dataclasses.dataclass(frozen=True)
class TextWindow:
    """Attention sinks + a recent window over the text cache: keep the first `sinks` cached text tokens and
    the newest `window`, drop everything between. Applied after every step, the text cache never holds more than
    sinks + window + the tokens of one step. Positions keep running (the cursor is not touched), so later
    tokens keep their true positions; the dropped tokens simply become invisible.
    Emits `CacheEvicted(kind="text", policy="text_window", count=tokens)`.
    """

    sinks: int
    window: int
    name: str = dataclasses.field(default="text_window", init=False)

    def __post_init__(self) -> None:
        _check_int("TextWindow", "sinks", self.sinks, 0)
        _check_int("TextWindow", "window", self.window, 1)

    def apply(self, state: StreamState) -> list[Event]:
        length = state.text.length
        if length <= self.sinks + self.window:
            return []
        start, end = self.sinks, length - self.window
        freed = state.text.drop(start, end)
        return [CacheEvicted(kind="text", policy=self.name, count=end - start, bytes_freed=freed)]
