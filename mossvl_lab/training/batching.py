"""Batches of training samples and the silence-weighted loss (spec video-preview §5.6).

`collate` right-pads text and merges each sample's vision tensors the way the family's processor does for a
batch, so a padded batch gives every sample the same logits it gets alone:

* Mllama layout (video_preview, mllama; toy_conv towers): pixel_values [batch, frame, tile, 3, H, W] padded on
  the frame axis with zero pixels; aspect_ratio_ids [batch, frame] 0 for padding frames (0 marks them invalid);
  aspect_ratio_mask [batch, frame, tile] with tile 0 on for padding frames, as the processor writes them.
* MOSS-VL layout: pixel_values [patches, patch_dim] and grid_thw [media, 3] concatenated in sample order, and
  media_nums_per_sample = the number of grid_thw rows of each sample (one per frame for realtime samples, one
  per video for offline ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..processing.templates import family_style
from .streams import IGNORE, TrainingSample

MLLAMA_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
MOSS_KEYS = ("pixel_values", "grid_thw")


def collate(samples: Sequence[TrainingSample], family: str, pad_id: int) -> dict[str, Any]:
    """Model inputs for a batch: input_ids [batch, pos] (right-padded with `pad_id`), attention_mask [batch, pos],
    labels [batch, pos] (IGNORE on padding), decisions and replies [batch, pos] bool (False where a sample marks
    none), frame_timestamps (one per frame column), and the vision tensors."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    length = max(int(s.input_ids.numel()) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    decisions = torch.zeros(len(samples), length, dtype=torch.bool)
    replies = torch.zeros(len(samples), length, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = int(s.input_ids.numel())
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s.input_ids, s.labels, 1
        if s.decisions is not None:
            decisions[b, :n] = s.decisions
        if s.replies is not None:
            replies[b, :n] = s.replies
    batch: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                 decisions=decisions, replies=replies)
    if family_style(family) == "chatml":
        batch.update(_moss_vision(samples))
    else:
        batch.update(_mllama_vision(samples))
    batch["frame_timestamps"] = _column_timestamps([s.frame_timestamps for s in samples])
    return batch


def _require(samples: Sequence[TrainingSample], keys: tuple[str, ...], layout: str) -> None:
    for i, s in enumerate(samples):
        missing = [k for k in keys if k not in s.vision]
        if missing:
            raise ValueError(f"sample {i} lacks {missing} for the {layout} vision layout (has {sorted(s.vision)}); "
                             f"was it made by a processor of another family?")


def _mllama_vision(samples: Sequence[TrainingSample]) -> dict[str, torch.Tensor]:
    _require(samples, MLLAMA_KEYS, "Mllama")
    frames = max(s.vision["pixel_values"].shape[1] for s in samples)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:  # [1, frame, ...] -> [1, frames, ...]
        extra = frames - t.shape[1]
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, extra), value=value) if extra else t

    pixel_values = torch.cat([pad(s.vision["pixel_values"], 0) for s in samples])        # [batch, frame, tile, 3, H, W]
    ratio_ids = torch.cat([pad(s.vision["aspect_ratio_ids"], 0) for s in samples])       # [batch, frame]
    ratio_mask = torch.cat([pad(s.vision["aspect_ratio_mask"], 0) for s in samples])     # [batch, frame, tile]
    for b, s in enumerate(samples):
        ratio_mask[b, s.vision["aspect_ratio_ids"].shape[1]:, 0] = 1  # padding frames keep tile 0 on (processor)
    return dict(pixel_values=pixel_values, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask)


def _moss_vision(samples: Sequence[TrainingSample]) -> dict[str, Any]:
    _require(samples, MOSS_KEYS, "MOSS-VL")
    grids = [torch.as_tensor(s.vision["grid_thw"], dtype=torch.long).reshape(-1, 3) for s in samples]
    return dict(pixel_values=torch.cat([s.vision["pixel_values"] for s in samples]),  # [patches, patch_dim]
                grid_thw=torch.cat(grids),                                           # [media, 3]
                media_nums_per_sample=[int(g.shape[0]) for g in grids])


def _column_timestamps(stamps: list[list[float]]) -> list[float | None]:
    """One timestamp per frame column: the samples' value where they agree, else None."""
    width = max((len(ts) for ts in stamps), default=0)
    columns: list[float | None] = []
    for j in range(width):
        values = {ts[j] for ts in stamps if j < len(ts)}
        columns.append(values.pop() if len(values) == 1 else None)
    return columns


def go_on_decisions(decisions: torch.Tensor, labels: torch.Tensor, silence_id: int | None) -> torch.Tensor:
    """The decisions to go on or stop after a spoken part (", " or <|silence|> right after a spoken word), without
    the decisions to start speaking after a frame. decisions, labels: [batch, pos] -> [batch, pos] bool."""
    spoken_before = torch.zeros_like(decisions)
    spoken_before[:, 1:] = (labels[:, :-1] != IGNORE) & (labels[:, :-1] != (-1 if silence_id is None else silence_id))
    return decisions & spoken_before


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, silence_id: int | None,
                     silence_weight: float = 1.0, decisions: torch.Tensor | None = None,
                     decision_weight: float = 1.0, replies: torch.Tensor | None = None,
                     reply_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted cross-entropy in fp32 with targets equal to `silence_id` weighted by `silence_weight`, targets
    marked in `decisions` (whether to speak, whether to go on; [batch, pos] bool) by `decision_weight` and targets
    marked in `replies` (a reply to a mid-stream question; [batch, pos] bool) by `reply_weight` (the weights
    multiply where several apply).

    logits [batch, pos, vocab]; labels [batch, pos] (IGNORE = no loss). Returns (loss_sum, n_tokens): the
    weighted sum over targets and the number of non-ignored targets; the caller divides (spec §5.6: sum over
    the number of non-ignored targets, in a data-parallel run the global number). loss_sum is fp64."""
    targets = labels[:, 1:]                                   # [batch, pos - 1]
    valid = targets != IGNORE
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.masked_fill(~valid, 0),
                         reduction="none")                    # [batch, pos - 1]
    weight = valid.double()
    if silence_id is not None and silence_weight != 1.0:
        weight = torch.where(targets == silence_id, weight * silence_weight, weight)
    if decisions is not None and decision_weight != 1.0:
        weight = torch.where(decisions[:, 1:], weight * decision_weight, weight)
    if replies is not None and reply_weight != 1.0:
        weight = torch.where(replies[:, 1:], weight * reply_weight, weight)
    return (ce.double() * weight).sum(), valid.sum()  # summed in fp64: equal across batch splits
