"""Cache eviction: exact K/V surgery, and eviction == hiding (spec moss-vl §3.5, §8.3 "Long sessions").

Expectations come from independent paths: evicted K/V are compared with slices taken before the eviction,
pooled K/V with means computed by hand, a forward after evicting frames with a forward on an untouched copy
whose rows are told not to see those frames (`interventions.hide_frames`), and a forward after dropping text
with one whose dropped tokens are only marked invalid in the causal mask.
"""

from __future__ import annotations

import math

import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.cache import TextKVCache, VisionKVCache, _Growable
from mossvl_lab.interventions import hide_frames
from mossvl_lab.streaming.cache_policies import (CachePolicy, PoolAged, TextWindow, Unbounded, VisionWindow,
                                                 apply_policies)
from mossvl_lab.streaming.events import CacheEvicted, FrameDropped
from reference import tiny_model

TOL = 1e-5


def _model(preset: str) -> ml.MossModel:
    return tiny_model(preset)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Toy models stepped one token or frame at a time: extra threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def preview():
    return _model("video-preview-tiny")


@pytest.fixture(scope="module")
def mossvl():
    return _model("moss-vl-tiny")


def _preview_stream(model, frames: int, seed: int = 0):
    """Video-preview ids: a short prefix, then per frame its placeholder and 3 text tokens; pixels per frame."""
    g = torch.Generator().manual_seed(seed)
    image = model.config.tokens.image_token_id
    ids = [1, 9, 10]
    for _ in range(frames):
        ids += [image] + torch.randint(5, 400, (3,), generator=g).tolist()
    size = model.config.vision.image_size
    return torch.tensor([ids]), torch.randn(1, frames, 1, 3, size, size, generator=g)


def _preview_state(model, frames: int, timestamps=None, seed: int = 0) -> ml.StreamState:
    ids, pixels = _preview_stream(model, frames, seed)
    state = ml.StreamState()
    with torch.no_grad():
        model(ids, pixel_values=pixels, state=state,
              frame_timestamps=timestamps if timestamps is not None else [float(i) for i in range(frames)])
    return state


MOSS_SIZES = [(32, 48), (64, 32), (16, 16), (32, 32), (48, 16)]  # pixels; merged grids 2x3, 4x2, 1x1, 2x2, 3x1


def _moss_inputs(model, sizes, seed: int = 0):
    """MOSS-VL ids (2 text tokens before each <|image_pad|>) and packed patches + grid_thw for the frames."""
    g = torch.Generator().manual_seed(seed)
    pad = model.config.tokens.image_token_id
    ids = [5, 6, 7]
    for _ in sizes:
        ids += torch.randint(10, 500, (2,), generator=g).tolist() + [pad]
    patch = model.config.vision.patch_size
    grids = [(1, h // patch, w // patch) for h, w in sizes]
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), model.config.vision.patch_dim, generator=g)
    return torch.tensor([ids + [8, 9]]), pixels, torch.tensor(grids)


def _moss_state(model, sizes, timestamps) -> ml.StreamState:
    ids, pixels, grid_thw = _moss_inputs(model, sizes)
    state = ml.StreamState()
    with torch.no_grad():
        model(ids, pixel_values=pixels, grid_thw=grid_thw, state=state, frame_timestamps=timestamps)
    return state


