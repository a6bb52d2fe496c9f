"""Adapters from each vision tower's processor inputs to one `NewFrames` record the model caches.

Per batch item the new frames' tokens are laid out frame-major on the vision axis, padded to the longest
item. `key_frame` says which new frame every vision key belongs to (-1 = padding), so visibility, key
positions and cache segments never assume a fixed token count per frame (MOSS-VL frames vary in size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .registry import build, register
from .visibility import ModelInputError


@dataclass
class NewFrames:
    states: torch.Tensor        # [batch, vis_new, d_model]
    key_frame: torch.Tensor     # [batch, vis_new] long: index among the new frames, -1 for padding keys
    frame_valid: torch.Tensor   # [batch, frame_new] bool: False for padding media
    frame_span: torch.Tensor    # [batch, frame_new] long: text positions the frame's placeholder consumes
    key_offsets: torch.Tensor | None  # [3, batch, vis_new] (t, h, w) offsets from the frame's base position


# Which cross_attention_mask layout each tower's processor emits: Mllama [batch, text_pos, frame, tile] with
# 1 = attend, or MOSS-VL [batch, 1, text_pos, frame] with True = masked.
MASK_CONVENTION = {"mllama_vit": "mllama", "toy_conv": "mllama", "moss_vit": "moss"}


def encode_new_frames(model: Any, inputs: dict[str, Any], chunk: int | None) -> NewFrames:
    """Dispatch on the vision tower kind; `inputs` holds the processor's vision tensors by HF name, plus
    `dedup_frames` (bool): encode each distinct frame once (see `distinct_rows`)."""
    return build("frames", model.config.vision.kind, model, inputs, chunk)


def distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [n, ...] -> (first [distinct]: the index of each distinct row's first occurrence, in order of first
    occurrence; inverse [n]: which distinct row each row is). rows[first][inverse] == rows.

    Why: the tower sees every frame on its own, so identical frames (a static scene between events, the zero
    frames that pad a training batch) give identical states; encoding each once and indexing them back is the
    same function with the same gradients (indexing sums a shared frame's gradient over its copies). In the
    synthetic training batches two thirds of the frames repeat one already in the batch."""
    flat = rows.reshape(rows.shape[0], -1)
    _, inverse = torch.unique(flat, dim=0, return_inverse=True)
    order = torch.arange(flat.shape[0], device=flat.device)
    first = torch.full((int(inverse.max()) + 1,), flat.shape[0], dtype=torch.long, device=flat.device)
    first.scatter_reduce_(0, inverse, order, reduce="amin")
    by_first = torch.argsort(first)                      # renumber distinct rows by first occurrence
    rank = torch.empty_like(by_first)
    rank[by_first] = torch.arange(by_first.numel(), device=flat.device)
    return first[by_first], rank[inverse]


