"""RealtimeSession: streaming == offline, silence parking, barge-in, backpressure, named errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.streaming.events import Decision, FrameDropped, FrameIngested, PromptAccepted, RoundEnd, TextDelta
from mossvl_lab.streaming.inputs import FrameInputError
from mossvl_lab.streaming.policies import AlwaysSpeakPolicy, SilenceThresholdPolicy, TeacherForcedPolicy
from mossvl_lab.streaming.session import FrameTimestampError, RealtimeSession, SessionClosedError
from reference import set_gates_nonzero

SIZES = {"video-preview-tiny": 56, "moss-vl-tiny": 64}


def _setup(preset):
    torch.manual_seed(0)
    cfg = ml.config.preset(preset)
    model = ml.build_model(cfg).eval()
    set_gates_nonzero(model, torch.Generator().manual_seed(1))
    return model, ml.processor_for_model(cfg)


def _frame(preset, seed):
    rng = np.random.default_rng(seed)
    size = SIZES[preset]
    return rng.integers(0, 255, (size, size, 3), dtype=np.uint8)


class _Recorder:
    """Captures every forward's inputs and logits (a forward pre-hook and the logits hook point)."""

    def __init__(self, model):
        self.inputs, self.logits = [], []
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)
        self._hooks = model.hooks([("hook_logits", lambda x, hook: self.logits.append(x.detach().clone()))])
        self._hooks.__enter__()

    def _record(self, module, args, kwargs):
        self.inputs.append({"input_ids": args[0] if args else kwargs["input_ids"], **kwargs})

    def close(self):
        self._handle.remove()
        self._hooks.__exit__(None, None, None)


@pytest.mark.parametrize("preset", list(SIZES))
def test_streaming_equals_offline_forward_over_the_same_stream(preset):
    model, processor = _setup(preset)
    silence = model.config.tokens.silence_token_id
    script = [silence, silence, 40, 41, silence, 42, silence, silence]
    session = RealtimeSession(model, processor, prompt="watch", policy=TeacherForcedPolicy(script))
    recorder = _Recorder(model)
    session.step()
    for i in range(6):
        session.push_frame(_frame(preset, i), float(i))
        if i == 3:
            session.push_prompt("what changed?")
        session.step()
        session.step()  # a second step: parked (nothing happens) or continues speaking
    recorder.close()
    stream_ids = torch.cat([r["input_ids"] for r in recorder.inputs], dim=1)
    streamed = torch.cat(recorder.logits, dim=1)
    with_pixels = [r for r in recorder.inputs if r.get("pixel_values") is not None]
    offline_inputs = {"pixel_values": torch.cat([r["pixel_values"] for r in with_pixels],
                                                dim=0 if preset == "moss-vl-tiny" else 1)}
    if preset == "moss-vl-tiny":
        offline_inputs["grid_thw"] = torch.cat([r["grid_thw"] for r in with_pixels])
    with torch.no_grad():
        offline = model(stream_ids, **offline_inputs).logits
    assert streamed.shape == offline.shape
    assert (streamed - offline).abs().max().item() <= 1e-4
    # each decided token enters the stream exactly once, at the start of the next forward (silence never twice)
    starts = [int(r["input_ids"][0, 0]) for r in recorder.inputs[1:]]
    assert starts == script[:len(starts)]


def test_parked_silence_waits_for_input_and_is_not_fed_twice():
    model, processor = _setup("video-preview-tiny")
    silence = model.config.tokens.silence_token_id
    session = RealtimeSession(model, processor, policy=TeacherForcedPolicy([silence] * 10))
    session.step()
    length = session.stream.text.length
    assert session.step() == [] and session.step() == []  # parked: no forward without input
    assert session.stream.text.length == length
    session.push_frame(_frame("video-preview-tiny", 0), 0.0)
    events = session.step()
    assert session.stream.text.length == length + 2  # the parked <|silence|> + the frame placeholder
    assert [type(e) for e in events][:2] == [FrameIngested, Decision]