def _snapshot(cache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {i: tuple(t.clone() for t in g.view()) for i, g in cache._layers.items()}


# --------------------------------------------------------------------------- buffers


def test_growable_drop_shifts_the_tail_and_releases_memory_when_mostly_empty():
    g = torch.Generator().manual_seed(0)
    buf = _Growable()
    k, v = torch.randn(1, 2, 100, 4, generator=g), torch.randn(1, 2, 100, 4, generator=g)
    buf.append(k, v)
    capacity = buf.capacity
    buf.drop(10, 13)  # overlapping shift (tail longer than the gap)
    assert buf.capacity == capacity and buf.length == 97
    assert torch.equal(buf.view()[0], torch.cat([k[:, :, :10], k[:, :, 13:]], dim=2))
    assert torch.equal(buf.view()[1], torch.cat([v[:, :, :10], v[:, :, 13:]], dim=2))
    buf.drop(0, 60)  # non-overlapping shift; 37 left of 100 slots: capacity kept
    assert buf.length == 37 and buf.capacity == capacity
    assert torch.equal(buf.view()[0], k[:, :, 63:])
    buf.drop(5, 20)  # 22 < 100 / 4: reallocated to twice the length
    assert buf.length == 22 and buf.capacity == 44
    assert torch.equal(buf.view()[0], torch.cat([k[:, :, 63:68], k[:, :, 83:]], dim=2))
    assert buf.allocated_bytes() == 2 * 44 * 2 * 4 * 4
    buf.drop(3, 3)
    assert buf.length == 22
    with pytest.raises(ValueError, match="outside"):
        buf.drop(20, 30)
    with pytest.raises(ValueError, match="outside"):
        buf.drop(5, 4)


# --------------------------------------------------------------------------- text


def test_text_drop_removes_exactly_the_range_in_every_layer_and_reports_bytes(preview):
    state = _preview_state(preview, frames=3)
    text = state.text
    before, valid = _snapshot(text), text.key_valid.clone()
    length = text.length
    freed = text.drop(2, 9)
    cfg = preview.config.text
    self_layers = cfg.num_layers - len(cfg.cross_attention_layers)
    assert freed == 7 * self_layers * 2 * cfg.num_kv_heads * cfg.d_head * 4
    assert text.length == length - 7
    assert torch.equal(text.key_valid, torch.cat([valid[:, :2], valid[:, 9:]], dim=1))
    assert set(before) == set(text._layers)
    for i, (k, v) in before.items():
        k2, v2 = text.layer(i)
        assert torch.equal(k2, torch.cat([k[:, :, :2], k[:, :, 9:]], dim=2))
        assert torch.equal(v2, torch.cat([v[:, :, :2], v[:, :, 9:]], dim=2))
    assert text.drop(3, 3) == 0
    with pytest.raises(ValueError, match="outside"):
        text.drop(0, text.length + 1)


@pytest.mark.parametrize("preset", ["video-preview-tiny", "moss-vl-tiny"])
def test_dropping_text_equals_masking_it_out(preset, preview, mossvl):
    """Dropped text K/V and the same tokens marked invalid (never attended) give the same next logits, and
    positions continue from the cursor (MOSS-VL frames consume several positions each)."""
    model = preview if preset == "video-preview-tiny" else mossvl
    if preset == "video-preview-tiny":
        evicted, reference = _preview_state(model, 3), _preview_state(model, 3)
    else:
        evicted, reference = (_moss_state(model, MOSS_SIZES[:3], [0.0, 1.0, 2.0]) for _ in range(2))
    cursor = evicted.next_position.clone()
    TextWindow(sinks=2, window=5).apply(evicted)
    assert evicted.text.length == 7 and torch.equal(evicted.next_position, cursor)
    reference.text.key_valid = reference.text.key_valid.clone()
    reference.text.key_valid[:, 2:-5] = False
    new = torch.tensor([[20, 21, 22]])
    with torch.no_grad():
        got = model(new, state=evicted).logits
        want = model(new, state=reference).logits
    assert (got - want).abs().max().item() <= TOL


def test_text_window_keeps_memory_bounded_over_2000_steps(preview):
    sinks, window = 4, 32
    policy = TextWindow(sinks=sinks, window=window)
    cfg = preview.config.text
    self_layers = cfg.num_layers - len(cfg.cross_attention_layers)
    per_token = self_layers * 2 * cfg.num_kv_heads * cfg.d_head * 4
    bound = (sinks + window + 1) * per_token  # one single-token step on top of the window
    state, steps = ml.StreamState(), 2000
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 400, (steps + 10,), generator=g)
    dropped, peak, logits = _run_text_window(preview, policy, state, tokens, sinks, window, bound, per_token)
    assert torch.isfinite(logits).all()
    assert state.text.length == sinks + window and dropped == steps + 10 - sinks - window
    assert int(state.next_position) == steps + 10  # positions were never re-indexed
    # the buffers never grew past the first doubling above the bound (16 -> 32 -> 64 slots)
    assert all(layer.capacity == 64 for layer in state.text._layers.values())
    assert peak == 64 * per_token


