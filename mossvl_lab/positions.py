"""MOSS-VL's offline position rule (spec moss-vl §4.2), written the way the spec states it.

The model itself computes positions incrementally (a cursor that each token advances by the positions it
consumes, §4.3, see `visibility.cursor_positions`); this module is the independent whole-sequence
statement of the same rule, used to check that both agree and to lay out positions for analysis plots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OfflinePositions:
    text: torch.Tensor               # [pos] position of every text token (all three axes equal)
    keys: list[torch.Tensor]         # per frame [3, eh * ew + 1] (t, h, w) of its merged tokens then separator


def offline_positions(input_ids: torch.Tensor, placeholder_id: int, merged_grids: list[tuple[int, int]],
                      separator: bool = True) -> OfflinePositions:
    """input_ids [pos] of one unpadded sequence; merged_grids[f] = (eh, ew) of the f-th placeholder's frame.

    1. A regular token's base position counts the regular tokens before it; a placeholder's base is that of
       the next regular token.
    2. Frame f consumes M_f + 1 positions (M_f = max(eh, ew)); S_f = sum of (M_g + 1) over earlier frames.
    3. A regular token's position is its base plus (M_g + 1) for every frame before it.
    4. Frame f starts at t_f = base(placeholder_f) + S_f; its placeholder sits at t_f + M_f, its merged
       token (r, c) at (t_f, t_f + r, t_f + c), its separator at t_f + M_f on all three axes.
    """
    is_frame = (input_ids == placeholder_id).tolist()
    if sum(is_frame) != len(merged_grids):
        raise ValueError(f"{sum(is_frame)} placeholders but {len(merged_grids)} frame grids")
    text, keys = [], []
    regular_before, shift, frame = 0, 0, 0
    for token_is_frame in is_frame:
        if not token_is_frame:
            text.append(regular_before + shift)
            regular_before += 1
            continue
        eh, ew = merged_grids[frame]
        span = max(eh, ew)
        t_f = regular_before + shift
        rows = torch.arange(eh).repeat_interleave(ew)
        cols = torch.arange(ew).repeat(eh)
        frame_keys = torch.stack([torch.full_like(rows, t_f), t_f + rows, t_f + cols])
        if separator:
            frame_keys = torch.cat([frame_keys, torch.full((3, 1), t_f + span, dtype=torch.long)], dim=1)
        keys.append(frame_keys)
        text.append(t_f + span)
        shift += span + 1
        frame += 1
    return OfflinePositions(text=torch.tensor(text, dtype=torch.long), keys=keys)
