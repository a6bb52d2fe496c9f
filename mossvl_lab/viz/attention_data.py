"""Token -> frame attention for the widgets: record what a session forwarded, replay it once with hooks.

A `RealtimeSession` does not keep the token ids and pixels it forwarded, so `record_stream(session)` attaches a
forward hook that copies them (only forwards on that session's own `StreamState`). `frame_attention` then
runs ONE offline forward over the recorded stream with `run_with_cache` (streaming == offline, tests/streaming)
and reads `blocks.{l}.cross_attn.hook_pattern` [batch, head, query_pos, vis] and `hook_visibility`
[batch, query_pos, frame]. Mass per frame uses `interventions.frame_attention_mass`, as the demo does.
With a cache policy that evicted or pooled frames, the replay shows what the model would attend to had it
kept everything, which is no longer what the session saw.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..cache import StreamState
from ..interventions import frame_attention_mass

VISION_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "grid_thw")
MEAN = -1  # layer or head choice: average over all of them


class NoRecordingError(LookupError):
    """The session's forwards were not recorded; step it through StreamStepper or call record_stream(session)
    before its first step."""


class IncompleteRecordingError(ValueError):
    """Recording started after the session had already forwarded tokens, so the stream cannot be replayed."""


class NoFramesError(ValueError):
    """The recorded stream has no frame yet: push and step at least one frame first."""


class TokenIndexError(IndexError):
    """A token index outside the replayed stream."""


class AttentionChoiceError(ValueError):
    """A layer, head or frame choice that does not exist in this model or stream."""


@dataclass
class StreamRecording:
    """Every forward a session made: its input ids and vision inputs, in order; `images` maps a frame timestamp
    to the frame as pushed (array, PIL image or encoded bytes; whoever pushes frames may add them, for thumbnails)."""

    family: str
    complete: bool
    chunks: list[dict[str, Any]] = field(default_factory=list)
    images: dict[float, Any] = field(default_factory=dict)
    _handle: Any = None

    def add_image(self, timestamp: float, image: Any) -> None:
        self.images[float(timestamp)] = image

    @property
    def num_tokens(self) -> int:
        return sum(c["input_ids"].shape[1] for c in self.chunks)

    @property
    def num_frames(self) -> int:
        return sum(len(c.get("frame_timestamps") or ()) for c in self.chunks)

    def detach(self) -> None:
        """Stop recording (what was recorded stays usable)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def offline_inputs(self) -> dict[str, Any]:
        """The whole stream as one forward's inputs: input_ids [1, pos], the frames' vision inputs concatenated in
        stream order (frame axis: dim 1 of Mllama-layout tensors, dim 0 of MOSS-VL's packed patches and grid_thw)."""
        if not self.complete:
            raise IncompleteRecordingError("recording started after the session's first forward; call "
                                           "record_stream(session) (or build the StreamStepper) before stepping it")
        if not self.num_frames:
            raise NoFramesError("the recorded stream has no frame yet; push and step at least one frame first")
        inputs: dict[str, Any] = {"input_ids": torch.cat([c["input_ids"] for c in self.chunks], dim=1)}
        with_frames = [c for c in self.chunks if "pixel_values" in c]
        packed = "grid_thw" in with_frames[0]
        for key in VISION_KEYS:
            if key in with_frames[0]:
                dim = 0 if packed and key in ("pixel_values", "grid_thw") else 1
                inputs[key] = torch.cat([c[key] for c in with_frames], dim=dim)
        inputs["frame_timestamps"] = [ts for c in with_frames for ts in c["frame_timestamps"]]
        return inputs


_recordings: "weakref.WeakKeyDictionary[Any, StreamRecording]" = weakref.WeakKeyDictionary()


