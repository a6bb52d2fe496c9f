"""Who sees what: causal text masks, frame anchors and frame-prefix visibility, as pure tensor functions.

Rule shared by every family: the text holds one placeholder token per frame; a token sees every frame
whose placeholder is at or before it. Masks are boolean, True = may attend.
"""

from __future__ import annotations

import torch


class ModelInputError(ValueError):
    """Inputs to the model are inconsistent; the message says what to fix."""


class PlaceholderMismatchError(ModelInputError):
    """The number of frame placeholders in the text differs from the number of frames given."""


def causal_allowed(key_valid: torch.Tensor, past: int) -> torch.Tensor:
    """key_valid [batch, key_pos] over cached + new tokens -> allowed [batch, query_pos, key_pos].

    Query i (absolute index past + i) sees valid keys at or before it. It always sees itself, so rows of
    padding tokens stay finite (their outputs are never read).
    """
    total = key_valid.shape[1]
    q_abs = torch.arange(past, total, device=key_valid.device)[:, None]
    k_abs = torch.arange(total, device=key_valid.device)[None, :]
    return ((k_abs <= q_abs) & key_valid[:, None, :]) | (k_abs == q_abs)


def cursor_positions(start: torch.Tensor, valid: torch.Tensor, widths: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids continuing from `start` [batch] over tokens with validity `valid` [batch, pos].

    A token consumes `widths` positions (default 1; a MOSS-VL frame placeholder consumes max(eh, ew) + 1)
    and takes the last of them. Padding consumes none (left-padded items get the same positions as
    unpadded ones) and takes the next real token's base (never read).
    """
    used = valid.long() if widths is None else widths * valid.long()
    return start[:, None] + used.cumsum(-1) - valid.long()


def placeholder_slots(input_ids: torch.Tensor, placeholder_id: int, frame_valid: torch.Tensor) -> list[torch.Tensor]:
    """Indices of each batch item's placeholders; the k-th anchors its k-th real frame.
    Raises PlaceholderMismatchError when the counts differ."""
    slots = []
    for b in range(input_ids.shape[0]):
        found = (input_ids[b] == placeholder_id).nonzero().flatten()
        real = int(frame_valid[b].sum())
        if found.numel() != real:
            what = "more placeholders than frames" if found.numel() > real else "fewer placeholders than frames"
            raise PlaceholderMismatchError(
                f"batch item {b}: {found.numel()} placeholder token(s) (id {placeholder_id}) in the text but "
                f"{real} frame(s)/image(s) given ({what}); the text needs exactly one placeholder per frame, "
                f"in order")
        slots.append(found)
    return slots


def placeholder_widths(shape: torch.Size, slots: list[torch.Tensor], frame_valid: torch.Tensor,
                       frame_span: torch.Tensor) -> torch.Tensor:
    """[batch, pos] positions each token consumes: 1, or the frame's span at its placeholder."""
    widths = torch.ones(shape, dtype=torch.long, device=frame_span.device)
    for b, found in enumerate(slots):
        widths[b, found] = frame_span[b][frame_valid[b]]
    return widths


def placeholder_anchors(slots: list[torch.Tensor], positions: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
    """Position of each new frame's placeholder -> [batch, frame]; padding frames get a position no query reaches."""
    never = torch.iinfo(torch.long).max
    anchors = torch.full(frame_valid.shape, never, dtype=torch.long, device=positions.device)
    for b, found in enumerate(slots):
        anchors[b, frame_valid[b]] = positions[b, found]
    return anchors


def check_no_stray_placeholders(input_ids: torch.Tensor, placeholder_id: int) -> None:
    """Without pixels, the text of this forward may not introduce frames."""
    count = int((input_ids == placeholder_id).sum())
    if count:
        raise PlaceholderMismatchError(
            f"the text has {count} placeholder token(s) (id {placeholder_id}) but no pixel_values were given "
            f"(more placeholders than images); pass the frames with the text that introduces them")


def frame_visibility_from_anchors(anchors: torch.Tensor, frame_valid: torch.Tensor,
                                  positions: torch.Tensor) -> torch.Tensor:
    """anchors, frame_valid [batch, frame]; positions [batch, query_pos] -> [batch, query_pos, frame]."""
    return frame_valid[:, None, :] & (anchors[:, None, :] <= positions[:, :, None])


def keys_from_frames(frame_visibility: torch.Tensor, key_frame: torch.Tensor) -> torch.Tensor:
    """frame_visibility [batch, query_pos, frame]; key_frame [batch, vis] (-1 padding) -> [batch, query_pos, vis]."""
    index = key_frame.clamp(min=0)[:, None, :].expand(-1, frame_visibility.shape[1], -1)
    return frame_visibility.gather(2, index) & (key_frame >= 0)[:, None, :]


def moss_cross_mask(mask: torch.Tensor, past: int, seq: int, key_frame: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MOSS-VL processor's cross_attention_mask [batch, 1, text_pos, frame] (True = masked) ->
    (allowed [batch, query_pos, vis], frame_visibility [batch, query_pos, frame])."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ModelInputError(f"cross_attention_mask must be [batch, 1, text_pos, frame], got {tuple(mask.shape)}")
    rows = mask[:, 0]
    if rows.shape[1] == past + seq and past:
        rows = rows[:, past:past + seq]
    elif rows.shape[1] != seq:
        raise ModelInputError(f"cross_attention_mask has {rows.shape[1]} text rows; expected {seq} or {past + seq}")
    frames = int(key_frame.max()) + 1 if key_frame.numel() else 0
    if rows.shape[2] < frames:
        raise ModelInputError(f"cross_attention_mask covers {rows.shape[2]} frames but {frames} are cached")
    visible = ~rows.bool()
    return keys_from_frames(visible, key_frame), visible


def mllama_cross_mask(mask: torch.Tensor, past: int, seq: int, tokens_per_tile: int,
                      num_vis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mllama processor's cross_attention_mask [batch, text_pos, frame, tile] (1 = attend) ->
    (allowed [batch, query_pos, vis], frame_visibility [batch, query_pos, frame]) for the tokens of this forward.

    `text_pos` is either this forward's tokens or all tokens so far (then the last `seq` rows after `past`).
    """
    if mask.dim() != 4:
        raise ModelInputError(f"cross_attention_mask must be [batch, text_pos, frame, tile], got {tuple(mask.shape)}")
    if mask.shape[1] == past + seq and past:
        mask = mask[:, past:past + seq]
    elif mask.shape[1] != seq:
        raise ModelInputError(f"cross_attention_mask has {mask.shape[1]} text rows; expected {seq} (this forward) "
                              f"or {past + seq} (all tokens so far)")
    tiles = mask.bool()
    allowed = tiles.repeat_interleave(tokens_per_tile, dim=3).flatten(2)
    if allowed.shape[2] != num_vis:
        raise ModelInputError(f"cross_attention_mask covers {allowed.shape[2]} vision tokens "
                              f"({mask.shape[2]} frames x {mask.shape[3]} tiles x {tokens_per_tile}) but "
                              f"{num_vis} are cached; it must have one column per cached frame")
    return allowed, tiles.any(-1)
