"""StreamStepper: step a RealtimeSession through a clip frame by frame or decision by decision, and scrub back.

Every session decision (`Decision` event) becomes one snapshot in `history`; `step_count` counts them and
`step` is the one shown (1-based, 0 before the first). The browser's Run button does not loop in the kernel:
each frame step answers with a "tick" message and the front end asks for the next one while `running`, so
Pause (and any other message) is handled between frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anywidget
import traitlets as t

from mossvl_lab.streaming.events import Decision, Event
from mossvl_lab.viz.cache_data import cache_summary
from mossvl_lab.viz.stream_data import TranscriptBuilder, clip_frames, encode_image

from ._common import CSS, esm, Listener, Listeners, WidgetInputError, make_session

SPARKLINE_POINTS = 200  # p(silence) values shown up to the current step


class StepIndexError(IndexError):
    """goto(step) outside the history: steps are numbered 1..step_count."""


class ClipExhaustedError(RuntimeError):
    """No frame left to step: every frame of the clip was pushed (or no clip was given)."""


@dataclass(frozen=True)
class Snapshot:
    """What the widget shows for one session decision."""

    step: int              # 1-based position in the history
    session_step: int      # Decision.step (counts from the session's first decision)
    frame_index: int       # the latest clip frame pushed by then, -1 before the first
    timestamp: float       # its timestamp in seconds, -1.0 before the first frame
    token: int
    decision: str          # "silence" or the chosen token's text
    p_silence: float
    transcript: str        # answers so far, silence runs collapsed
    text: str              # exactly the TextDelta texts so far
    cache: dict


class StreamStepper(anywidget.AnyWidget):
    _esm = esm("stream_stepper.js")
    _css = CSS

    step_count = t.Int(0).tag(sync=True)
    step = t.Int(0).tag(sync=True)
    frames_total = t.Int(0).tag(sync=True)
    frames_pushed = t.Int(0).tag(sync=True)
    running = t.Bool(False).tag(sync=True)
    frame = t.Bytes(b"").tag(sync=True)           # PNG of the frame shown
    frame_index = t.Int(-1).tag(sync=True)
    timestamp = t.Float(-1.0).tag(sync=True)       # seconds; -1.0: no frame yet
    decision = t.Unicode("").tag(sync=True)
    p_silence = t.Float(-1.0).tag(sync=True)       # -1.0: no decision yet
    p_silence_history = t.List(t.Float()).tag(sync=True)
    transcript = t.Unicode("").tag(sync=True)
    text = t.Unicode("").tag(sync=True)
    cache = t.Dict().tag(sync=True)
    status = t.Unicode("").tag(sync=True)
    error = t.Unicode("").tag(sync=True)

    recording: Any = None  # set in __init__; close() (also run from __del__) may see an instance without it

    def __init__(self, session: Any = None, *, model: Any = None, processor: Any = None, clip: Any = None,
                 prompt: str | None = None, max_decode_steps: int = 32, **session_kwargs: Any) -> None:
        """session: a RealtimeSession, or model + processor (+ prompt and RealtimeSession options) to build one.
        clip: a data.synthetic.Clip (its question is pushed at its frame) or [(frame HxWx3 uint8, seconds), ...].
        max_decode_steps: at most this many decisions per frame step while the model keeps speaking."""
        if session is not None and prompt is not None:
            raise WidgetInputError("the session already has its prompt; push more with session.push_prompt(text)")
        if isinstance(max_decode_steps, bool) or not isinstance(max_decode_steps, int) or max_decode_steps < 0:
            raise WidgetInputError(f"max_decode_steps must be an integer >= 0, got {max_decode_steps!r}")
        from mossvl_lab.viz.attention_data import record_stream  # imports torch: only once a stepper exists

        self.clip = clip_frames(clip) if clip is not None else None
        self.session = make_session(session, model, processor, prompt, **session_kwargs)
        self.max_decode_steps = max_decode_steps
        self.history: list[Snapshot] = []  # before the traits exist: the `step` validator reads it
        self.listeners = Listeners()
        self._transcript = TranscriptBuilder(self.session.silence_id)
        self._frame_png: dict[int, bytes] = {}
        self._latest = (-1, -1.0)
        super().__init__(frames_total=len(self.clip) if self.clip is not None else 0)
        self.recording = record_stream(self.session)  # for FrameAttentionView.from_session
        self.on_msg(self._on_front_end_msg)

    # ------------------------------------------------------------------ stepping

    @property
    def frames_left(self) -> int:
        return self.frames_total - self.frames_pushed

    def step_frame(self) -> list[Event]:
        """Push the clip's next frame (and its prompt) and step until the session waits for input
        (at most `max_decode_steps` decisions). The session's first decision runs first if it has not yet."""
        if self.clip is None:
            raise ClipExhaustedError("this stepper has no clip: pass clip=..., or push frames with "
                                     "stepper.session.push_frame(image, seconds) and use step_decode()")
        if not self.frames_left:
            raise ClipExhaustedError(f"all {self.frames_total} frames of the clip were stepped")
        events: list[Event] = []
        if self.session.state.step == 0:
            events += self._step()
        k = self.frames_pushed
        frame, ts = self.clip.frames[k], self.clip.timestamps[k]
        if k in self.clip.prompts:
            self.session.push_prompt(self.clip.prompts[k])
        self.session.push_frame(frame, ts)
        self.recording.add_image(ts, frame)
        self._frame_png[k] = encode_image(frame)
        self._latest = (k, ts)
        self.frames_pushed = k + 1
        events += self._step()
        for _ in range(self.max_decode_steps):
            if self.session.waiting_for_input:
                break
            events += self._step()
        return events

    def step_decode(self) -> list[Event]:
        """One `session.step()`: one decision, or nothing while the session waits for input."""
        events = self._step()
        if not any(isinstance(e, Decision) for e in events):
            self.status = "waiting for input: the model chose silence; step a frame or push a prompt"
        return events

    def run(self, max_steps: int | None = None) -> list[Event]:
        """Step frames until the clip ends, `max_steps` frames were stepped, or `pause()` (from another thread).
        From a cell this is a bounded loop that holds the kernel; the Run button instead steps one frame per
        message, so the browser's Pause is handled between frames."""
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
            raise WidgetInputError(f"max_steps must be None or an integer >= 0, got {max_steps!r}")
        events: list[Event] = []
        self.running = True
        try:
            done = 0
            while self.running and self.frames_left and (max_steps is None or done < max_steps):
                events += self.step_frame()
                done += 1
        finally:
            self.running = False
        return events

    def pause(self) -> None:
        self.running = False

    def goto(self, step: int) -> Snapshot:
        """Show snapshot `step` (1..step_count) and return it."""
        self.step = step
        return self.history[step - 1]

    def add_listener(self, fn: Listener) -> None:
        """Call fn(session, events) after every session step (e.g. KVCacheInspector.follow)."""
        self.listeners.add(fn)

    def remove_listener(self, fn: Listener) -> None:
        self.listeners.remove(fn)

    def close(self) -> None:
        """Stop recording the session's forwards (what was recorded stays usable) and close the widget."""
        self.running = False
        if self.recording is not None:
            self.recording.detach()
        super().close()

    # ------------------------------------------------------------------ internals

    def _step(self) -> list[Event]:
        events = self.session.step()
        self._transcript.add(events)
        decision = next((e for e in events if isinstance(e, Decision)), None)
        if decision is not None:
            self.history.append(self._snapshot(decision))
            follow = self.step == self.step_count  # a viewer scrubbed back stays where it is
            with self.hold_sync():
                self.step_count = len(self.history)
                if follow:
                    self.step = self.step_count
            self.status = ""
        self.listeners(self.session, events)
        return events

    def _snapshot(self, decision: Decision) -> Snapshot:
        silent = decision.token == self.session.silence_id
        return Snapshot(step=len(self.history) + 1, session_step=decision.step, frame_index=self._latest[0],
                        timestamp=self._latest[1], token=decision.token,
                        decision="silence" if silent else self.session.processor.decode([decision.token]),
                        p_silence=decision.p_silence, transcript=self._transcript.display(),
                        text=self._transcript.text, cache=cache_summary(self.session.stream))

    @t.validate("step")
    def _check_step(self, proposal: dict) -> int:
        step = proposal["value"]
        if not (1 <= step <= len(self.history) or step == 0 == len(self.history)):
            raise StepIndexError(f"step {step} is not in the history: steps are 1..{len(self.history)}")
        return step

    @t.observe("step")
    def _show(self, change: dict) -> None:
        if not change["new"]:
            return
        snap = self.history[change["new"] - 1]
        first = max(0, snap.step - SPARKLINE_POINTS)
        with self.hold_sync():
            self.frame = self._frame_png.get(snap.frame_index, b"")
            self.frame_index, self.timestamp = snap.frame_index, snap.timestamp
            self.decision, self.p_silence = snap.decision, snap.p_silence
            self.p_silence_history = [s.p_silence for s in self.history[first:snap.step]]
            self.transcript, self.text, self.cache = snap.transcript, snap.text, snap.cache

    def _tick(self) -> None:
        """One frame of a browser-driven run; asks the front end for the next while still running."""
        if self.running and self.frames_left:
            self.step_frame()
        if self.running and self.frames_left:
            self.send({"type": "tick"})
        else:
            self.running = False

    def _on_front_end_msg(self, widget: Any, content: Any, buffers: list) -> None:
        kind = content.get("type") if isinstance(content, dict) else None
        actions = {"step_frame": self.step_frame, "step_decode": self.step_decode, "tick": self._tick,
                   "pause": self.pause, "run": lambda: (setattr(self, "running", True), self._tick())}
        if kind not in actions:
            return
        try:
            actions[kind]()
            self.error = ""
        except Exception as exc:  # a button has nowhere to raise to: show the error in the widget instead
            self.running = False
            self.error = f"{type(exc).__name__}: {exc}"
