"""FrameAttentionView: for a chosen token, how much cross-attention lands on each timestamped frame.

The data come from one replay of a recorded stream with `run_with_cache` (viz.attention_data): per cross layer
the pattern [batch, head, query_pos, vis] and the visibility mask [batch, query_pos, frame]. The view shows the
mass per frame as bars over frame thumbnails (one layer and head, or their mean), the chosen frame's per-patch
weights as a heatmap over it, and the visibility staircase (which frames each token can see).
"""

from __future__ import annotations

import contextlib
from typing import Any

import anywidget
import numpy as np
import traitlets as t

from mossvl_lab.viz.stream_data import clip_frames, data_url, encode_image, stream_clip

from ._common import CSS, esm, WidgetInputError, make_session

MEAN = -1  # layer / head choice: average over all


class FrameAttentionView(anywidget.AnyWidget):
    _esm = esm("frame_attention.js")
    _css = CSS

    tokens = t.List(t.Dict()).tag(sync=True)        # shown tokens: {"i": index, "text", "frame": index or -1}
    token = t.Int(0).tag(sync=True)                 # the chosen token (index in the whole stream)
    layers = t.List(t.Int()).tag(sync=True)         # cross-attention layers
    layer = t.Int(MEAN).tag(sync=True)              # one of `layers`, or -1: mean over them
    num_heads = t.Int(0).tag(sync=True)
    head = t.Int(MEAN).tag(sync=True)               # 0..num_heads-1, or -1: mean over heads
    frame = t.Int(MEAN).tag(sync=True)              # heatmap frame; -1: the frame the token attends to most
    frames = t.List(t.Dict()).tag(sync=True)        # {"index", "timestamp", "token", "thumb": data URL or ""}
    bars = t.List(t.Float()).tag(sync=True)         # attention mass per frame of (token, layer, head)
    heatmap = t.Dict().tag(sync=True)               # {"frame", "rows", "cols", "values", "extra"}
    visibility = t.List(t.Unicode()).tag(sync=True)  # per shown token: "1" / "0" per frame it can / cannot see
    show_prompt = t.Bool(False).tag(sync=True)      # also list the tokens before the first frame

    def __init__(self, model: Any = None, processor: Any = None, clip: Any = None, *, prompt: str | None = None,
                 data: Any = None, max_decode_steps: int = 8, **session_kwargs: Any) -> None:
        """Either `data` (a viz.attention_data.FrameAttention), or model + processor + clip: the clip is streamed
        through a new RealtimeSession (prompt, session options; at most `max_decode_steps` decisions per frame)
        and that stream is replayed. See also `from_session`."""
        from mossvl_lab.viz.attention_data import frame_attention, record_stream

        if data is not None and (model is not None or processor is not None or clip is not None):
            raise WidgetInputError("pass either data= or model, processor and clip, not both")
        if data is None:
            if clip is None:
                raise WidgetInputError("FrameAttentionView needs model, processor and clip (or data=, or use "
                                       "FrameAttentionView.from_session(session))")
            frames = clip_frames(clip)
            session = make_session(None, model, processor, prompt, **session_kwargs)
            recording = record_stream(session)
            for ts, image in zip(frames.timestamps, frames.frames):
                recording.add_image(ts, image)
            try:
                stream_clip(session, frames, max_decode_steps)
            finally:
                recording.detach()
                session.close()
            data = frame_attention(model, processor, recording)
        self.data = data
        super().__init__(layers=list(data.layers), num_heads=data.num_heads, token=data.num_tokens - 1,
                         frames=[{"index": f, "timestamp": data.timestamps[f], "token": data.placeholders[f],
                                  "thumb": "" if data.images[f] is None else data_url(encode_image(data.images[f]))}
                                 for f in range(data.num_frames)])
        self._list_tokens()
        self._update()

    @classmethod
    def from_session(cls, source: Any) -> "FrameAttentionView":
        """The stream a session has forwarded so far, replayed once. `source`: a RealtimeSession, a StreamStepper
        or a LiveStream(record=True). The session must have been recorded from its first step (StreamStepper
        does it; otherwise call viz.attention_data.record_stream(session) before stepping)."""
        from mossvl_lab.viz.attention_data import frame_attention, recording_for

        session = getattr(source, "session", source)
        # a LiveStream's worker shares the model: replay between its steps, never during one
        with getattr(source, "step_lock", None) or contextlib.nullcontext():
            data = frame_attention(session.model, session.processor, recording_for(session))
        return cls(data=data)

    def mass(self) -> np.ndarray:
        """The plotted bars: attention mass [frame] of the chosen token, layer and head."""
        return self.data.frame_mass(self.token, self.layer, self.head)

    def select(self, token: int | None = None, *, layer: int | None = None, head: int | None = None,
               frame: int | None = None) -> None:
        """Change several choices at once (each is checked; a bad one raises before anything changes)."""
        token = self.token if token is None else token
        layer, head = self.layer if layer is None else layer, self.head if head is None else head
        self.data.frame_mass(token, layer, head)
        frame = self.frame if frame is None else frame
        if frame != MEAN:
            self.data.patch_map(token, frame, layer, head)
        with self.hold_trait_notifications():
            self.token, self.layer, self.head, self.frame = token, layer, head, frame

    # ------------------------------------------------------------------ internals

    @t.validate("token")
    def _check_token(self, proposal: dict) -> int:
        self.data.check_token(proposal["value"])
        return proposal["value"]

    @t.validate("layer", "head")
    def _check_choice(self, proposal: dict) -> int:
        name, value = proposal["trait"].name, proposal["value"]
        self.data.frame_mass(self.token, value if name == "layer" else self.layer,
                             value if name == "head" else self.head)
        return value

    @t.validate("frame")
    def _check_frame(self, proposal: dict) -> int:
        if proposal["value"] != MEAN:
            self.data.patch_map(self.token, proposal["value"])
        return proposal["value"]

    @t.observe("token", "layer", "head", "frame")
    def _on_choice(self, change: dict) -> None:
        self._update()

    @t.observe("show_prompt")
    def _on_show_prompt(self, change: dict) -> None:
        self._list_tokens()

    def _list_tokens(self) -> None:
        data = self.data
        start = 0 if self.show_prompt else data.first_row
        frame_at = {pos: f for f, pos in enumerate(data.placeholders)}
        none = "0" * data.num_frames
        with self.hold_sync():
            self.tokens = [{"i": i, "text": data.token_text[i], "frame": frame_at.get(i, -1)}
                           for i in range(start, data.num_tokens)]
            self.visibility = [none if i < data.first_row else
                               "".join("1" if v else "0" for v in data.visibility[i - data.first_row])
                               for i in range(start, data.num_tokens)]

    def _update(self) -> None:
        bars = self.mass()
        shown = int(np.argmax(bars)) if self.frame == MEAN else self.frame
        with self.hold_sync():
            self.bars = [float(b) for b in bars]
            self.heatmap = self.data.patch_map(self.token, shown, self.layer, self.head)
