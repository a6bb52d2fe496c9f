"""Incremental == full recomputation: the caches must reproduce one full forward exactly (fp32, <= 1e-5)."""

from __future__ import annotations

import pytest
import torch

import mossvl_lab as ml
from reference import tiny_model

TOL = 1e-5


def _model(preset: str) -> ml.MossModel:
    return tiny_model(preset)


def _stream(model, frames: int, first_token_is_frame: bool, seed: int = 0):
    """Token ids with `frames` placeholders interleaved with text, and one pixel tensor per frame."""
    g = torch.Generator().manual_seed(seed)
    image = model.config.tokens.image_token_id
    ids = [] if first_token_is_frame else [1, 9, 10]
    for _ in range(frames):
        ids += [image] + torch.randint(5, 400, (3,), generator=g).tolist()
    size = model.config.vision.image_size
    pixels = torch.randn(1, frames, 1, 3, size, size, generator=g)
    return torch.tensor([ids]), pixels


@pytest.mark.parametrize("preset,first_is_frame", [("video-preview-tiny", False), ("mllama-tiny", True)])
def test_token_by_token_decoding_equals_full_forward(preset, first_is_frame):
    """Prefill a prefix, then feed every later token alone (frames arrive with their placeholder)."""
    model = _model(preset)
    ids, pixels = _stream(model, frames=3, first_token_is_frame=first_is_frame)
    image = model.config.tokens.image_token_id
    with torch.no_grad():
        full = model(ids, pixel_values=pixels).logits

        state = ml.StreamState()
        prefix = 5
        frames_in_prefix = int((ids[0, :prefix] == image).sum())
        parts = [model(ids[:, :prefix], pixel_values=pixels[:, :frames_in_prefix], state=state).logits]
        next_frame = frames_in_prefix
        for i in range(prefix, ids.shape[1]):
            token = ids[:, i:i + 1]
            if int(token) == image:
                parts.append(model(token, pixel_values=pixels[:, next_frame:next_frame + 1], state=state).logits)
                next_frame += 1
            else:
                parts.append(model(token, state=state).logits)
    incremental = torch.cat(parts, dim=1)
    assert state.frames_seen == 3 and state.text.length == ids.shape[1]
    assert (incremental - full).abs().max().item() <= TOL


def test_generate_with_caches_equals_recomputation_without_them():
    """Greedy generation through the caches picks the same tokens as re-running the whole prefix each step."""
    model = _model("video-preview-tiny")
    ids, pixels = _stream(model, frames=2, first_token_is_frame=False, seed=3)
    with torch.no_grad():
        cached = model.generate(ids, pixel_values=pixels, max_new_tokens=8, eos_token_id=[])
        seq = ids
        for _ in range(8):
            logits = model(seq, pixel_values=pixels).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("preset", ["video-preview-tiny", "mllama-tiny"])
def test_frames_one_at_a_time_build_the_same_vision_cache(preset):
    model = _model(preset)
    ids, pixels = _stream(model, frames=3, first_token_is_frame=True, seed=5)
    image = model.config.tokens.image_token_id
    with torch.no_grad():
        together = ml.StreamState()
        model(ids, pixel_values=pixels, state=together)
        apart = ml.StreamState()
        starts = (ids[0] == image).nonzero().flatten().tolist() + [ids.shape[1]]
        for f in range(3):
            model(ids[:, starts[f]:starts[f + 1]], pixel_values=pixels[:, f:f + 1], state=apart)
    assert [s.token_span for s in together.vision.frames] == [s.token_span for s in apart.vision.frames]
    assert [s.position for s in together.vision.frames] == [s.position for s in apart.vision.frames]
    for layer in model.config.text.cross_attention_layers:
        for a, b in zip(together.vision.layer(layer), apart.vision.layer(layer)):
            assert a.shape[1] == model.config.text.num_kv_heads  # GQA-shaped, not expanded to query heads
            assert (a - b).abs().max().item() <= 1e-6


def test_cache_segments_report_positions_and_bytes():
    model = _model("video-preview-tiny")
    ids, pixels = _stream(model, frames=2, first_token_is_frame=False)
    state = ml.StreamState()
    with torch.no_grad():
        model(ids, pixel_values=pixels, state=state, frame_timestamps=[0.0, 1.0])
    image = model.config.tokens.image_token_id
    placeholder_positions = (ids[0] == image).nonzero().flatten().tolist()
    per_frame = model.config.vision.tokens_per_tile
    text = model.config.text
    expected_bytes = per_frame * 2 * text.num_kv_heads * text.d_head * 4 * len(text.cross_attention_layers)
    frames = state.vision.frames
    assert [f.position for f in frames] == placeholder_positions
    assert [f.timestamp for f in frames] == [0.0, 1.0]
    assert [f.token_span for f in frames] == [(0, per_frame), (per_frame, 2 * per_frame)]
    assert all(f.bytes == expected_bytes for f in frames)
    assert state.vision.memory_bytes() == 2 * expected_bytes
