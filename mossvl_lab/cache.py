"""Explicit, inspectable caches: text self-attention K/V, frame-segmented vision K/V, and the stream state.

Both caches store GQA-shaped tensors [batch, kv_head, pos_or_vis, d_head] in growable buffers (capacity
doubles), so appending a token or a frame never copies what is already cached except when a buffer grows,
and never recomputes anything. Vision keys are stored already normalised and rotated; values raw.
Cache policies (streaming.cache_policies) forget through `TextKVCache.drop`, `VisionKVCache.drop_frames` and
`VisionKVCache.pool_frames`, which never re-index positions; buffers shrink once they are mostly empty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
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

    @property
    def capacity(self) -> int:
        """Slots allocated along the length axis (>= length)."""
        return 0 if self.keys is None else self.keys.shape[2]

    def drop(self, start: int, end: int) -> None:
        """Remove [start, end) along the length axis: the tail slides down in place, capacity is kept, and the
        buffers are reallocated smaller (to twice the new length) once the length falls below a quarter of the
        capacity, so memory follows what is cached over long streams."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"drop range [{start}, {end}) outside the cached length {self.length}")
        if start == end:
            return
        tail = self.length - end
        with self.editing():
            for buf in (self.keys, self.values):
                src = buf[:, :, end:self.length]
                # copy_ refuses partially overlapping views; clone the tail only when the ranges overlap
                buf[:, :, start:start + tail] = src if start + tail <= end else src.clone()
            self.length -= end - start
            if self.capacity > 16 and self.length < self.capacity // 4:
                capacity = max(2 * self.length, 16)
                self.keys = self._regrow(self.keys, self.keys, capacity)
                self.values = self._regrow(self.values, self.values, capacity)

    def editing(self) -> torch.inference_mode:
        """Context for editing the buffers in place between forwards: buffers filled under torch.inference_mode
        (as sessions run) can only be written inside it, and ordinary ones must not turn into inference tensors."""
        return torch.inference_mode(self.keys is not None and self.keys.is_inference())

    def allocated_bytes(self) -> int:
        """Bytes held by both buffers, spare capacity included."""
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

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

    def allocated_bytes(self) -> int:
        """Bytes the K/V buffers hold, spare capacity included (memory_bytes counts cached positions only)."""
        return sum(layer.allocated_bytes() for layer in self._layers.values())

    def drop(self, start: int, end: int) -> int:
        """Forget cached positions [start, end) (cache indices, not position ids) in every layer; returns the
        bytes freed. Keys are cached already rotated and the position cursor lives in `StreamState`, so later
        tokens keep their true positions: nothing is re-indexed. A later forward's `attention_mask` or
        explicit `cross_attention_mask` covering "past + pos" rows must count the positions left, not dropped."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"TextKVCache.drop: range [{start}, {end}) outside the {self.length} cached positions")
        if start == end:
            return 0
        before = self.memory_bytes()
        for layer in self._layers.values():
            layer.drop(start, end)
        self.key_valid = torch.cat([self.key_valid[:, :start], self.key_valid[:, end:]], dim=1)
        return before - self.memory_bytes()

    def mark(self) -> dict:
        return {"layers": _layer_lengths(self._layers), "key_valid": self.key_valid}

    def restore(self, mark: dict) -> None:
        _restore_layers(self._layers, mark["layers"])
        self.key_valid = mark["key_valid"]


@dataclass(frozen=True)
class FrameSegment:
    """One cached frame: where its tokens sit on the vision axis and where its placeholder sits in the text."""

    frame_index: int
    timestamp: float | None
    position: int                 # text position of the frame's placeholder (batch item 0)
    token_span: tuple[int, int]   # [start, end) on the vis axis
    bytes: int                    # K + V bytes over all cross-attention layers
    pool_factor: int = 1          # >1 once `VisionKVCache.pool_frames` averaged its tokens in groups of this size


class VisionKVCache:
    """Per cross-attention layer K/V over all cached frames, as a list of frame segments."""

    def __init__(self) -> None:
        self._layers: dict[int, _Growable] = {}
        self.segments: list[FrameSegment] = []
        self.anchor_positions: torch.Tensor | None = None  # [batch, frame] long: placeholder positions
        self.frame_valid: torch.Tensor | None = None       # [batch, frame] bool: False for padding media
        self.key_frame: torch.Tensor | None = None         # [batch, vis] long: frame of each key, -1 = padding
        self.num_tokens = 0                                # length of the vis axis (padding included)
        self.frames_evicted = 0                            # frames removed by drop_frames (keeps frame_index running)

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
            self.segments.append(FrameSegment(frame_index=self.frames_evicted + first + i, timestamp=ts,
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

    def allocated_bytes(self) -> int:
        """Bytes the K/V buffers hold, spare capacity included."""
        return sum(layer.allocated_bytes() for layer in self._layers.values())

    def drop_frames(self, count: int) -> tuple[list[FrameSegment], int]:
        """Evict the oldest `count` frames: their K/V in every layer, their anchor/validity columns and keys.

        Remaining frames keep their `frame_index`, timestamp, placeholder position and rotated keys (nothing is
        re-indexed in position space); their token spans slide down and `key_frame` is renumbered so it stays an
        index into `anchor_positions`. Returns (the removed segments as they were, bytes freed).
        The cut follows batch item 0's layout (the streaming case); other batch items must have exactly the same
        frames on each side of it, else ValueError.
        """
        if not 0 <= count <= self.num_frames:
            raise ValueError(f"drop_frames: count must be in [0, {self.num_frames}] (cached frames), got {count}")
        if count == 0:
            return [], 0
        cut = self.segments[count].token_span[0] if count < self.num_frames else self.num_tokens
        before_keys, after_keys = self.key_frame[:, :cut], self.key_frame[:, cut:]
        if bool((before_keys >= count).any()) or bool(((after_keys >= 0) & (after_keys < count)).any()):
            raise ValueError("drop_frames: a batch item lays the dropped frames out differently from batch item 0; "
                             "evict only at boundaries every batch item shares (batch size 1 always does)")
        before = self.memory_bytes()
        for layer in self._layers.values():
            layer.drop(0, cut)
        removed = self.segments[:count]
        self.segments = [dataclasses.replace(seg, token_span=(seg.token_span[0] - cut, seg.token_span[1] - cut))
                         for seg in self.segments[count:]]
        self.anchor_positions = self.anchor_positions[:, count:].clone()  # copies: the old columns are freed
        self.frame_valid = self.frame_valid[:, count:].clone()
        self.key_frame = torch.where(after_keys >= 0, after_keys - count, after_keys)
        self.num_tokens -= cut
        self.frames_evicted += count
        return removed, before - self.memory_bytes()

    def pool_frames(self, frames: Iterable[int], factor: int, keep_first: int = 0, keep_last: int = 0) -> int:
        """Mean-pool the cached K/V of the given frames (indices into `segments`) in place; returns bytes freed.

        Each frame's tokens, minus `keep_first` leading and `keep_last` trailing ones (a CLS token, MOSS-VL's
        separator) which stay as they are, are averaged in consecutive groups of `factor` along the vis axis
        (row-major order, so groups are horizontal runs; a shorter last group averages what it has). Keys are
        averaged as cached: normalised and already rotated, so no position is recomputed; values raw. The
        segment shrinks, `pool_factor` records the factor, and later frames' spans slide down.
        Needs every batch item to hold the frame on batch item 0's span (batch size 1 always does).
        """
        if factor < 1:
            raise ValueError(f"pool_frames: factor must be >= 1, got {factor}")
        if keep_first < 0 or keep_last < 0:
            raise ValueError(f"pool_frames: keep_first and keep_last must be >= 0, got {keep_first}, {keep_last}")
        indices = sorted(set(int(f) for f in frames))
        for f in indices:
            if not 0 <= f < self.num_frames:
                raise ValueError(f"pool_frames: frame {f} is not cached (0..{self.num_frames - 1})")
        before = self.memory_bytes()
        for f in reversed(indices):  # latest first: pooling a frame never moves the spans of earlier frames
            self._pool_one(f, factor, keep_first, keep_last)
        return before - self.memory_bytes()

    def _pool_one(self, f: int, factor: int, keep_first: int, keep_last: int) -> None:
        seg = self.segments[f]
        start, end = seg.token_span
        n = end - start
        body = n - keep_first - keep_last
        if factor == 1 or body <= 1:
            return
        if not bool((self.key_frame[:, start:end] == f).all()):
            raise ValueError(f"pool_frames: frame {f} does not own tokens [{start}, {end}) in every batch item "
                             "(padding or a different layout); pool only frames every batch item shares")
        groups = -(-body // factor)
        kept = keep_first + groups + keep_last
        index = torch.arange(body, device=self.key_frame.device) // factor  # group of each body token
        counts = torch.bincount(index, minlength=groups)
        for layer in self._layers.values():
            with layer.editing():
                for buf in (layer.keys, layer.values):
                    part = buf[:, :, start + keep_first:end - keep_last].float()  # [batch, kv_head, body, d_head]
                    pooled = part.new_zeros(*part.shape[:2], groups, part.shape[3]).index_add_(2, index, part)
                    pooled = (pooled / counts[:, None].to(pooled)).to(buf.dtype)  # [batch, kv_head, groups, d_head]
                    tail = buf[:, :, end - keep_last:end].clone()
                    at = start + keep_first
                    buf[:, :, at:at + groups] = pooled
                    buf[:, :, at + groups:at + groups + keep_last] = tail
            layer.drop(start + kept, end)
        removed = n - kept
        self.key_frame = torch.cat([self.key_frame[:, :start + kept], self.key_frame[:, end:]], dim=1)
        self.num_tokens -= removed
        per_token = seg.bytes // n
        self.segments[f] = dataclasses.replace(seg, token_span=(start, start + kept), bytes=kept * per_token,
                                               pool_factor=seg.pool_factor * factor)
        for i in range(f + 1, self.num_frames):
            s = self.segments[i]
            self.segments[i] = dataclasses.replace(s, token_span=(s.token_span[0] - removed, s.token_span[1] - removed))

    def mark(self) -> dict:
        return {"layers": _layer_lengths(self._layers), "segments": len(self.segments),
                "num_tokens": self.num_tokens, "tensors": (self.anchor_positions, self.frame_valid, self.key_frame)}

    def restore(self, mark: dict) -> None:
        _restore_layers(self._layers, mark["layers"])
        del self.segments[mark["segments"]:]
        self.num_tokens = mark["num_tokens"]
        self.anchor_positions, self.frame_valid, self.key_frame = mark["tensors"]


def _layer_lengths(layers: dict[int, _Growable]) -> dict[int, int]:
    return {i: g.length for i, g in layers.items()}


def _restore_layers(layers: dict[int, _Growable], lengths: dict[int, int]) -> None:
    """Roll every layer back to its marked length; layers created after the mark disappear."""
    for i, layer in list(layers.items()):
        if i in lengths:
            layer.truncate(lengths[i])
        else:
            del layers[i]


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
