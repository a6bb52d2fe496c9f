"""Benchmark pass marks (`TARGETS`), cache policies from spec data, and cache policies reaching the sessions."""

from __future__ import annotations

import math

import pytest

import mossvl_lab as ml
from mossvl_lab.config import ToyConvConfig, override
from mossvl_lab.streaming.cache_policies import PoolAged, TextWindow, VisionWindow
from mossvl_lab.streaming.events import CacheEvicted
from mossvl_lab.training import evaluate as evaluate_module
from mossvl_lab.training.evaluate import cache_policy_from_spec, check_targets, evaluate
from mossvl_lab.training.metrics import Metrics



def _metrics(recalled=19, targets=20, exact=None, false_alarms=1, quiet=20, qa_correct=0, qa_total=0):
    return Metrics(clips=1, targets=targets, recalled=recalled, exact=recalled if exact is None else exact,
                   quiet_frames=quiet, false_alarms=false_alarms, qa_correct=qa_correct, qa_total=qa_total)


def test_targets_at_their_boundaries():
    # 190/200 = 95% recall, 10/200 = 5% false alarms, 171/190 = 90% captions: exactly at the marks, so met
    at_marks = _metrics(recalled=190, targets=200, exact=171, false_alarms=10, quiet=200)
    assert [(t.metric, met) for t, _, met in check_targets(at_marks, "video_preview")] == [
        ("event_recall", True), ("false_alarm_rate", True), ("caption_exact_match", True)]
    worse = _metrics(recalled=18, exact=16, false_alarms=2)  # 90% recall, 10% alarms, 16/18 = 88.9% captions
    assert [met for _, _, met in check_targets(worse, "video_preview")] == [False, False, False]
    values = [v for _, v, _ in check_targets(worse, "video_preview")]
    assert values == pytest.approx([18 / 20, 2 / 20, 16 / 18])


def test_timestamp_qa_is_a_target_only_where_frames_carry_timestamps():
    good = _metrics(recalled=20, false_alarms=0, qa_correct=9, qa_total=10)
    assert [t.metric for t, _, _ in check_targets(good, "mllama")] == \
        ["event_recall", "false_alarm_rate", "caption_exact_match"]
    assert all(met for _, _, met in check_targets(good, "moss_vl"))
    assert [t.metric for t, _, _ in check_targets(good, "moss_vl")][-1] == "qa_accuracy"
    no_qa = check_targets(_metrics(recalled=20, false_alarms=0), "moss_vl")
    assert math.isnan(no_qa[-1][1]) and no_qa[-1][2] is False  # nothing measured never passes
    no_targets = check_targets(_metrics(recalled=0, targets=0, false_alarms=0), "video_preview")
    assert [met for _, _, met in no_targets] == [False, True, False]


def test_cache_policies_from_plain_data(tiny_model):
    assert cache_policy_from_spec(None) == []
    assert cache_policy_from_spec({"window": {"frames": 2}}) == [VisionWindow(frames=2)]
    assert cache_policy_from_spec([{"text_window": {"sinks": 4, "window": 8}}, {"window": {"seconds": 3.0}}]) == \
        [TextWindow(sinks=4, window=8), VisionWindow(seconds=3.0)]
    # with a model, pooling keeps the CLS token of an Mllama-style tower
    assert cache_policy_from_spec({"pool": {"after_frames": 4, "factor": 2}}, tiny_model) == \
        [PoolAged(after_frames=4, factor=2, keep_first=1, keep_last=0)]
    assert [p.name for p in cache_policy_from_spec({"unbounded": None, "window": {"frames": 1}})] == \
        ["unbounded", "window"]
    for bad, match in [({"windows": {"frames": 2}}, "unknown cache policy 'windows'"),
                       ({"window": {"frame": 2}}, "cache policy 'window': .*frame"),
                       ({"window": {"frames": 0}}, "frames must be an integer >= 1"),
                       ({"window": 2}, "arguments must be a mapping"),
                       ("window", "must be a mapping")]:
        with pytest.raises(ValueError, match=match):
            cache_policy_from_spec(bad)


def test_evaluate_hands_the_cache_policy_to_every_session(monkeypatch):
    cfg = override(ml.config.preset("video-preview-tiny"),
                   {"vision": ToyConvConfig(image_size=56), "text.num_layers": 2, "text.cross_attention_layers": [1]})
    model = ml.build_model(cfg)
    processor = ml.processor_for_model(cfg)
    seen = []

    class Recording(evaluate_module.RealtimeSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.record = {"policies": list(self.cache_policies), "max_frames": 0, "evicted": 0}
            seen.append(self.record)

        def step(self):
            events = super().step()
            self.record["max_frames"] = max(self.record["max_frames"], self.stream.vision.num_frames)
            self.record["evicted"] += sum(isinstance(e, CacheEvicted) for e in events)
            return events

    monkeypatch.setattr(evaluate_module, "RealtimeSession", Recording)
    seeds = [1_000_000, 1_000_001]
    kwargs = {"frame_size": 56, "clip_seconds": (3, 4), "max_tokens_per_turn": 4}
    evaluate(model, processor, seeds, **kwargs)
    unbounded = list(seen)
    seen.clear()
    evaluate(model, processor, seeds, cache_policy=VisionWindow(frames=1), **kwargs)
    assert [r["policies"] for r in unbounded] == [[], []] and [r["policies"] for r in seen] == \
        [[VisionWindow(frames=1)]] * 2
    assert all(r["max_frames"] >= 3 and r["evicted"] == 0 for r in unbounded)  # every 3-4 s clip stays cached
    assert all(r["max_frames"] == 1 and r["evicted"] >= 2 for r in seen)       # the window keeps one frame
