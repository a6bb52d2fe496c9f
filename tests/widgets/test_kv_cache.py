"""KVCacheInspector: per-layer and per-frame rows equal the caches; eviction rows equal the policies' events."""

from __future__ import annotations

import pytest

import mossvl_lab as ml
from mossvl_lab.data.synthetic import make_clip
from mossvl_lab.streaming.cache_policies import PoolAged, VisionWindow
from mossvl_lab.streaming.events import CacheEvicted, FrameDropped
from mossvl_lab.widgets import KVCacheInspector, StreamStepper, WidgetInputError


def _clip(frames: int):
    clip = make_clip(2, size=56, min_seconds=frames, max_seconds=frames)
    return list(zip(clip.frames, clip.timestamps))


def test_following_a_stepper_it_shows_what_the_caches_hold_after_every_step(tiny):
    model, processor = tiny
    stepper = StreamStepper(model=model, processor=processor, clip=_clip(5), max_tokens_per_turn=2,
                            cache_policy=VisionWindow(frames=2))
    inspector = KVCacheInspector(stepper)
    policy_events = []
    stepper.add_listener(lambda session, events: policy_events.extend(
        e for e in events if isinstance(e, (CacheEvicted, FrameDropped))))
    stepper.run()
    stream = stepper.session.stream
    assert inspector.step == stepper.session.state.step
    assert [(r["frame_index"], r["timestamp"], r["position"], (r["start"], r["end"]), r["bytes"], r["pool_factor"])
            for r in inspector.segments] == [(s.frame_index, s.timestamp, s.position, s.token_span, s.bytes,
                                              s.pool_factor) for s in stream.vision.segments]
    assert [r["frame_index"] for r in inspector.segments] == [3, 4]
    totals = inspector.totals
    assert totals["bytes"] == stream.memory_bytes() == totals["text_bytes"] + totals["vision_bytes"]
    assert (totals["text_tokens"], totals["vision_frames"], totals["frames_evicted"]) == (stream.text.length, 2, 3)
    layers = model.config.text
    assert [r["layer"] for r in inspector.layers] == list(range(layers.num_layers))
    assert [r["kind"] for r in inspector.layers] == ["cross" if i in layers.cross_attention_layers else "self"
                                                     for i in range(layers.num_layers)]
    assert sum(r["bytes"] for r in inspector.layers) == stream.memory_bytes()
    assert {r["tokens"] for r in inspector.layers if r["kind"] == "self"} == {stream.text.length}
    # the eviction timeline is exactly the policy's events: one frame_dropped + one evicted row per old frame
    assert [(r["event"], r["policy"], r["count"], r["bytes_freed"]) for r in inspector.events] == [
        ("frame_dropped", e.reason, 1, 0) if isinstance(e, FrameDropped) else ("evicted", e.policy, e.count,
                                                                               e.bytes_freed)
        for e in policy_events]
    assert [r["timestamp"] for r in inspector.events if r["event"] == "frame_dropped"] == [0.0, 1.0, 2.0]
    assert len(inspector.history) == 1 + stepper.step_count  # the empty caches, then one row per decision
    assert inspector.history[-1]["vision_bytes"] == stream.vision.memory_bytes()


def test_pooling_shows_in_segments_and_events(tiny):
    model, processor = tiny
    stepper = StreamStepper(model=model, processor=processor, clip=_clip(3), max_tokens_per_turn=1,
                            cache_policy=PoolAged(after_frames=1, factor=4).for_model(model))
    inspector = KVCacheInspector(stepper)
    stepper.run()
    assert [r["pool_factor"] for r in inspector.segments] == [4, 4, 1]
    assert [r["tokens"] for r in inspector.segments] == [5, 5, 17]  # CLS + 16 pooled by 4, CLS + 16
    pooled = [r for r in inspector.events if r["policy"] == "pool"]
    assert [r["count"] for r in pooled] == [12, 12] and all(r["bytes_freed"] > 0 for r in pooled)


def test_polling_a_bare_session_refreshes_on_the_front_ends_message(tiny):
    model, processor = tiny
    session = ml.RealtimeSession(model, processor)
    inspector = KVCacheInspector(session, live=True, poll_ms=200)
    assert inspector.totals["vision_frames"] == 0 and inspector.step == 0
    session.step()
    frame, ts = _clip(1)[0]
    session.push_frame(frame, ts)
    session.step()
    assert inspector.totals["vision_frames"] == 0  # nothing read yet
    inspector._handle_custom_msg({"type": "refresh"}, [])
    assert inspector.totals["vision_frames"] == 1 and inspector.step == 2
    assert inspector.totals["bytes"] == session.stream.memory_bytes()


def test_bad_sources_and_poll_intervals_get_named_errors(tiny):
    model, processor = tiny
    with pytest.raises(WidgetInputError, match="RealtimeSession, StreamStepper or LiveStream"):
        KVCacheInspector(model)
    with pytest.raises(WidgetInputError, match="poll_ms"):
        KVCacheInspector(ml.RealtimeSession(model, processor), poll_ms=10)
