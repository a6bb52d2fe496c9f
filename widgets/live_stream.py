"""LiveStream: a Webcam feeding a RealtimeSession stepped by one worker thread.

The message handler (Webcam) only enqueues JPEG bytes. The worker drains the queue into the session (frames
are decoded there), steps it, and publishes transcript, p(silence) values and counters at most every
PUBLISH_SECONDS (and whenever it goes idle). Every start opens a new session; stop closes it and joins the
worker within about a second (a step in progress finishes first: milliseconds with the tiny models).
`streaming.threads.ThreadedSession` is not used because a widget needs to pause the worker and to see each
step's events in order together with the caches they describe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import traitlets as t

from mossvl_lab.streaming.events import Decision, Event, FrameIngested
from mossvl_lab.viz.stream_data import TranscriptBuilder

from ._common import Listener, Listeners, WidgetInputError, make_session
from .webcam import Webcam

logger = logging.getLogger("mossvl_lab.widgets")

PUBLISH_SECONDS = 0.1   # trait updates at most this often while the model runs
POLL_SECONDS = 0.05     # how often an idle worker re-checks its stop flag
JOIN_SECONDS = 1.0
SPARKLINE_POINTS = 300
THREAD_PREFIX = "mossvl-livestream"


def _fresh_counts() -> dict[str, Any]:
    return {"frames_ingested": 0, "steps": 0, "last_timestamp": -1.0, "rejected": 0}


class LiveStream(Webcam):
    transcript = t.Unicode("").tag(sync=True)        # answers so far, silence runs collapsed
    text = t.Unicode("").tag(sync=True)              # exactly the TextDelta texts so far
    p_silence = t.List(t.Float()).tag(sync=True)     # the newest SPARKLINE_POINTS decisions' p(silence)
    frames_ingested = t.Int(0).tag(sync=True)
    steps = t.Int(0).tag(sync=True)                  # decisions made
    last_timestamp = t.Float(-1.0).tag(sync=True)    # seconds of the newest ingested frame, -1.0 before one
    paused = t.Bool(False).tag(sync=True)
    error = t.Unicode("").tag(sync=True)

    def __init__(self, model: Any, processor: Any, prompt: str = "", fps: float = 1.0, *,
                 system_prompt: str | None = None, max_queued: int = 8, max_side: int = 256,
                 record: bool = False, **session_kwargs: Any) -> None:
        """prompt / system_prompt / session_kwargs: for the RealtimeSession each start opens (answers are capped
        at 32 tokens unless max_tokens_per_turn says otherwise). max_queued: frames waiting for the model
        beyond which the oldest is dropped. record: keep every forward for FrameAttentionView.from_session."""
        if model is None or processor is None:
            raise WidgetInputError("LiveStream needs a model and its processor (ml.processor_for_model(cfg))")
        self.model, self.processor, self.record = model, processor, record
        self._session_options = dict(session_kwargs, system_prompt=system_prompt)
        self._prompt = prompt
        self.session: Any = None
        self.listeners = Listeners()
        self.step_lock = threading.Lock()  # held while the session steps; readers of the caches take it
        self._thread: threading.Thread | None = None
        self._recording: Any = None
        self._stop = threading.Event()
        self._idle = True
        self._paused = False
        self._values: deque[float] = deque(maxlen=SPARKLINE_POINTS)
        self._transcript: TranscriptBuilder | None = None
        self._counts = _fresh_counts()
        self._published = 0.0
        super().__init__(fps=fps, max_queued=max_queued, max_side=max_side)

    # ------------------------------------------------------------------ control (kernel thread)

    def pause(self, timeout: float = 5.0) -> bool:
        """Stop taking frames after the step in progress (frames still queue, and drop when full); True once
        the worker is idle."""
        self.paused = True
        return self._wait_idle(timeout)

    def resume(self) -> None:
        self.paused = False

    def add_listener(self, fn: Listener) -> None:
        """Call fn(session, events) after every step, in the worker thread, while the caches are consistent."""
        self.listeners.add(fn)

    def remove_listener(self, fn: Listener) -> None:
        self.listeners.remove(fn)

    @property
    def worker(self) -> threading.Thread | None:
        return self._thread

    # ------------------------------------------------------------------ start / stop

    @t.observe("running")
    def _on_running(self, change: dict) -> None:
        if change["new"]:
            super()._on_running(change)
            try:
                self._start_worker()
            except Exception:  # e.g. bad session options: the widget must not claim to be running
                self.running = False
                raise
        else:
            self._stop_worker()

    @t.observe("paused")
    def _on_paused(self, change: dict) -> None:
        with self._cond:
            self._paused = change["new"]
            self._cond.notify_all()

    def _start_worker(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        session = make_session(None, self.model, self.processor, self._prompt, **self._session_options)
        self._recording = None
        if self.record:
            from mossvl_lab.viz.attention_data import record_stream
            self._recording = record_stream(session)
        self.session, self._transcript = session, TranscriptBuilder(session.silence_id)
        self._values.clear()
        self._counts = _fresh_counts()
        self._stop = threading.Event()
        self._idle = False
        self.paused = False  # not through _set: its observer takes _cond, which must never wait on _sync_lock
        self._set(transcript="", text="", p_silence=[], frames_ingested=0, steps=0, last_timestamp=-1.0, error="")
        self._thread = threading.Thread(target=self._work, args=(session, self._stop),
                                        name=f"{THREAD_PREFIX}-{id(self):x}", daemon=True)
        self._thread.start()

    def _stop_worker(self) -> None:
        thread, session = self._thread, self.session
        self._stop.set()
        if session is not None:
            session.close()  # a parked or stepping session returns at once / after its current forward
        if self._recording is not None:
            self._recording.detach()  # what it holds stays readable through FrameAttentionView.from_session
        with self._cond:
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_SECONDS)
            if thread.is_alive():
                logger.warning("LiveStream worker still finishing a step after %.1f s", JOIN_SECONDS)

    def _wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._idle or self._thread is None or not self._thread.is_alive(),
                                       timeout)

    # ------------------------------------------------------------------ worker thread

    def _work(self, session: Any, stop: threading.Event) -> None:
        from mossvl_lab.streaming.session import SessionClosedError

        try:
            self._step(session, [])  # the session's first decision (the prompt), before any frame
            while not stop.is_set():
                with self._cond:
                    while not stop.is_set() and (self._paused or (not self._queue and session.waiting_for_input)):
                        if not self._idle:
                            self._idle = True
                            self._cond.notify_all()
                            self._publish(force=True)
                        self._cond.wait(POLL_SECONDS)
                    self._idle = False
                    items = self._take_all()
                if not stop.is_set():
                    self._step(session, items)
        except SessionClosedError:
            pass  # stop() closed the session between two steps
        except Exception as exc:  # the loop cannot go on: say why in the widget, keep the traceback in the log
            logger.exception("LiveStream worker failed")
            self._set(error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._cond:
                self._idle = True
                self._cond.notify_all()
            self._publish(force=True)

    def _step(self, session: Any, items: list[tuple[float, bytes]]) -> None:
        from mossvl_lab.streaming.inputs import FrameInputError, FrameTimestampError

        for ts, data in sorted(items, key=lambda item: item[0]):
            try:
                session.push_frame(data, ts)
            except (FrameInputError, FrameTimestampError) as exc:  # a bad frame costs that frame, not the stream
                self._counts["rejected"] += 1
                self._set(error=f"{type(exc).__name__}: {exc}")
            else:
                if self._recording is not None:
                    self._recording.add_image(ts, data)
        with self.step_lock:
            events = session.step()
            if session is not self.session:  # stopped and restarted while this step ran: its results are stale
                return
            self.listeners(session, events)
        self._record(events)
        self._publish()

    def _record(self, events: list[Event]) -> None:
        self._transcript.add(events)
        for event in events:
            if isinstance(event, Decision):
                self._values.append(event.p_silence)
                self._counts["steps"] += 1
            elif isinstance(event, FrameIngested):
                self._counts["frames_ingested"] += 1
                self._counts["last_timestamp"] = event.timestamp

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._transcript is None or (not force and now - self._published < PUBLISH_SECONDS):
            return
        self._published = now
        counts = self._counts
        with self._cond:  # lock order: _cond, then _sync_lock (as the message handler takes them)
            self._set(transcript=self._transcript.display(), text=self._transcript.text, p_silence=list(self._values),
                      frames_ingested=counts["frames_ingested"], steps=counts["steps"],
                      last_timestamp=counts["last_timestamp"],
                      frames_rejected=self.frames_rejected + counts["rejected"])
            counts["rejected"] = 0
