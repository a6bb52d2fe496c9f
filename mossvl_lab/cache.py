"""Explicit, inspectable caches: text self-attention K/V, frame-segmented vision K/V, and the stream state.

Both caches store GQA-shaped tensors [batch, kv_head, pos_or_vis, d_head] in growable buffers (capacity
doubles), so appending a token or a frame never copies what is already cached except when a buffer grows,
and never recomputes anything. Vision keys are stored already normalised and rotated; values raw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class _Growable:
    """A [batch, kv_head, length, d_head] tensor pair that grows along the length axis."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        if self.keys is None or self.length + n > self.keys.shape[2]:
            capacity = max(2 * (self.keys.shape[2] if self.keys is not None else 0), self.length + n, 16)
            self.keys = self._regrow(self.keys, k, capacity)
            self.values = self._regrow(self.values, v, capacity)
        self.keys[:, :, self.length:self.length + n] = k
        self.values[:, :, self.length:self.length + n] = v
        self.length += n
        return self.view()

    def _regrow(self, old: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        shape = (like.shape[0], like.shape[1], capacity, like.shape[3])
        new = like.new_empty(shape)
        if old is not None:
            new[:, :, :self.length] = old[:, :, :self.length]
        return new

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]

    def memory_bytes(self) -> int:
        if self.keys is None:
            return 0
        per_step = self.keys.shape[0] * self.keys.shape[1] * self.keys.shape[3] * self.keys.element_size()
        return 2 * per_step * self.length


class TextKVCache:
    """Self-attention K/V per self-attention layer, plus which cached positions are real (not padding)."""

    def __init__(self) -> None:
        self._layers: dict[int, _Growable] = {}
        self.key_valid: torch.Tensor | None = None  # [batch, pos] bool

    @property
    def length(self) -> int:
        """Number of cached text positions (padding included)."""
        return 0 if self.key_valid is None else self.key_valid.shape[1]

    def extend_valid(self, valid: torch.Tensor) -> torch.Tensor:
        """Record validity of the tokens entering this forward; valid [batch, pos] -> all [batch, key_pos]."""
        self.key_valid = valid if self.key_valid is None else torch.cat([self.key_valid, valid], dim=1)
        return self.key_valid

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [batch, kv_head, pos, d_head] -> everything cached for that layer."""
        return self._layers.setdefault(layer_idx, _Growable()).append(k, v)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layers[layer_idx].view()

    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes() for layer in self._layers.values())

    def mark(self) -> dict:
        return {"layers": {i: g.length for i, g in self._layers.items()}, "key_valid": self.key_valid}

    def restore(self, mark: dict) -> None:
        for i, layer in list(self._layers.items()):
            if i in mark["layers"]:
                layer.truncate(mark["layers"][i])
            else:
                del self._layers[i]
        self.key_valid = mark["key_valid"]


@dataclass(frozen=True)
class FrameSegment:
    """One cached frame: where its tokens sit on the vision axis and where its placeholder sits in the text."""

    frame_index: int
    timestamp: float | None
    position: int                 # text position of the frame's placeholder (batch item 0)
    token_span: tuple[int, int]   # [start, end) on the vis axis
    bytes: int                    # K + V bytes over all cross-attention layers


class VisionKVCache:
    """Per cross-attention layer K/V over all cached frames, as a list of frame segments."""

    def __init__(self) -> None:
        self._layers: dict[int, _Growable] = {}
        self.segments: list[FrameSegment] = []
        self.anchor_positions: torch.Tensor | None = None  # [batch, frame] long: placeholder positions
        self.frame_valid: torch.Tensor | None = None       # [batch, frame] bool: False for padding media
        self.key_frame: torch.Tensor | None = None         # [batch, vis] long: frame of each key, -1 = padding
        self.num_tokens = 0                                # length of the vis axis (padding included)

    @property
    def frames(self) -> list[FrameSegment]:
        return list(self.segments)

    @property
    def num_frames(self) -> int:
        return len(self.segments)

    @property
    def has_frames(self) -> bool:
        return bool(self.segments)

    def add_frames(self, anchor_positions: torch.Tensor, frame_valid: torch.Tensor, key_frame: torch.Tensor,
                   frame_tokens: list[int], bytes_per_token: int, timestamps: list[float | None]) -> None:
        """Register new frames before their K/V arrive. anchor_positions, frame_valid [batch, n];
        key_frame [batch, vis_new] index among the new frames (-1 padding); frame_tokens: vis slots of each
        new frame in batch item 0's layout (its segments)."""
        start, first = self.num_tokens, self.num_frames
        for i, ts in enumerate(timestamps):
            span = (start, start + frame_tokens[i])
            start = span[1]
            self.segments.append(FrameSegment(frame_index=first + i, timestamp=ts,
                                              position=int(anchor_positions[0, i]), token_span=span,
                                              bytes=frame_tokens[i] * bytes_per_token))
        self.num_tokens += key_frame.shape[1]
        self.anchor_positions = _cat(self.anchor_positions, anchor_positions)
        self.frame_valid = _cat(self.frame_valid, frame_valid)
        self.key_frame = _cat(self.key_frame, torch.where(key_frame >= 0, key_frame + first, key_frame))

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the newest frames' K/V for one layer; k, v [batch, kv_head, vis_new, d_head]."""
        return self._layers.setdefault(layer_idx, _Growable()).append(k, v)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys, values of one cross-attention layer, each [batch, kv_head, vis, d_head]."""
        return self._layers[layer_idx].view()

    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes() for layer in self._layers.values())

    def mark(self) -> dict:
        return {"layers": {i: g.length for i, g in self._layers.items()}, "segments": len(self.segments),
                "num_tokens": self.num_tokens, "tensors": (self.anchor_positions, self.frame_valid, self.key_frame)}

    def restore(self, mark: dict) -> None:
        for i, layer in list(self._layers.items()):
            if i in mark["layers"]:
                layer.truncate(mark["layers"][i])
            else:
                del self._layers[i]
        del self.segments[mark["segments"]:]
        self.num_tokens = mark["num_tokens"]
        self.anchor_positions, self.frame_valid, self.key_frame = mark["tensors"]


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=1)


@dataclass
class StreamState:
    """Both caches, the position cursor and counters: everything a forward continues from."""

    text: TextKVCache = field(default_factory=TextKVCache)
    vision: VisionKVCache = field(default_factory=VisionKVCache)
    next_position: torch.Tensor | None = None  # [batch] long: position id of the next real token
    tokens_seen: int = 0

    @property
    def rope_delta(self) -> torch.Tensor | None:
        """[batch] offset between the position cursor and the text cache length (MOSS-VL's rope delta:
        frames consume more positions than tokens). Decode token i gets position i + rope_delta."""
        return None if self.next_position is None else self.next_position - self.text.length

    @property
    def frames_seen(self) -> int:
        return self.vision.num_frames

    def memory_bytes(self) -> int:
        return self.text.memory_bytes() + self.vision.memory_bytes()

    def mark(self) -> dict:
        """Sizes of everything a forward may extend; `restore` rolls back to them."""
        return {"text": self.text.mark(), "vision": self.vision.mark(), "next_position": self.next_position,
                "tokens_seen": self.tokens_seen}

    def restore(self, mark: dict) -> None:
        self.text.restore(mark["text"])
        self.vision.restore(mark["vision"])
        self.next_position, self.tokens_seen = mark["next_position"], mark["tokens_seen"]