@register("frames", "mllama_vit")
@register("frames", "toy_conv")
def _mllama_frames(model: Any, inputs: dict[str, Any], chunk: int | None) -> NewFrames:
    pixel_values = inputs["pixel_values"]
    ratio_ids, ratio_mask = inputs.get("aspect_ratio_ids"), inputs.get("aspect_ratio_mask")
    if inputs.get("dedup_frames") and pixel_values.dim() == 6:
        states = _encode_distinct_mllama_frames(model, pixel_values, ratio_ids, ratio_mask, chunk)
    else:
        states = model.encode_frames(pixel_values, ratio_ids, ratio_mask, chunk)  # [batch, frame, vis_per_frame, d]
    batch, count, per_frame = states.shape[:3]
    tiles = pixel_values.shape[2]
    device = states.device
    frame_valid = ratio_ids > 0 if ratio_ids is not None else torch.ones(batch, count, dtype=torch.bool, device=device)
    tile_valid = ratio_mask.bool() if ratio_mask is not None else \
        torch.ones(batch, count, tiles, dtype=torch.bool, device=device)
    key_valid = (tile_valid & frame_valid[..., None]).repeat_interleave(per_frame // tiles, dim=2).flatten(1)
    key_frame = torch.arange(count, device=device).repeat_interleave(per_frame).expand(batch, -1)
    return NewFrames(states=states.flatten(1, 2), key_frame=key_frame.masked_fill(~key_valid, -1),
                     frame_valid=frame_valid, frame_span=torch.ones(batch, count, dtype=torch.long, device=device),
                     key_offsets=None)


def single_tile_defaults(pixel_values: torch.Tensor, ratio_ids: torch.Tensor | None,
                         ratio_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(aspect_ratio_ids [batch, frame], aspect_ratio_mask [batch, frame, tile]) with the missing ones filled in
    as one-tile frames (ratio id 1, every tile real). pixel_values [batch, frame, tile, channel, H, W]."""
    batch, frames, tiles = pixel_values.shape[:3]
    device = pixel_values.device
    ids = ratio_ids if ratio_ids is not None else torch.ones(batch, frames, dtype=torch.long, device=device)
    mask = ratio_mask if ratio_mask is not None else torch.ones(batch, frames, tiles, dtype=torch.long, device=device)
    return ids, mask


def _encode_distinct_mllama_frames(model: Any, pixel_values: torch.Tensor, ratio_ids: torch.Tensor | None,
                                   ratio_mask: torch.Tensor | None, chunk: int | None) -> torch.Tensor:
    """model.encode_frames over the distinct (pixels, aspect ratio id, tile mask) frames only.
    pixel_values [batch, frame, tile, channel, H, W] -> [batch, frame, vis_per_frame, d_model]."""
    batch, frames = pixel_values.shape[:2]
    ids, mask = single_tile_defaults(pixel_values, ratio_ids, ratio_mask)
    flat_pixels, flat_ids, flat_mask = pixel_values.flatten(0, 1), ids.flatten(), mask.flatten(0, 1)
    keys = torch.cat([flat_pixels.flatten(1).float(), flat_ids[:, None].float(), flat_mask.float()], dim=1)
    first, inverse = distinct_rows(keys)
    states = model.encode_frames(flat_pixels[first][None], flat_ids[first][None], flat_mask[first][None], chunk)[0]
    return states[inverse].view(batch, frames, *states.shape[1:])


@register("frames", "moss_vit")
def _moss_frames(model: Any, inputs: dict[str, Any], chunk: int | None) -> NewFrames:
    pixel_values, grid_thw = inputs["pixel_values"], inputs.get("grid_thw")
    if grid_thw is None:
        raise ModelInputError("MOSS-VL frames need grid_thw [media, 3] (t, h, w in patches) with pixel_values")
    grid_thw = torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3)
    media_per_item = inputs.get("media_nums_per_sample") or [grid_thw.shape[0]]
    if sum(media_per_item) != grid_thw.shape[0]:
        raise ModelInputError(f"media_nums_per_sample {list(media_per_item)} sums to {sum(media_per_item)} but "
                              f"grid_thw has {grid_thw.shape[0]} media")
    frame_grids = [(int(h), int(w)) for t, h, w in grid_thw.tolist() for _ in range(t)]  # one per frame, in order
    frames_per_media = grid_thw[:, 0].tolist()
    tower = model.vision
    merge = tower.cfg.spatial_merge_size
    pixels = pixel_values.to(model.embed_tokens.weight.dtype)
    encode = _encode_distinct_moss_frames if inputs.get("dedup_frames") else _encode_moss_frames
    per_frame_states = encode(tower, pixels, frame_grids, chunk)

    items, start = [], 0
    for media in media_per_item:
        n_frames = sum(frames_per_media[start:start + media]) if media else 0
        first = sum(frames_per_media[:start])
        items.append(list(range(first, first + n_frames)))
        start += media
    batch, max_frames = len(items), max(len(i) for i in items)
    rows = [sum(per_frame_states[f].shape[0] for f in frames) for frames in items]
    width, d_model = max(rows), per_frame_states[0].shape[-1] if per_frame_states else tower.d_model
    device = per_frame_states[0].device if per_frame_states else pixel_values.device
    states = torch.zeros(batch, width, d_model, dtype=model.embed_tokens.weight.dtype, device=device)
    key_frame = torch.full((batch, width), -1, dtype=torch.long, device=device)
    key_offsets = torch.zeros(3, batch, width, dtype=torch.long, device=device)
    frame_valid = torch.zeros(batch, max_frames, dtype=torch.bool, device=device)
    frame_span = torch.ones(batch, max_frames, dtype=torch.long, device=device)
    for b, frames in enumerate(items):
        at = 0
        for k, f in enumerate(frames):
            eh, ew = frame_grids[f][0] // merge, frame_grids[f][1] // merge
            tokens = per_frame_states[f]
            states[b, at:at + tokens.shape[0]] = tokens
            key_frame[b, at:at + tokens.shape[0]] = k
            key_offsets[:, b, at:at + tokens.shape[0]] = _thw_offsets(eh, ew, tokens.shape[0], device)
            frame_valid[b, k] = True
            frame_span[b, k] = max(eh, ew) + 1
            at += tokens.shape[0]
    return NewFrames(states=states, key_frame=key_frame, frame_valid=frame_valid, frame_span=frame_span,
                     key_offsets=key_offsets)


def _encode_moss_frames(tower: Any, pixel_values: torch.Tensor, frame_grids: list[tuple[int, int]],
                        chunk: int | None) -> list[torch.Tensor]:
    """Run the tower over frames in groups of `chunk` (frames never attend to each other, so grouping only
    bounds memory). Returns one [tokens, d_model] tensor per frame."""
    _patches_per_frame(pixel_values, frame_grids)  # raises on a grid / pixel count mismatch
    step = chunk or max(len(frame_grids), 1)
    out: list[torch.Tensor] = []
    offset = 0
    for i in range(0, len(frame_grids), step):
        grids = frame_grids[i:i + step]
        count = sum(h * w for h, w in grids)
        grid_thw = torch.tensor([[1, h, w] for h, w in grids], dtype=torch.long)  # host: its values shape the loop
        result = tower(pixel_values[offset:offset + count], grid_thw)
        out.extend(result.states.split(list(result.tokens_per_frame)))
        offset += count
    return out


def _encode_distinct_moss_frames(tower: Any, pixel_values: torch.Tensor, frame_grids: list[tuple[int, int]],
                                 chunk: int | None) -> list[torch.Tensor]:
    """_encode_moss_frames over the distinct frames only (same grid and patches); one [tokens, d_model] per frame."""
    patches = _patches_per_frame(pixel_values, frame_grids)
    per_frame = pixel_values.split(patches)
    encoded: list[torch.Tensor | None] = [None] * len(frame_grids)
    for grid in dict.fromkeys(frame_grids):  # frames of one grid compare as rows of one tensor
        members = [i for i, g in enumerate(frame_grids) if g == grid]
        first, inverse = distinct_rows(torch.stack([per_frame[i] for i in members]))
        unique = [members[int(j)] for j in first]
        states = _encode_moss_frames(tower, torch.cat([per_frame[i] for i in unique]), [grid] * len(unique), chunk)
        for member, which in zip(members, inverse.tolist()):
            encoded[member] = states[which]
    return encoded  # type: ignore[return-value]


def _patches_per_frame(pixel_values: torch.Tensor, frame_grids: list[tuple[int, int]]) -> list[int]:
    patches = [h * w for h, w in frame_grids]
    if sum(patches) != pixel_values.shape[0]:
        raise ModelInputError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw describes "
                              f"{sum(patches)}")
    return patches


def _thw_offsets(eh: int, ew: int, tokens: int, device: torch.device) -> torch.Tensor:
    """(t, h, w) offsets from the frame's base position: merged token (r, c) -> (0, r, c) row-major; a trailing
    separator -> (M, M, M) with M = max(eh, ew), the position of the frame's placeholder (spec moss-vl §4.2)."""
    rows = torch.arange(eh, device=device).repeat_interleave(ew)
    cols = torch.arange(ew, device=device).repeat(eh)
    offsets = torch.stack([torch.zeros_like(rows), rows, cols])
    if tokens == eh * ew + 1:
        offsets = torch.cat([offsets, torch.full((3, 1), max(eh, ew), dtype=torch.long, device=device)], dim=1)
    return offsets
