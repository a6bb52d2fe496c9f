"""Stream adapters for the notebook widgets: clips in, encoded frames and transcripts out (no torch here).

A widget needs three things from a stream that neither sessions nor clips hand over directly: a clip in one
normal form (frames, timestamps, prompts by frame), frames as PNG/JPEG bytes for the browser, and a transcript
that shows silence compactly ("⋯ ×7" for seven silent decisions in a row).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..streaming.events import Decision, Event, TextDelta
from ..streaming.inputs import check_frame, check_timestamp

SILENCE_MARK = "⋯"


class EmptyClipError(ValueError):
    """A clip with no frames was given; pass a `Clip` from `data.synthetic.make_clip` or [(frame, seconds), ...]."""


class ClipFormatError(ValueError):
    """A clip item is not a (frame [height, width, 3] uint8, timestamp seconds) pair, or timestamps go backwards."""


@dataclass
class ClipFrames:
    """A clip in the one form the widgets use."""

    frames: list[np.ndarray]                              # [height, width, 3] uint8 each
    timestamps: list[float]                               # seconds from the stream start, non-decreasing
    prompts: dict[int, str] = field(default_factory=dict)  # frame index -> prompt pushed together with it

    def __len__(self) -> int:
        return len(self.frames)


def clip_frames(clip: Any) -> ClipFrames:
    """A `data.synthetic.Clip` (its mid-stream question becomes a prompt at its frame) or a sequence of
    (frame, timestamp) pairs -> ClipFrames. Frames are checked as `RealtimeSession.push_frame` checks them."""
    if hasattr(clip, "frames") and hasattr(clip, "timestamps"):
        pairs = list(zip(clip.frames, clip.timestamps))
        question = getattr(clip, "question", None)
        prompts = {int(question.asked_at): question.text} if question is not None else {}
    elif isinstance(clip, Sequence) and not isinstance(clip, (str, bytes, np.ndarray)):
        pairs, prompts = list(clip), {}
    else:
        raise ClipFormatError(f"expected a data.synthetic.Clip or a list of (frame, timestamp) pairs, got "
                              f"{type(clip).__name__}")
    if not pairs:
        raise EmptyClipError("the clip has no frames; make one with data.synthetic.make_clip(seed, size=...) or pass "
                             "[(frame HxWx3 uint8, seconds), ...]")
    frames, stamps = [], []
    for i, item in enumerate(pairs):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ClipFormatError(f"clip item {i} is a {type(item).__name__}; expected a (frame, timestamp) pair")
        try:
            image, ts = np.asarray(check_frame(item[0])), check_timestamp(item[1])
        except ValueError as exc:
            raise ClipFormatError(f"clip item {i}: {exc}") from exc
        if stamps and ts < stamps[-1]:
            raise ClipFormatError(f"clip item {i} is at {ts:.3f}s, before item {i - 1} at {stamps[-1]:.3f}s; "
                                  f"timestamps must not go backwards")
        frames.append(image)
        stamps.append(ts)
    return ClipFrames(frames=frames, timestamps=stamps, prompts=prompts)


def encode_image(image: Any, fmt: str = "png", max_side: int | None = None) -> bytes:
    """An RGB frame (array, PIL image or encoded bytes) as PNG or JPEG bytes, optionally shrunk to `max_side`."""
    picture = check_frame(image)
    if max_side is not None and max(picture.size) > max_side:
        picture = picture.copy()
        picture.thumbnail((max_side, max_side))
    out = io.BytesIO()
    picture.save(out, format="JPEG" if fmt.lower() in ("jpg", "jpeg") else "PNG")
    return out.getvalue()


def data_url(encoded: bytes, fmt: str = "png") -> str:
    """Encoded image bytes as a `data:` URL, for thumbnails carried inside list/dict traits."""
    return f"data:image/{fmt};base64," + base64.b64encode(encoded).decode("ascii")


def silence_run(count: int) -> str:
    return SILENCE_MARK if count == 1 else f"{SILENCE_MARK} ×{count}"


class TranscriptBuilder:
    """Follows a session's events: `text` is exactly the TextDelta texts joined; `display()` is the same answers
    with each run of silent decisions collapsed into one mark ("the red square appears ⋯ ×7 the circle ...")."""

    def __init__(self, silence_id: int) -> None:
        self.silence_id = silence_id
        self.text = ""
        self._items: list[list[Any]] = []  # ["text", answer so far] or ["silence", count]

    def add(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, Decision) and event.token == self.silence_id:
                kind, value = "silence", 1
            elif isinstance(event, TextDelta) and event.text:
                self.text += event.text
                kind, value = "text", event.text
            else:
                continue
            if self._items and self._items[-1][0] == kind:
                self._items[-1][1] += value
            else:
                self._items.append([kind, value])

    def display(self) -> str:
        parts = [silence_run(value) if kind == "silence" else value.strip() for kind, value in self._items]
        return " ".join(part for part in parts if part)


def step_until_waiting(session: Any, max_steps: int) -> list[Event]:
    """Step `session` until it waits for input (its last choice was silence) or `max_steps` steps ran."""
    events: list[Event] = []
    for _ in range(max_steps):
        if session.waiting_for_input:
            break
        events += session.step()
    return events


def stream_clip(session: Any, clip: ClipFrames, max_decode_steps: int = 32) -> list[Event]:
    """Headless streaming: the initial decision, then per frame push it (with its prompt) and step until the
    session waits again (at most `max_decode_steps` steps per frame). Returns every event."""
    events: list[Event] = []
    if session.state.step == 0:
        events += session.step()
    for k, (frame, ts) in enumerate(zip(clip.frames, clip.timestamps)):
        if k in clip.prompts:
            session.push_prompt(clip.prompts[k])
        session.push_frame(frame, ts)
        events += session.step()
        events += step_until_waiting(session, max_decode_steps)
    return events