def _run_text_window(model, policy, state, tokens, sinks, window, bound, per_token):
    """Prefill 10 tokens, then one token per step, applying the policy after every step as a session does."""
    with torch.no_grad():
        model(tokens[None, :10], state=state)
        dropped, peak = sum(e.count for e in policy.apply(state)), 0
        for i in range(10, tokens.shape[0]):
            logits = model(tokens[None, i:i + 1], state=state).logits
            assert state.text.length <= sinks + window + 1
            assert state.memory_bytes() <= bound
            peak = max(peak, state.text.allocated_bytes())
            events = policy.apply(state)
            assert all(isinstance(e, CacheEvicted) and e.kind == "text" and e.bytes_freed == e.count * per_token
                       for e in events)
            dropped += sum(e.count for e in events)
    return dropped, peak, logits


# --------------------------------------------------------------------------- vision: drop


def test_drop_frames_removes_exact_slices_and_renumbers(preview):
    state = _preview_state(preview, frames=5)
    vision = state.vision
    before, segments = _snapshot(vision), vision.frames
    anchors, valid = vision.anchor_positions.clone(), vision.frame_valid.clone()
    per_frame = segments[0].token_span[1]
    removed, freed = vision.drop_frames(3)
    cut = 3 * per_frame
    assert removed == segments[:3]
    assert freed == sum(s.bytes for s in segments[:3]) and vision.memory_bytes() == sum(s.bytes for s in segments[3:])
    for i, (k, v) in before.items():
        k2, v2 = vision.layer(i)
        assert torch.equal(k2, k[:, :, cut:]) and torch.equal(v2, v[:, :, cut:])
    assert [s.frame_index for s in vision.frames] == [3, 4]
    assert [s.timestamp for s in vision.frames] == [3.0, 4.0]
    assert [s.position for s in vision.frames] == [s.position for s in segments[3:]]
    assert [s.token_span for s in vision.frames] == [(0, per_frame), (per_frame, 2 * per_frame)]
    assert torch.equal(vision.anchor_positions, anchors[:, 3:]) and torch.equal(vision.frame_valid, valid[:, 3:])
    assert torch.equal(vision.key_frame, torch.arange(2).repeat_interleave(per_frame)[None])
    assert vision.num_tokens == 2 * per_frame and vision.frames_evicted == 3
    assert vision.drop_frames(0) == ([], 0)
    with pytest.raises(ValueError, match="count"):
        vision.drop_frames(3)


def test_vision_window_equals_hiding_the_evicted_frames(preview):
    """After VisionWindow(frames=2) on 5 frames, new text (and then a new frame) gives the logits of an untouched
    copy whose rows are hidden from frames 0-2; frame indices keep running after the eviction."""
    evicted, reference = _preview_state(preview, 5), _preview_state(preview, 5)
    events = VisionWindow(frames=2).apply(evicted)
    assert [e for e in events if isinstance(e, FrameDropped)] == [
        FrameDropped(timestamp=float(t), reason="window") for t in range(3)]
    assert events[-1] == CacheEvicted(kind="vision", policy="window", count=3,
                                      bytes_freed=3 * reference.vision.segments[0].bytes)
    new = torch.tensor([[20, 21, 22, 23]])
    ids, pixels = _preview_stream(preview, 1, seed=7)
    frame_step = ids[:, 3:]  # placeholder + 3 text tokens
    with torch.no_grad():
        got = [preview(new, state=evicted).logits,
               preview(frame_step, pixel_values=pixels, state=evicted, frame_timestamps=[5.0]).logits]
        with preview.hooks(hide_frames(preview, frames=[0, 1, 2])):
            want = [preview(new, state=reference).logits,
                    preview(frame_step, pixel_values=pixels, state=reference, frame_timestamps=[5.0]).logits]
        visible = preview(new, state=_preview_state(preview, 5)).logits
    assert (got[0] - want[0]).abs().max().item() <= TOL
    assert (got[1] - want[1]).abs().max().item() <= TOL
    assert (got[0] - visible).abs().max().item() > 1e-3  # the evicted frames did matter
    assert [s.frame_index for s in evicted.vision.frames] == [3, 4, 5]
    assert evicted.vision.key_frame.max().item() == 2 and evicted.vision.num_frames == 3