def record_stream(session: Any) -> StreamRecording:
    """Start (or return the running) recording of `session`'s forwards. Forwards of other sessions or offline
    calls on the same model are ignored: only those continuing this session's own StreamState are kept."""
    existing = _recordings.get(session)
    if existing is not None and existing._handle is not None:
        return existing
    recording = StreamRecording(family=session.model.config.family, complete=session.stream.tokens_seen == 0)
    if existing is not None:  # a detached earlier recording continues if the session did not move since
        recording.chunks, recording.images = existing.chunks, existing.images
        recording.complete = existing.complete and existing.num_tokens == session.stream.tokens_seen
    stream = session.stream

    def keep(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if kwargs.get("state") is not stream:
            return
        ids = args[0] if args else kwargs["input_ids"]
        chunk: dict[str, Any] = {"input_ids": ids.detach().cpu()}
        for key in VISION_KEYS:
            if kwargs.get(key) is not None:
                chunk[key] = kwargs[key].detach().cpu()
        if kwargs.get("pixel_values") is not None:
            count = chunk["grid_thw"].shape[0] if "grid_thw" in chunk else chunk["pixel_values"].shape[1]
            chunk["frame_timestamps"] = list(kwargs.get("frame_timestamps") or [None] * count)
        recording.chunks.append(chunk)

    # a post-forward hook: a forward the model rejected (and rolled back) never enters the recording
    recording._handle = session.model.register_forward_hook(keep, with_kwargs=True)
    _recordings[session] = recording
    return recording


def recording_for(session: Any) -> StreamRecording:
    recording = _recordings.get(session)
    if recording is None:
        raise NoRecordingError("this session's forwards were not recorded; step it through a StreamStepper, or call "
                               "mossvl_lab.viz.attention_data.record_stream(session) before its first step")
    return recording


@dataclass
class FrameAttention:
    """Cross-attention of every token of a replayed stream on every frame.

    Rows start at `first_row`, the token index of the first frame's placeholder (earlier tokens see no frame).
    mass [layer, head, row, frame]; pattern [layer, head, row, vis]; visibility [row, frame] bool.
    """

    token_ids: list[int]
    token_text: list[str]
    first_row: int
    layers: list[int]
    mass: np.ndarray
    pattern: np.ndarray
    visibility: np.ndarray
    spans: list[tuple[int, int]]                  # each frame's [start, end) on the vis axis
    grids: list[tuple[int, int, int, int]]        # (leading extra tokens, rows, cols, trailing extra tokens)
    timestamps: list[float | None]
    placeholders: list[int]                       # token index of each frame's placeholder
    images: list[Any]                             # each frame as pushed (array, PIL image, bytes) or None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_frames(self) -> int:
        return len(self.spans)

    @property
    def num_heads(self) -> int:
        return int(self.mass.shape[1])

    def _rows(self, token: int, layer: int, head: int) -> np.ndarray | None:
        """pattern rows [vis] for (token, layer, head) after averaging MEAN choices; None before the first frame."""
        self.check_token(token)
        if layer != MEAN and layer not in self.layers:
            raise AttentionChoiceError(f"layer {layer} is not a cross-attention layer; choose one of {self.layers} "
                                       f"or -1 (mean)")
        if head != MEAN and not 0 <= head < self.num_heads:
            raise AttentionChoiceError(f"head {head} out of range: 0..{self.num_heads - 1}, or -1 (mean)")
        if token < self.first_row:
            return None
        picked = self.pattern if layer == MEAN else self.pattern[self.layers.index(layer)][None]
        picked = picked[:, :, token - self.first_row]
        return (picked.mean(1) if head == MEAN else picked[:, head]).mean(0)

    def check_token(self, token: int) -> None:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < self.num_tokens:
            raise TokenIndexError(f"token {token!r} out of range: the stream has tokens 0..{self.num_tokens - 1}")

    def frame_mass(self, token: int, layer: int = MEAN, head: int = MEAN) -> np.ndarray:
        """Attention mass [frame] of `token` on each frame (sums to 1 once the token sees a frame, else 0)."""
        self.check_token(token)
        self._rows(token, layer, head)  # validates the choices
        if token < self.first_row:
            return np.zeros(self.num_frames, dtype=np.float32)
        picked = self.mass if layer == MEAN else self.mass[self.layers.index(layer)][None]
        rows = picked[:, :, token - self.first_row]  # [layer, head, frame]
        return (rows.mean(1) if head == MEAN else rows[:, head]).mean(0)

    def patch_map(self, token: int, frame: int, layer: int = MEAN, head: int = MEAN) -> dict[str, Any]:
        """The attention of `token` on `frame`'s tokens laid on the frame's grid: {"rows", "cols", "values"
        (row-major list), "extra" (weights of the leading CLS / trailing separator tokens)}."""
        if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= frame < self.num_frames:
            raise AttentionChoiceError(f"frame {frame!r} out of range: 0..{self.num_frames - 1}")
        row = self._rows(token, layer, head)
        start, end = self.spans[frame]
        weights = np.zeros(end - start, dtype=np.float32) if row is None else row[start:end]
        lead, rows, cols, trail = self.grids[frame]
        body = weights[lead:len(weights) - trail]
        return {"frame": int(frame), "rows": rows, "cols": cols, "values": [float(v) for v in body],
                "extra": [float(v) for v in np.concatenate([weights[:lead], weights[len(weights) - trail:]])]}


def _grid(config: Any, tokens: int, grid_thw: Any | None) -> tuple[int, int, int, int]:
    """How a frame's vision tokens lie on its image: the Mllama tower puts a CLS token first (then the pooled
    grid, row-major), MOSS-VL a separator last (merged grid from grid_thw / merge size)."""
    vision = config.vision
    lead = 1 if vision.kind == "mllama_vit" else 0
    trail = 1 if getattr(vision, "separator", False) else 0
    body = tokens - lead - trail
    if grid_thw is not None:
        merge = getattr(vision, "spatial_merge_size", 1)
        rows, cols = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
        if rows * cols == body:
            return lead, rows, cols, trail
    side = math.isqrt(max(body, 0))
    return (lead, side, side, trail) if side * side == body else (lead, 1, body, trail)


def frame_attention(model: Any, processor: Any, recording: StreamRecording) -> FrameAttention:
    """Replay `recording` once and collect every cross-attention layer's pattern and the visibility mask."""
    inputs = recording.offline_inputs()
    device = model.embed_tokens.weight.device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    layers = list(model.config.text.cross_attention_layers)
    names = [f"blocks.{layer}.cross_attn.hook_pattern" for layer in layers]
    visibility_name = f"blocks.{layers[0]}.cross_attn.hook_visibility"
    state = StreamState()
    with torch.inference_mode():
        _, cache = model.run_with_cache(names_filter=names + [visibility_name], state=state, **inputs)
    ids = inputs["input_ids"][0].tolist()
    placeholder = model.config.tokens.image_token_id
    placeholders = [i for i, t in enumerate(ids) if t == placeholder]
    segments = state.vision.segments
    first = placeholders[0]
    key_frame = state.vision.key_frame
    mass = torch.stack([frame_attention_mass(cache[n], key_frame, len(segments))[0, :, first:] for n in names])
    pattern = torch.stack([cache[n][0, :, first:] for n in names])
    grid_thw = inputs.get("grid_thw")
    return FrameAttention(
        token_ids=ids, token_text=[processor.decode([t]) for t in ids], first_row=first, layers=layers,
        mass=mass.float().cpu().numpy(), pattern=pattern.float().cpu().numpy(),
        visibility=cache[visibility_name][0, first:].cpu().numpy().astype(bool),
        spans=[seg.token_span for seg in segments],
        grids=[_grid(model.config, seg.token_span[1] - seg.token_span[0],
                     None if grid_thw is None else grid_thw[i].tolist()) for i, seg in enumerate(segments)],
        timestamps=[seg.timestamp for seg in segments], placeholders=placeholders,
        images=[recording.images.get(seg.timestamp) if seg.timestamp is not None else None for seg in segments])
