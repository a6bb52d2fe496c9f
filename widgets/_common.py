"""What every widget shares: where its ESM/CSS live, building a session, and step listeners."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CSS = HERE / "widgets.css"
DEFAULT_TOKENS_PER_TURN = 32  # an untrained model may never choose silence; this bounds each answer

logger = logging.getLogger("mossvl_lab.widgets")

Listener = Callable[[Any, list], None]  # (session, events of one step) -> None


def esm(name: str) -> str:
    """A widget's front-end module: the shared DOM helpers (_dom.js) followed by widgets/<name>."""
    return (HERE / "_dom.js").read_text() + "\n" + (HERE / name).read_text()


class WidgetInputError(ValueError):
    """A widget was given inputs it cannot use; the message says what it expects."""


def make_session(session: Any, model: Any, processor: Any, prompt: str | None, **session_kwargs: Any) -> Any:
    """`session` as given, or a new RealtimeSession over model + processor (answers capped at
    DEFAULT_TOKENS_PER_TURN tokens unless `max_tokens_per_turn` says otherwise)."""
    if session is not None:
        if model is not None or processor is not None or session_kwargs:
            raise WidgetInputError("pass either a RealtimeSession or model + processor (+ session options), not both")
        return session
    if model is None or processor is None:
        raise WidgetInputError("pass a mossvl_lab.RealtimeSession, or model= and processor= "
                               "(ml.build_model(cfg), ml.processor_for_model(cfg)) to build one")
    from mossvl_lab.streaming.session import RealtimeSession

    session_kwargs.setdefault("max_tokens_per_turn", DEFAULT_TOKENS_PER_TURN)
    return RealtimeSession(model, processor, prompt=prompt, **session_kwargs)


class Listeners:
    """Callbacks told about every step (e.g. a KVCacheInspector following a stream). A failing listener is
    logged and kept out of the stream's way: a broken view must never stop the model."""

    def __init__(self) -> None:
        self._items: list[Listener] = []

    def add(self, fn: Listener) -> None:
        if not callable(fn):
            raise WidgetInputError(f"a listener must be callable as fn(session, events), got {type(fn).__name__}")
        if fn not in self._items:
            self._items.append(fn)

    def remove(self, fn: Listener) -> None:
        if fn in self._items:
            self._items.remove(fn)

    def __call__(self, session: Any, events: list) -> None:
        for fn in list(self._items):
            try:
                fn(session, events)
            except Exception:
                logger.exception("widget listener %r failed", fn)
