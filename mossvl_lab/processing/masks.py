"""Processor-side cross-attention masks, computed from token ids (left- or right-padded batches).

Two conventions, one rule: the text holds one frame token per image / video frame, and a token sees the frames
whose token is at or before it.

* Mllama (`mllama`, `video_preview`): dense int mask [batch, text_pos, media, max_tiles], 1 = attend, tiles past
  a media item's `num_tiles` are 0. rule="cumulative" is MOSS-Video-Preview's collator (spec §3.5: every frame
  at or before the token); rule="mllama_stock" reproduces transformers' MllamaProcessor exactly (an image is
  seen only until the next, non-adjacent image token). The two agree when all image tokens are adjacent.
* MOSS-VL: bool mask [batch, 1, text_pos, frame], True = masked (spec moss-vl §5.1): row i sees frame j iff the
  number of `<|image_pad|>` tokens up to and including i exceeds j.

Padding rows (attention_mask == 0) and frames a sample does not have see / are seen by nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .tokenizer import ProcessingError

MaskRule = Literal["cumulative", "mllama_stock"]


class MaskInputError(ProcessingError):
    """Token ids, padding and media counts passed to a mask builder disagree."""


def _valid(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.dim() != 2:
        raise MaskInputError(f"input_ids must be [batch, pos], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise MaskInputError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
    return attention_mask.bool()


def _stock_ends(locations: list[int], length: int) -> list[int]:
    """transformers' rule: image i is seen from its token up to the first token of the next group of adjacent
    image tokens after it (or the end)."""
    ends = [length] * len(locations)
    next_group_start = length
    for i in range(len(locations) - 1, -1, -1):
        ends[i] = next_group_start
        if i == 0 or locations[i - 1] != locations[i] - 1:  # locations[i] starts its group
            next_group_start = locations[i]
    return ends


def mllama_cross_attention_mask(input_ids: torch.Tensor, image_token_id: int, *,
                                num_tiles: Sequence[Sequence[int]] | None = None, max_tiles: int = 1,
                                attention_mask: torch.Tensor | None = None, rule: MaskRule = "cumulative",
                                num_media: int | None = None) -> torch.Tensor:
    """input_ids [batch, pos] -> cross_attention_mask [batch, pos, media, max_tiles] (int64, 1 = attend).

    num_tiles[b][i]: tiles of the i-th image token of sample b (default 1 each); media = max image tokens per
    sample (or `num_media`, to pad wider).
    """
    valid = _valid(input_ids, attention_mask)
    batch, length = input_ids.shape
    is_image = (input_ids == image_token_id) & valid
    counts = is_image.sum(1).tolist()
    width = max(counts + [0]) if num_media is None else num_media
    if width < max(counts + [0]):
        raise MaskInputError(f"num_media={num_media} but a sample has {max(counts)} image tokens")
    mask = torch.zeros(batch, length, width, max_tiles, dtype=torch.long)
    positions = torch.arange(length)
    for b in range(batch):
        locations = is_image[b].nonzero().flatten().tolist()
        tiles = [1] * len(locations) if num_tiles is None else [int(t) for t in num_tiles[b]]
        if len(tiles) != len(locations):
            raise MaskInputError(f"sample {b}: {len(locations)} image token(s) (id {image_token_id}) but num_tiles "
                                 f"lists {len(tiles)} media")
        if any(not 1 <= t <= max_tiles for t in tiles):
            raise MaskInputError(f"sample {b}: num_tiles {tiles} outside 1..max_tiles={max_tiles}")
        ends = _stock_ends(locations, length) if rule == "mllama_stock" else [length] * len(locations)
        for i, (start, end, t) in enumerate(zip(locations, ends, tiles)):
            rows = (positions >= start) & (positions < end) & valid[b]
            mask[b, rows, i, :t] = 1
    return mask


def moss_cross_attention_mask(input_ids: torch.Tensor, image_token_id: int, *,
                              frames_per_sample: Sequence[int] | None = None,
                              attention_mask: torch.Tensor | None = None,
                              num_frames: int | None = None) -> torch.Tensor:
    """input_ids [batch, pos] -> cross_attention_mask [batch, 1, pos, frame] (bool, True = masked).

    frames_per_sample[b]: frames sample b really has (default: its `<|image_pad|>` count; a text-only sample
    carrying the blank image has 1 frame and no pad token, so all its rows stay masked). frame = max over samples
    (or `num_frames`).
    """
    valid = _valid(input_ids, attention_mask)
    is_pad = (input_ids == image_token_id) & valid
    counts = is_pad.sum(1)
    frames = counts if frames_per_sample is None else torch.as_tensor(list(frames_per_sample), dtype=torch.long)
    if frames.shape[0] != input_ids.shape[0]:
        raise MaskInputError(f"frames_per_sample has {frames.shape[0]} entries for a batch of {input_ids.shape[0]}")
    over = (counts > frames).nonzero().flatten().tolist()
    if over:
        raise MaskInputError(f"sample(s) {over} have more {image_token_id}-tokens ({counts[over].tolist()}) than "
                             f"frames ({frames[over].tolist()})")
    width = int(frames.max()) if num_frames is None and frames.numel() else int(num_frames or 0)
    cum = is_pad.long().cumsum(1)                                    # [batch, pos]
    j = torch.arange(width)
    visible = (cum[:, :, None] > j) & (j < frames[:, None, None]) & valid[:, :, None]
    return (~visible)[:, None]


def visible_frame_counts(moss_mask: torch.Tensor) -> torch.Tensor:
    """[batch, 1, pos, frame] (True = masked) -> [batch, pos] frames each row sees (0 -> row gate closed)."""
    return (~moss_mask[:, 0]).sum(-1)
