"""Webcam: the browser's camera as a bounded queue of (timestamp, JPEG bytes) in the kernel.

The front end (getUserMedia -> canvas at `fps` -> JPEG) sends each frame as a custom message
{"type": "frame", "ts": seconds since start} with the JPEG as its one buffer. The handler only checks the
message and enqueues: widget messages can arrive on a kernel thread while a cell runs, so nothing slow (and
never the model) runs there. When the queue is full the oldest frame is dropped and counted.
Trait writes from the handler and from worker threads go through `_set`, one lock, one trait at a time (no
`hold_sync`: its pending-key set is not safe to share between threads). Lock order: `_cond` (the queue) before
`_sync_lock`, never the reverse. So traits whose observers take `_cond` or join a worker (`running`, and
LiveStream's `paused`) are set directly, never through `_set`.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections import deque
from typing import Any

import anywidget
import traitlets as t

from ._common import CSS, esm, WidgetInputError


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise WidgetInputError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class Webcam(anywidget.AnyWidget):
    _esm = esm("webcam.js")
    _css = CSS

    running = t.Bool(False).tag(sync=True)          # the camera runs while True (start/stop buttons set it)
    fps = t.Float(1.0).tag(sync=True)
    max_side = t.Int(256).tag(sync=True)            # frames are shrunk to at most this many pixels per side
    frames_received = t.Int(0).tag(sync=True)
    frames_dropped = t.Int(0).tag(sync=True)        # dropped from the full queue (oldest first)
    frames_rejected = t.Int(0).tag(sync=True)       # messages without a usable frame or timestamp
    camera_error = t.Unicode("").tag(sync=True)     # what getUserMedia said when it failed

    def __init__(self, fps: float = 1.0, *, max_queued: int = 8, max_side: int = 256) -> None:
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1:
            raise WidgetInputError(f"max_queued must be an integer >= 1, got {max_queued!r}")
        if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 16:
            raise WidgetInputError(f"max_side must be an integer >= 16 (pixels), got {max_side!r}")
        self.max_queued = max_queued
        self._queue: deque[tuple[float, bytes]] = deque()
        self._cond = threading.Condition()       # guards the queue; taken before _sync_lock, never after
        self._sync_lock = threading.RLock()
        super().__init__(fps=_positive("fps", fps), max_side=max_side)
        self.on_msg(self._on_front_end_msg)

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Start the camera (in every view showing this widget); the counters restart from zero."""
        self.running = True

    def stop(self) -> None:
        """Stop the camera: the front end stops every track of its media stream."""
        self.running = False
        self.send({"type": "stop"})

    def close(self) -> None:
        self.stop()
        super().close()

    # ------------------------------------------------------------------ frames (any thread)

    def push_jpeg(self, data: bytes, timestamp: float) -> bool:
        """Enqueue one encoded frame at `timestamp` seconds (what a browser message does; tests call it directly).
        Returns True when the queue was full and its oldest frame was dropped."""
        with self._cond:
            dropped = len(self._queue) >= self.max_queued
            if dropped:
                self._queue.popleft()
            self._queue.append((float(timestamp), bytes(data)))
            self._cond.notify_all()
            self._set(frames_received=self.frames_received + 1, frames_dropped=self.frames_dropped + dropped)
        return dropped

    def get(self, timeout: float | None = 0.0) -> tuple[float, bytes] | None:
        """The oldest queued (timestamp, JPEG bytes), waiting up to `timeout` s (None: forever); None if none."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._queue), timeout):
                return None
            return self._queue.popleft()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    # ------------------------------------------------------------------ internals

    def _set(self, **values: Any) -> None:
        with self._sync_lock:
            for name, value in values.items():
                setattr(self, name, value)

    @t.observe("running")
    def _on_running(self, change: dict) -> None:
        if change["new"]:
            self._clear()

    def _take_all(self) -> list[tuple[float, bytes]]:
        """Everything queued, oldest first (callers hold `_cond`)."""
        items = list(self._queue)
        self._queue.clear()
        return items

    def _clear(self) -> None:
        with self._cond:
            self._queue.clear()
            self._set(frames_received=0, frames_dropped=0, frames_rejected=0, camera_error="")

    def _on_front_end_msg(self, widget: Any, content: Any, buffers: list) -> None:
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "camera_error":
            self._set(camera_error=str(content.get("message", "")))
            self.running = False
            return
        if kind != "frame":
            return
        ts = content.get("ts")
        usable_ts = isinstance(ts, numbers.Real) and not isinstance(ts, bool) and math.isfinite(ts) and ts >= 0
        if not usable_ts or not buffers or not len(buffers[0]):
            with self._cond:
                self._set(frames_rejected=self.frames_rejected + 1)
            return
        self.push_jpeg(buffers[0], ts)