def test_seconds_window_on_moss_vl_frames_of_different_sizes(mossvl):
    """Timestamps decide: with the newest at 4.0 s and a 1.5 s window, frames at 0, 0.5 and 2.0 s go; the
    frame at exactly 2.5 s stays. Token spans of unequal frames are cut and renumbered correctly."""
    stamps = [0.0, 0.5, 2.0, 2.5, 4.0]
    evicted, reference = _moss_state(mossvl, MOSS_SIZES, stamps), _moss_state(mossvl, MOSS_SIZES, stamps)
    sizes = [s.token_span[1] - s.token_span[0] for s in evicted.vision.frames]
    assert sizes == [7, 9, 2, 5, 4]  # merged grid + separator
    before = _snapshot(evicted.vision)
    events = VisionWindow(seconds=1.5).apply(evicted)
    assert [e.timestamp for e in events if isinstance(e, FrameDropped)] == [0.0, 0.5, 2.0]
    assert events[-1].count == 3 and events[-1].bytes_freed == sum(s.bytes for s in reference.vision.frames[:3])
    assert [s.token_span for s in evicted.vision.frames] == [(0, 5), (5, 9)]
    for i, (k, _) in before.items():
        assert torch.equal(evicted.vision.layer(i)[0], k[:, :, 18:])
    new = torch.tensor([[20, 21, 22]])
    with torch.no_grad():
        got = mossvl(new, state=evicted).logits
        with mossvl.hooks(hide_frames(mossvl, frames=[0, 1, 2])):
            want = mossvl(new, state=reference).logits
    assert (got - want).abs().max().item() <= TOL
    assert VisionWindow(seconds=1.5).apply(evicted) == []


def test_evicting_every_frame_equals_hiding_every_frame(mossvl):
    stamps = [0.0, 1.0]
    evicted, reference = _moss_state(mossvl, MOSS_SIZES[:2], stamps), _moss_state(mossvl, MOSS_SIZES[:2], stamps)
    removed, _ = evicted.vision.drop_frames(2)
    assert len(removed) == 2 and not evicted.vision.has_frames and evicted.vision.memory_bytes() == 0
    new = torch.tensor([[20, 21, 22]])
    with torch.no_grad():
        got = mossvl(new, state=evicted).logits
        with mossvl.hooks(hide_frames(mossvl, frames=[0, 1])):
            want = mossvl(new, state=reference).logits
    assert (got - want).abs().max().item() <= TOL


def test_seconds_window_needs_timestamps(preview):
    state = _preview_state(preview, 2, timestamps=[None, None])
    with pytest.raises(ValueError, match="timestamp"):
        VisionWindow(seconds=1.0).apply(state)
    events = VisionWindow(frames=1).apply(state)  # a frame count works without timestamps
    assert math.isnan(events[0].timestamp) and events[-1].count == 1


def test_drop_refuses_a_cut_that_splits_another_batch_items_frames(mossvl):
    """Batch item 1 packs its one big frame where batch item 0 keeps two small ones: no common cut."""
    pad = mossvl.config.tokens.image_token_id
    ids = torch.tensor([[5, pad, 6, pad, 7], [5, 6, 7, 8, pad]])
    patch = mossvl.config.vision.patch_size
    grids = [(1, 32 // patch, 48 // patch), (1, 16 // patch, 16 // patch), (1, 64 // patch, 32 // patch)]
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), mossvl.config.vision.patch_dim)
    state = ml.StreamState()
    with torch.no_grad():
        mossvl(ids, pixel_values=pixels, grid_thw=torch.tensor(grids), media_nums_per_sample=[2, 1], state=state)
    with pytest.raises(ValueError, match="batch item"):
        state.vision.drop_frames(1)
    removed, _ = state.vision.drop_frames(2)  # the whole block is a common boundary
    assert len(removed) == 2 and state.vision.num_tokens == 0


