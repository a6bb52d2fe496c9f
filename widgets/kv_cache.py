"""KVCacheInspector: what a session's caches hold, per layer and per frame, and what cache policies removed.

It follows a stream in one of two ways: as a listener of a StreamStepper or LiveStream (refreshed after every
step, in the thread that stepped, so it never reads a cache mid-step), or by polling: with `live` on, the front
end sends {"type": "refresh"} every `poll_ms` milliseconds. Eviction and pooling events are only seen as a
listener (or through `record(events)`); polling sees their effect on the totals.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anywidget
import traitlets as t

from mossvl_lab.viz.cache_data import cache_event, cache_layers, cache_summary, frame_segments

from ._common import CSS, esm, WidgetInputError

MAX_EVENTS = 500    # newest eviction rows kept
MAX_HISTORY = 600   # newest per-step totals kept


class KVCacheInspector(anywidget.AnyWidget):
    _esm = esm("kv_cache.js")
    _css = CSS

    layers = t.List(t.Dict()).tag(sync=True)      # cache_data.cache_layers rows
    segments = t.List(t.Dict()).tag(sync=True)    # cache_data.frame_segments rows
    totals = t.Dict().tag(sync=True)              # cache_data.cache_summary
    events = t.List(t.Dict()).tag(sync=True)      # cache_data.cache_event rows, oldest first
    history = t.List(t.Dict()).tag(sync=True)     # {"step", "text_bytes", "vision_bytes", "frames"} per refresh
    step = t.Int(0).tag(sync=True)                # the session's decision count at the last refresh
    live = t.Bool(False).tag(sync=True)
    poll_ms = t.Int(1000).tag(sync=True)

    source: Any = None  # set first in __init__; close() (also run from __del__) may see an instance without it

    def __init__(self, source: Any, *, live: bool = False, poll_ms: int = 1000) -> None:
        """source: a RealtimeSession, or a StreamStepper / LiveStream (followed: refreshed after each step)."""
        if not hasattr(source, "session") and not hasattr(source, "stream"):
            raise WidgetInputError(f"KVCacheInspector needs a RealtimeSession, StreamStepper or LiveStream, got "
                                   f"{type(source).__name__}")
        if isinstance(poll_ms, bool) or not isinstance(poll_ms, int) or poll_ms < 50:
            raise WidgetInputError(f"poll_ms must be an integer >= 50 (milliseconds), got {poll_ms!r}")
        self.source = source
        super().__init__(live=live, poll_ms=poll_ms)
        if hasattr(source, "add_listener"):
            source.add_listener(self._on_step)
        self.on_msg(self._on_front_end_msg)
        self.refresh()

    @property
    def session(self) -> Any:
        """The session inspected now (a LiveStream starts a new one on every start)."""
        return self.source.session if hasattr(self.source, "add_listener") else self.source

    def refresh(self) -> None:
        """Read the caches now and update every trait."""
        session = self.session
        if session is None:
            return
        state, config = session.stream, session.model.config
        totals = cache_summary(state)
        step = session.state.step
        row = {"step": step, "text_bytes": totals["text_bytes"], "vision_bytes": totals["vision_bytes"],
               "frames": totals["vision_frames"]}
        history = self.history if self.history and self.history[-1]["step"] == step else self.history + [row]
        with self.hold_sync():
            self.layers = cache_layers(state, config)
            self.segments = frame_segments(state, config)
            self.totals = totals
            self.step = step
            self.history = history[-MAX_HISTORY:]

    def record(self, events: list) -> None:
        """Add the cache-policy events among `events` (one step's) to the eviction timeline."""
        step = self.session.state.step if self.session is not None else 0
        rows = [row for row in (cache_event(e, step) for e in events) if row is not None]
        if rows:
            self.events = (self.events + rows)[-MAX_EVENTS:]

    def close(self) -> None:
        if hasattr(self.source, "remove_listener"):
            self.source.remove_listener(self._on_step)
        super().close()

    def _on_step(self, session: Any, events: list) -> None:
        self.record(events)
        self.refresh()

    def _on_front_end_msg(self, widget: Any, content: Any, buffers: list) -> None:
        if isinstance(content, dict) and content.get("type") == "refresh":
            # a LiveStream steps in its own thread: read between its steps, never during one
            with getattr(self.source, "step_lock", None) or contextlib.nullcontext():
                self.refresh()