def test_barge_in_closes_the_turn_in_the_same_caches():
    model, processor = _setup("video-preview-tiny")
    session = RealtimeSession(model, processor, policy=AlwaysSpeakPolicy())
    session.step()
    session.step()
    assert session.state.speaking
    frames_before = session.stream.vision.num_frames
    session.push_prompt("new question")
    events = session.step()
    kinds = [type(e) for e in events]
    assert kinds.index(RoundEnd) < kinds.index(PromptAccepted)
    assert next(e for e in events if isinstance(e, RoundEnd)).interrupted
    assert session.stream.vision.num_frames == frames_before  # nothing torn down


def test_bounded_queue_drops_the_oldest_frame_and_keeps_prompts():
    model, processor = _setup("video-preview-tiny")
    session = RealtimeSession(model, processor, max_frames_queued=3)
    for i in range(5):
        dropped = session.push_frame(_frame("video-preview-tiny", i), float(i))
        assert dropped == (i >= 3)
        session.push_prompt(f"q{i}")
    events = session.step() + session.step()
    drops = [e.timestamp for e in events if isinstance(e, FrameDropped)]
    assert drops == [0.0, 1.0]
    assert [e.text for e in events if isinstance(e, PromptAccepted)] == [f"q{i}" for i in range(5)]
    assert [e.timestamp for e in events if isinstance(e, FrameIngested)] == [2.0, 3.0, 4.0]
    assert session.state.frames_dropped == 2


def test_frames_in_one_step_are_ingested_in_timestamp_order():
    model, processor = _setup("moss-vl-tiny")
    session = RealtimeSession(model, processor)
    session.step()
    for ts in (0.0, 0.5, 1.0):
        session.push_frame(_frame("moss-vl-tiny", int(ts * 10)), ts)
    events = session.step()
    assert [e.timestamp for e in events if isinstance(e, FrameIngested)] == [0.0, 0.5, 1.0]
    assert [s.timestamp for s in session.stream.vision.frames] == [0.0, 0.5, 1.0]


def test_bad_frames_and_prompts_get_named_errors_and_the_session_survives():
    model, processor = _setup("video-preview-tiny")
    session = RealtimeSession(model, processor)
    session.step()
    session.push_frame(_frame("video-preview-tiny", 0), 2.0)
    with pytest.raises(FrameTimestampError, match="backwards"):
        session.push_frame(_frame("video-preview-tiny", 1), 1.0)
    with pytest.raises(FrameInputError, match=r"\[height, width, 3\]"):
        session.push_frame(np.zeros((56, 56)), 3.0)
    nan = np.full((56, 56, 3), np.nan, dtype=np.float32)
    with pytest.raises(FrameInputError, match="NaN"):
        session.push_frame(nan, 3.0)
    with pytest.raises(TypeError):
        session.push_prompt(42)
    session.push_frame(_frame("video-preview-tiny", 2), 3.0)
    events = session.step()
    assert [e.timestamp for e in events if isinstance(e, FrameIngested)] == [2.0, 3.0]
    session.close()
    with pytest.raises(SessionClosedError):
        session.push_prompt("too late")
    with pytest.raises(SessionClosedError):
        session.step()


def test_threshold_policy_and_tokens_per_turn_cap():
    model, processor = _setup("video-preview-tiny")
    quiet = RealtimeSession(model, processor, policy=SilenceThresholdPolicy(0.0))
    decisions = [e for e in quiet.step() if isinstance(e, Decision)]
    assert decisions[0].token == model.config.tokens.silence_token_id  # p >= 0 always: always silent
    capped = RealtimeSession(model, processor, policy=AlwaysSpeakPolicy(), max_tokens_per_turn=3)
    events = capped.step() + capped.step() + capped.step() + capped.step()
    assert sum(isinstance(e, TextDelta) for e in events) <= 3
    assert any(isinstance(e, RoundEnd) for e in events)


def test_close_from_another_thread_ends_events_promptly():
    model, processor = _setup("video-preview-tiny")
    session = RealtimeSession(model, processor, policy=TeacherForcedPolicy([]))  # always silent: parks
    seen = []
    consumer = threading.Thread(target=lambda: seen.extend(session.events()))
    consumer.start()
    time.sleep(0.5)
    started = time.monotonic()
    session.close()
    consumer.join(timeout=2)
    assert not consumer.is_alive() and time.monotonic() - started < 1.0
    assert any(isinstance(e, Decision) for e in seen)