# --------------------------------------------------------------------------- vision: pool


def test_pool_aged_halves_aged_frames_once_and_keeps_the_cls_token(preview):
    state = _preview_state(preview, frames=4)
    vision = state.vision
    before, segments = _snapshot(vision), vision.frames
    per_frame = segments[0].token_span[1]  # 1 CLS + 4x4 pooled patches
    assert per_frame == 17
    policy = PoolAged(after_frames=2, factor=2).for_model(preview)
    assert (policy.keep_first, policy.keep_last) == (1, 0)
    events = policy.apply(state)
    per_token = segments[0].bytes // per_frame
    assert events == [CacheEvicted(kind="vision", policy="pool", count=2 * 8, bytes_freed=2 * 8 * per_token)]
    assert [s.token_span for s in vision.frames] == [(0, 9), (9, 18), (18, 35), (35, 52)]
    assert [s.bytes for s in vision.frames] == [9 * per_token] * 2 + [17 * per_token] * 2
    assert [s.pool_factor for s in vision.frames] == [2, 2, 1, 1]
    assert vision.memory_bytes() == sum(s.bytes for s in vision.frames) == vision.num_tokens * per_token
    for i, (k, v) in before.items():
        k2, v2 = vision.layer(i)
        for f in range(2):
            old, new = slice(17 * f, 17 * f + 17), slice(9 * f, 9 * f + 9)
            for a, b in ((k, k2), (v, v2)):
                assert torch.equal(b[:, :, new.start], a[:, :, old.start])  # CLS untouched
                pairs = a[:, :, old.start + 1:old.stop].unflatten(2, (8, 2)).mean(3)
                assert (b[:, :, new.start + 1:new.stop] - pairs).abs().max().item() <= 1e-6
        assert torch.equal(k2[:, :, 18:], k[:, :, 34:]) and torch.equal(v2[:, :, 18:], v[:, :, 34:])
    assert torch.equal(vision.key_frame, torch.tensor([[0] * 9 + [1] * 9 + [2] * 17 + [3] * 17]))
    assert policy.apply(state) == []  # pooled once
    ids, pixels = _preview_stream(preview, 1, seed=3)
    with torch.no_grad():
        preview(ids[:, 3:], pixel_values=pixels, state=state, frame_timestamps=[4.0])
        logits = preview(torch.tensor([[20, 21]]), state=state).logits
    assert torch.isfinite(logits).all()
    assert policy.apply(state)[0].count == 8  # frame 2 aged now
    assert [s.pool_factor for s in vision.frames] == [2, 2, 2, 1, 1]


def test_pool_keeps_the_moss_vl_separator_and_handles_an_odd_group(mossvl):
    state = _moss_state(mossvl, MOSS_SIZES[:2], [0.0, 1.0])  # 6 + sep, 8 + sep tokens
    vision = state.vision
    before = _snapshot(vision)
    policy = PoolAged(after_frames=0, factor=4).for_model(mossvl)
    assert (policy.keep_first, policy.keep_last) == (0, 1)
    policy.apply(state)
    assert [s.token_span for s in vision.frames] == [(0, 3), (3, 6)]  # ceil(6/4) + 1, ceil(8/4) + 1
    for i, (k, _) in before.items():
        k2 = vision.layer(i)[0]
        assert (k2[:, :, 0] - k[:, :, 0:4].mean(2)).abs().max().item() <= 1e-6
        assert (k2[:, :, 1] - k[:, :, 4:6].mean(2)).abs().max().item() <= 1e-6  # the short last group
        assert torch.equal(k2[:, :, 2], k[:, :, 6])  # separator
        assert (k2[:, :, 4] - k[:, :, 11:15].mean(2)).abs().max().item() <= 1e-6
        assert torch.equal(k2[:, :, 5], k[:, :, 15])
    with torch.no_grad():
        assert torch.isfinite(mossvl(torch.tensor([[20, 21]]), state=state).logits).all()


# --------------------------------------------------------------------------- policies together


