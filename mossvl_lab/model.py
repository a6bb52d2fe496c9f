"""MossModel: vision tower -> cross-attention states -> decoder -> logits.

Read top to bottom to follow a whole forward pass: `forward` embeds the new tokens, places them in
position space, encodes any new frames once and registers them in the vision cache, decides which
frames each query row sees, runs the block list (skipping cross-attention blocks while no frame exists),
and projects to the vocabulary. All streaming bookkeeping lives in the `StreamState` passed in.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import hooks as hooklib
from .cache import StreamState
from .components import vision as _vision  # noqa: F401  (registers the vision towers)
from .components.decoder import CrossAttnBlock, DecoderContext, SelfAttnBlock
from .components.norms import RMSNorm
from .components.rope import Rotation, build_rope
from .config import ModelConfig
from .registry import build
from .frames import MASK_CONVENTION, NewFrames, encode_new_frames, single_tile_defaults
from .visibility import (ModelInputError, causal_allowed, check_no_stray_placeholders, cursor_positions,
                         frame_visibility_from_anchors, keys_from_frames, mllama_cross_mask, moss_cross_mask,
                         placeholder_anchors, placeholder_slots, placeholder_widths)

logger = logging.getLogger(__name__)


@dataclass
class ModelOutput:
    logits: torch.Tensor                # [batch, pos, vocab]
    loss: torch.Tensor | None = None    # scalar, when labels were given
    state: StreamState | None = None    # the caches after this forward (when use_cache)


class MossModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        text = cfg.text
        self.vision = build("vision", cfg.vision.kind, cfg.vision, text.hidden_size)
        self.embed_tokens = nn.Embedding(text.embedding_rows, text.hidden_size)
        self.blocks = nn.ModuleList(
            CrossAttnBlock(text, cfg.cross_attention, i) if i in text.cross_attention_layers else SelfAttnBlock(text, i)
            for i in range(text.num_layers))
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if text.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = build_rope(text.d_head, text.rope)
        self.hook_embed = hooklib.HookPoint()     # [batch, pos, d_model]
        self.hook_logits = hooklib.HookPoint()    # [batch, pos, vocab]
        self._hook_points = hooklib.name_hook_points(self, _public_hook_name(cfg))

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                aspect_ratio_ids: torch.Tensor | None = None, aspect_ratio_mask: torch.Tensor | None = None,
                cross_attention_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, grid_thw: torch.Tensor | None = None,
                media_nums_per_sample: list[int] | None = None, vision_position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                state: StreamState | None = None, use_cache: bool | None = None,
                frame_timestamps: list[float | None] | None = None,
                vision_chunked_length: int | None = None, dedup_frames: bool = False) -> ModelOutput:
        """Run the new tokens (and new frames) on top of `state`.

        input_ids [batch, pos]; pixel_values [batch, frame, tile, channel, H, W] (Mllama processor layout);
        aspect_ratio_ids [batch, frame]; aspect_ratio_mask [batch, frame, tile];
        cross_attention_mask [batch, text_pos, frame, tile] (1 = attend; default: each token sees the frames
        whose placeholder is at or before it); attention_mask [batch, pos] or [batch, past + pos] (1 = real);
        position_ids [batch, pos] (default: continue the state's cursor, padding does not advance it);
        MOSS-VL instead: pixel_values [patches, patch_dim], grid_thw [media, 3], media_nums_per_sample, and
        cross_attention_mask [batch, 1, text_pos, frame] (True = masked).
        vision_position_ids [batch, frame] placeholder positions of the new frames (default: found in the text).
        With `state` (or use_cache=True) the caches are extended in place and returned in the output.
        dedup_frames: run the tower once per distinct frame (training batches repeat static frames); the same
        logits and gradients, but hooks inside the tower then see only the distinct frames.
        """
        if state is None:
            state = StreamState()
            use_cache = bool(use_cache)
        else:
            use_cache = True if use_cache is None else use_cache
        mark = state.mark()
        try:
            vision_inputs = dict(pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                                 aspect_ratio_mask=aspect_ratio_mask, grid_thw=grid_thw,
                                 media_nums_per_sample=media_nums_per_sample, dedup_frames=dedup_frames)
            logits = self._forward(state, input_ids, inputs_embeds, vision_inputs, cross_attention_mask,
                                   attention_mask, position_ids, vision_position_ids, frame_timestamps,
                                   vision_chunked_length)
        except BaseException:
            state.restore(mark)  # a rejected step (bad input, a raising hook) leaves the caches as they were
            raise
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return ModelOutput(logits=logits, loss=loss, state=state if use_cache else None)

    def _forward(self, state, input_ids, inputs_embeds, vision_inputs, cross_attention_mask, attention_mask,
                 position_ids, vision_position_ids, frame_timestamps, vision_chunked_length) -> torch.Tensor:
        # 1. check and compute everything new (nothing touches the state until all inputs are accepted)
        x, ids = self._embed(input_ids, inputs_embeds)
        batch, seq = x.shape[:2]
        past = state.text.length
        valid = self._token_validity(attention_mask, batch, seq, past, x.device)
        new = slots = None
        if vision_inputs["pixel_values"] is not None:
            new = encode_new_frames(self, vision_inputs, vision_chunked_length)
            if vision_position_ids is None:
                if ids is None:
                    raise ModelInputError("with inputs_embeds and pixel_values, pass vision_position_ids "
                                          "(the placeholder position of each frame)")
                if cross_attention_mask is not None:
                    _drop_unreferenced_media(new, ids, self.config.tokens.image_token_id)
                slots = placeholder_slots(ids, self.config.tokens.image_token_id, new.frame_valid)
        elif ids is not None:
            check_no_stray_placeholders(ids, self.config.tokens.image_token_id)
        start = state.next_position if state.next_position is not None else x.new_zeros(batch, dtype=torch.long)
        widths = placeholder_widths(valid.shape, slots, new.frame_valid, new.frame_span) if slots else None
        # a token sits at the last position it consumes, so the cursor continues right after the last token
        positions = position_ids if position_ids is not None else cursor_positions(start, valid, widths)
        if new is not None:
            anchors = vision_position_ids.to(torch.long) if vision_position_ids is not None else \
                placeholder_anchors(slots, positions, new.frame_valid)
            timestamps = list(frame_timestamps) if frame_timestamps is not None else [None] * anchors.shape[1]
            if len(timestamps) != anchors.shape[1]:
                raise ModelInputError(f"frame_timestamps has {len(timestamps)} entries for {anchors.shape[1]} frames")

        # 2. commit to the state
        state.next_position = torch.maximum(start, positions.masked_fill(~valid, -1).max(-1).values + 1)
        state.tokens_seen += seq
        self_allowed = causal_allowed(state.text.extend_valid(valid), past)
        rotation = self.rope(positions) if self.rope is not None else None
        new_vision = new_rotation = None
        if new is not None:
            new_vision, new_rotation = new.states, self._key_rotation(new, anchors)
            text = self.config.text
            bytes_per_token = 2 * text.num_kv_heads * text.d_head * new.states.element_size() * len(
                text.cross_attention_layers)
            state.vision.add_frames(anchors, new.frame_valid, new.key_frame, _frame_tokens(new), bytes_per_token,
                                    timestamps)

        cross_allowed = frame_visibility = row_mask = None
        if state.vision.has_frames:
            cross_allowed, frame_visibility = self._visibility(state, positions, cross_attention_mask, past, seq)
            row_mask = frame_visibility.new_ones(frame_visibility.shape[:2]) if cross_allowed is None \
                else cross_allowed.any(-1)

        ctx = DecoderContext(rotation=rotation, self_allowed=self_allowed, text_cache=state.text,
                             vision_cache=state.vision, new_vision=new_vision, new_vision_rotation=new_rotation,
                             cross_allowed=cross_allowed, frame_visibility=frame_visibility, row_mask=row_mask)
        x = self.hook_embed(x)
        for block in self.blocks:
            if block.kind == "cross" and not state.vision.has_frames:
                continue  # no frame anywhere yet: the layer is the identity (pure-text path)
            x = block(x, ctx)
        return self.hook_logits(self.lm_head(self.norm(x)))

    # ------------------------------------------------------------------ pieces of forward

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ModelInputError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            return inputs_embeds, None
        if input_ids.dim() != 2:
            raise ModelInputError(f"input_ids must be [batch, pos], got shape {tuple(input_ids.shape)}")
        rows = self.embed_tokens.num_embeddings
        if input_ids.numel() and (int(input_ids.max()) >= rows or int(input_ids.min()) < 0):
            raise ModelInputError(f"input_ids outside the embedding table (0..{rows - 1}): "
                                  f"min {int(input_ids.min())}, max {int(input_ids.max())}")
        return self.embed_tokens(input_ids), input_ids

    @staticmethod
    def _token_validity(attention_mask, batch: int, seq: int, past: int, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        if attention_mask.shape[-1] == past + seq:
            attention_mask = attention_mask[:, past:]
        if tuple(attention_mask.shape) != (batch, seq):
            raise ModelInputError(f"attention_mask must be [batch, pos] or [batch, past + pos]; got "
                                  f"{tuple(attention_mask.shape)} for {seq} new tokens after {past} cached")
        return attention_mask.bool()

    def encode_frames(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor | None,
                      aspect_ratio_mask: torch.Tensor | None, chunk: int | None = None) -> torch.Tensor:
        """pixel_values [batch, frame, tile, channel, H, W] -> [batch, frame, vis_per_frame, d_model].

        `chunk` bounds how many frames the tower sees at once (memory only; outputs are identical).
        """
        if pixel_values.dim() != 6:
            raise ModelInputError(f"pixel_values must be [batch, frame, tile, channel, height, width] (6-D); got "
                                  f"{pixel_values.dim()}-D shape {tuple(pixel_values.shape)}")
        frames = pixel_values.shape[1]
        aspect_ratio_ids, aspect_ratio_mask = single_tile_defaults(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        pixel_values = pixel_values.to(self.embed_tokens.weight.dtype)
        step = chunk or frames
        parts = [self.vision(pixel_values[:, i:i + step], aspect_ratio_ids[:, i:i + step],
                             aspect_ratio_mask[:, i:i + step]) for i in range(0, frames, step)]
        return torch.cat(parts, dim=1)

    def _key_rotation(self, new: NewFrames, anchors: torch.Tensor) -> Rotation | None:
        """RoPE tables for the new frames' keys [batch, vis_new, d_head], by `cross_attention.key_rope`."""
        kind = self.config.cross_attention.key_rope
        if kind == "none" or self.rope is None:
            return None
        safe = anchors.clamp(max=torch.iinfo(torch.int32).max)  # padding frames sit at "never"
        frame_of_key = new.key_frame.clamp(min=0)
        if kind == "frame":  # every token of a frame shares its placeholder's position (video-preview §3.4)
            return self.rope(safe.gather(1, frame_of_key))
        base = safe - (new.frame_span - 1)  # t_f: the placeholder sits at t_f + M_f (moss-vl §4.2)
        return self.rope(base.gather(1, frame_of_key)[None] + new.key_offsets)  # [3, batch, vis_new] positions

    def _visibility(self, state: StreamState, positions, cross_attention_mask, past: int, seq: int):
        vision = state.vision
        if cross_attention_mask is not None and MASK_CONVENTION[self.config.vision.kind] == "mllama":
            tiles = cross_attention_mask.shape[-1]
            first = vision.segments[0].token_span
            return mllama_cross_mask(cross_attention_mask, past, seq, (first[1] - first[0]) // tiles,
                                     vision.num_tokens)
        if cross_attention_mask is not None:
            return moss_cross_mask(cross_attention_mask, past, seq, vision.key_frame)
        frame_visibility = frame_visibility_from_anchors(vision.anchor_positions, vision.frame_valid, positions)
        if bool(frame_visibility.all()) and int(vision.key_frame.min()) >= 0:
            # the usual streaming step: every row sees every cached key, so no [query_pos, vis] mask is built
            # (None = all visible); with hundreds of unpooled frames that mask costs as much as a text layer
            return None, frame_visibility
        return keys_from_frames(frame_visibility, vision.key_frame), frame_visibility

    # ------------------------------------------------------------------ generation and hooks

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Autoregressive generation with both caches; returns [batch, prompt + new] (see generation.decode)."""
        from .generation.decode import generate
        return generate(self, input_ids, **kwargs)

    def offline_generate(self, processor: Any, new_queries: Any, output_text_queue: Any,
                         vision_chunked_length: int = 64) -> None:
        """The model cards' queue worker: query dicts in, text pieces then "<|round_end|>" out (generation.offline)."""
        from .generation.offline import offline_generate
        offline_generate(self, processor, new_queries, output_text_queue, vision_chunked_length=vision_chunked_length)

    def stop_offline_generate(self) -> None:
        from .generation.offline import stop_offline_generate
        stop_offline_generate(self)

    def real_time_generate(self, image_queue: Any, prompt_queue: Any, token_queue: Any, processor: Any,
                           **kwargs: Any) -> None:
        """The cards' blocking real-time loop: frames and prompts in, text / markers out (streaming.threads)."""
        from .streaming.threads import real_time_generate
        real_time_generate(self, image_queue, prompt_queue, token_queue, processor, **kwargs)

    def stop_real_time_generate(self) -> None:
        from .streaming.threads import stop_real_time_generate
        stop_real_time_generate(self)

    def create_realtime_session(self, processor: Any, initial_prompt: str | None = None,
                                system_prompt: str | None = None, frame_queue_size: int = 256,
                                max_tokens_per_turn: float | None = None, **generate_kwargs: Any) -> Any:
        """MOSS-VL's session API: a ThreadedSession (start / push_frame / push_prompt / poll_output / close)."""
        from .streaming.threads import create_realtime_session
        return create_realtime_session(self, processor, initial_prompt, system_prompt, frame_queue_size,
                                       max_tokens_per_turn, **generate_kwargs)

    def online_generate(self, processor: Any, input_queue: Any, output_queue: Any, frame_queue_size: int = 256,
                        max_tokens_per_turn: float | None = None, **generate_kwargs: Any) -> None:
        """MOSS-VL's blocking queue API: frame / prompt / stop messages in, text / markers out (streaming.threads)."""
        from .streaming.threads import online_generate
        online_generate(self, processor, input_queue, output_queue, frame_queue_size, max_tokens_per_turn,
                        **generate_kwargs)

    def offline_batch_generate(self, processor: Any, queries: list[dict], session_states: list | None = None,
                               vision_chunked_length: int = 64) -> dict:
        """Left-padded batched generation with per-item multi-turn state (generation.offline)."""
        from .generation.offline import offline_batch_generate
        return offline_batch_generate(self, processor, queries, session_states=session_states,
                                      vision_chunked_length=vision_chunked_length)

    def hook_names(self) -> list[str]:
        return list(self._hook_points)

    @contextlib.contextmanager
    def hooks(self, pairs: Iterable[tuple[Any, hooklib.HookFn]]) -> Iterator["MossModel"]:
        """Attach `(name or filter, fn)` hooks for the block; they are removed on exit, also on errors."""
        with hooklib.attach(self._hook_points, pairs):
            yield self

    def run_with_cache(self, names_filter: Any = None, device: str | None = None,
                       **inputs: Any) -> tuple[ModelOutput, hooklib.ActivationCache]:
        """Forward once recording the selected hook activations (default: all)."""
        store: dict[str, torch.Tensor] = {}
        with self.hooks(hooklib.recording_hooks(self._hook_points, names_filter, device, store)):
            out = self(**inputs)
        return out, hooklib.ActivationCache(store)

    def set_numerics(self, mode: str) -> "MossModel":
        """"reference": the fast path that parity tests hold to transformers (SDPA, softmax in fp32, weights in
        their dtype). "analysis": eager attention in every layer (all patterns materialised) and fp32 weights,
        for inspection; costs time and memory."""
        if mode not in ("reference", "analysis"):
            raise ValueError(f"numerics mode {mode!r}; expected 'reference' or 'analysis'")
        for module in self.modules():
            if hasattr(module, "force_eager"):
                module.force_eager = mode == "analysis"
        if mode == "analysis":
            self.float()
        self.numerics = mode
        return self

    def rebuild_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers (rotary tables), e.g. after materialising a meta-built model."""
        rope = build_rope(self.config.text.d_head, self.config.text.rope)
        self.rope = rope.to(device) if rope is not None else None


def _drop_unreferenced_media(new: NewFrames, ids: torch.Tensor, placeholder_id: int) -> None:
    """A batch item whose text has no placeholder at all carries only a stand-in medium (MOSS-VL's blank image
    for text-only prompts, spec moss-vl §2.2); its explicit mask hides it, so treat it as padding."""
    empty = ~(ids == placeholder_id).any(dim=1)
    if bool(empty.any()):
        new.frame_valid[empty] = False
        new.key_frame[empty] = -1


def _frame_tokens(new: NewFrames) -> list[int]:
    """Vision-axis slots of each new frame in batch item 0's layout (padding tiles included)."""
    frames = new.frame_valid.shape[1]
    if new.key_offsets is None:  # uniform layout: every frame owns the same number of slots
        return [new.key_frame.shape[1] // max(frames, 1)] * frames
    counts = torch.bincount(new.key_frame[0][new.key_frame[0] >= 0], minlength=frames)
    return counts.tolist()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted cross-entropy in fp32; labels -100 are ignored. logits [batch, pos, vocab]; labels [batch, pos]."""
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)


def _public_hook_name(cfg: ModelConfig):
    """Module path -> public hook name (TransformerLens habits: `attn`, one `vision.blocks` numbering)."""
    local_layers = getattr(cfg.vision, "num_layers", 0)

    def rename(path: str) -> str:
        path = re.sub(r"^blocks\.(\d+)\.self_attn\.", r"blocks.\1.attn.", path)
        path = re.sub(r"^vision\.transformer\.layers\.(\d+)\.", r"vision.blocks.\1.", path)
        return re.sub(r"^vision\.global_transformer\.layers\.(\d+)\.",
                      lambda m: f"vision.blocks.{local_layers + int(m.group(1))}.", path)

    return rename


def init_text_weights(model: MossModel, std: float = 0.02) -> None:
    """Normal(0, std) for text linears and embeddings (Llama practice); norms stay at one, gates at zero."""
    for module in [model.embed_tokens, model.lm_head, *model.blocks]:
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                nn.init.normal_(sub.weight, mean=0.0, std=std)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                init_from: MossModel | None = None) -> MossModel:
    """A randomly initialised model. device="meta" builds shapes only (for manifests and big presets).

    With `init_from`, every weight whose name and shape still fit is copied from that model; the rest stay
    freshly initialised, and `model.swap_report` says which (see swaps.SwapReport).
    """
    if init_from is not None:
        from .swaps import transfer_weights
        model = build_model(cfg, device=device, dtype=dtype)
        model.swap_report = transfer_weights(model, init_from)
        logger.info("%s", model.swap_report)
        return model
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = MossModel(cfg)
    if str(device) != "meta":
        init_text_weights(model)
    if dtype is not None:
        model = model.to(dtype)
        if model.rope is not None:
            model.rope.inv_freq = model.rope.inv_freq.float()  # rotary tables stay fp32
    return model