def test_policies_compose_and_keep_a_long_stream_bounded(preview):
    policies = [Unbounded(), PoolAged(after_frames=2, factor=2).for_model(preview), VisionWindow(frames=4),
                TextWindow(sinks=3, window=24)]
    assert all(isinstance(p, CachePolicy) for p in policies)
    assert [p.name for p in policies] == ["unbounded", "pool", "window", "text_window"]
    image = preview.config.tokens.image_token_id
    size = preview.config.vision.image_size
    g = torch.Generator().manual_seed(0)
    state, peak, dropped = ml.StreamState(), 0, []
    with torch.no_grad():
        preview(torch.tensor([[1, 9, 10]]), state=state)
        for t in range(30):
            pixels = torch.randn(1, 1, 1, 3, size, size, generator=g)
            preview(torch.tensor([[image, 30 + t]]), pixel_values=pixels, state=state, frame_timestamps=[float(t)])
            events = apply_policies(policies, state)
            dropped += [e.timestamp for e in events if isinstance(e, FrameDropped)]
            peak = max(peak, state.vision.allocated_bytes())
            assert state.vision.num_frames <= 4
            assert [s.pool_factor for s in state.vision.frames][-2:] == [1] * min(2, state.vision.num_frames)
            assert all(s.pool_factor == 2 for s in state.vision.frames[:-2])
    assert dropped == [float(t) for t in range(26)]
    assert [s.frame_index for s in state.vision.frames] == [26, 27, 28, 29]
    per_token = state.vision.frames[-1].bytes // 17
    assert state.vision.memory_bytes() == (9 + 9 + 17 + 17) * per_token
    assert peak <= 2 * 4 * 17 * per_token  # never more than twice the largest window's worth of slots
    assert state.text.length <= 27


def test_policies_edit_caches_filled_under_inference_mode(preview):
    """Sessions run forwards under torch.inference_mode and apply policies outside it."""
    policies = [PoolAged(after_frames=1, factor=2).for_model(preview), VisionWindow(frames=2),
                TextWindow(sinks=2, window=6)]
    ids, pixels = _preview_stream(preview, 4)
    state = ml.StreamState()
    with torch.inference_mode():
        preview(ids, pixel_values=pixels, state=state, frame_timestamps=[0.0, 1.0, 2.0, 3.0])
    events = apply_policies(policies, state)
    assert {(e.kind, e.policy) for e in events if isinstance(e, CacheEvicted)} == {
        ("vision", "pool"), ("vision", "window"), ("text", "text_window")}
    assert all(t.is_inference() for g in [*state.text._layers.values(), *state.vision._layers.values()]
               for t in g.view())
    with torch.inference_mode():
        logits = preview(torch.tensor([[20, 21]]), state=state).logits
    assert torch.isfinite(logits).all() and state.text.length == 2 + 6 + 2
    normal = _preview_state(preview, 4)  # built under no_grad: edits keep ordinary tensors
    apply_policies(policies, normal)
    assert not any(t.is_inference() for g in normal.vision._layers.values() for t in g.view())


def test_bad_policy_arguments_name_the_field():
    with pytest.raises(ValueError, match="exactly one"):
        VisionWindow()
    with pytest.raises(ValueError, match="exactly one"):
        VisionWindow(frames=2, seconds=1.0)
    with pytest.raises(ValueError, match="frames"):
        VisionWindow(frames=0)
    with pytest.raises(ValueError, match="seconds"):
        VisionWindow(seconds=-1.0)
    with pytest.raises(ValueError, match="seconds"):
        VisionWindow(seconds=float("nan"))
    with pytest.raises(ValueError, match="factor"):
        PoolAged(after_frames=2, factor=1)
    with pytest.raises(ValueError, match="after_frames"):
        PoolAged(after_frames=-1, factor=2)
    with pytest.raises(ValueError, match="window"):
        TextWindow(sinks=0, window=0)
    with pytest.raises(ValueError, match="sinks"):
        TextWindow(sinks=1.5, window=4)
    vision = VisionKVCache()
    with pytest.raises(ValueError, match="factor"):
        vision.pool_frames([0], factor=0)
    with pytest.raises(ValueError, match="not cached"):
        vision.pool_frames([0], factor=2)
    assert TextKVCache().drop(0, 0) == 0
