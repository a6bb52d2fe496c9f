"""StreamStepper without a browser: kernel-side methods, the front end's messages, history and scrubbing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import mossvl_lab as ml
from mossvl_lab.data.synthetic import make_clip
from mossvl_lab.streaming.events import Decision, TextDelta
from mossvl_lab.streaming.policies import TeacherForcedPolicy
from mossvl_lab.viz.stream_data import EmptyClipError
from mossvl_lab.widgets import ClipExhaustedError, StepIndexError, StreamStepper, WidgetInputError


def _clip(frames: int = 4):
    clip = make_clip(5, size=56, min_seconds=frames, max_seconds=frames)
    return [(f, ts) for f, ts in zip(clip.frames, clip.timestamps)]


def _stepper(tiny, script, frames: int = 4, **kw):
    model, processor = tiny
    session = ml.RealtimeSession(model, processor, prompt="describe", policy=TeacherForcedPolicy(script))
    return StreamStepper(session, clip=_clip(frames), **kw)


def _silence(tiny):
    return tiny[0].config.tokens.silence_token_id


def test_step_frame_pushes_one_frame_and_steps_until_the_model_waits(tiny):
    sil = _silence(tiny)
    stepper = _stepper(tiny, [sil, 40, 41, sil, sil])
    events = stepper.step_frame()
    decisions = [e for e in events if isinstance(e, Decision)]
    assert [d.token for d in decisions] == [sil, 40, 41, sil]  # the first decision, then the answer to frame 0
    assert stepper.step_count == stepper.step == 4 == len(stepper.history)
    assert stepper.session.waiting_for_input
    frame, ts = _clip()[0]
    assert stepper.timestamp == ts and stepper.frame_index == 0 and stepper.frames_pushed == 1
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stepper.frame)).convert("RGB")), frame)
    assert stepper.p_silence == pytest.approx(decisions[-1].p_silence)
    assert stepper.p_silence_history == pytest.approx([d.p_silence for d in decisions])
    assert stepper.decision == "silence"
    assert stepper.text == "".join(e.text for e in events if isinstance(e, TextDelta))
    assert stepper.transcript == f"⋯ {stepper.text.strip()} ⋯"
    stream = stepper.session.stream
    assert stepper.cache["text_tokens"] == stream.text.length
    assert stepper.cache["vision_frames"] == 1
    assert stepper.cache["bytes"] == stream.memory_bytes()


def test_step_decode_is_one_session_step_and_a_no_op_while_waiting(tiny):
    sil = _silence(tiny)
    stepper = _stepper(tiny, [40, 41, sil])
    assert [type(e).__name__ for e in stepper.step_decode()][:1] == ["Decision"]  # the first decision speaks
    assert stepper.step_count == 1 and stepper.timestamp == -1.0
    stepper.step_decode()
    stepper.step_decode()
    assert stepper.step_count == 3 and stepper.session.waiting_for_input
    assert stepper.step_decode() == []
    assert stepper.step_count == 3 and "waiting for input" in stepper.status


def test_run_steps_every_frame_and_respects_max_steps(tiny):
    stepper = _stepper(tiny, [], frames=4)  # a finished script stays silent: one decision per frame
    stepper.run(max_steps=2)
    assert stepper.frames_pushed == 2 and stepper.step_count == 3 and not stepper.running
    stepper.run()
    assert stepper.frames_pushed == 4 and stepper.step_count == 5 and stepper.frames_left == 0
    assert stepper.timestamp == _clip()[3][1]
    assert stepper.transcript == "⋯ ×5"
    with pytest.raises(ClipExhaustedError, match="all 4 frames"):
        stepper.step_frame()


def test_goto_shows_an_earlier_snapshot_and_the_front_end_scrubber_does_the_same(tiny):
    sil = _silence(tiny)
    stepper = _stepper(tiny, [sil, 40, sil, sil, 41, 42, sil])
    stepper.run()
    assert stepper.step_count == len(stepper.history) >= 7
    snap = stepper.goto(3)
    assert (stepper.step, stepper.timestamp, stepper.transcript) == (3, snap.timestamp, snap.transcript)
    assert snap.frame_index == 0 and stepper.p_silence_history == pytest.approx(
        [s.p_silence for s in stepper.history[:3]])
    stepper.set_state({"step": 5})  # what the browser's slider sends
    assert stepper.timestamp == stepper.history[4].timestamp and stepper.text == stepper.history[4].text
    for bad in (0, stepper.step_count + 1):
        with pytest.raises(StepIndexError, match=f"1..{stepper.step_count}"):
            stepper.goto(bad)
    assert stepper.step == 5  # unchanged by the rejected moves


def test_a_scrubbed_view_stays_put_while_new_steps_arrive(tiny):
    stepper = _stepper(tiny, [], frames=3)
    stepper.step_frame()
    stepper.goto(1)
    stepper.step_frame()
    assert stepper.step == 1 and stepper.step_count == 3


def test_front_end_buttons_and_the_tick_driven_run(tiny, monkeypatch):
    stepper = _stepper(tiny, [], frames=4)
    sent = []
    monkeypatch.setattr(stepper, "send", lambda content, buffers=None: sent.append(content))
    stepper._handle_custom_msg({"type": "step_frame"}, [])
    assert stepper.frames_pushed == 1 and stepper.step_count == 2
    stepper._handle_custom_msg({"type": "run"}, [])       # one frame, then ask the front end for the next
    assert stepper.frames_pushed == 2 and stepper.running and sent == [{"type": "tick"}]
    stepper._handle_custom_msg({"type": "pause"}, [])
    stepper._handle_custom_msg({"type": "tick"}, [])      # a tick already in flight does nothing after Pause
    assert stepper.frames_pushed == 2 and not stepper.running
    stepper._handle_custom_msg({"type": "run"}, [])
    stepper._handle_custom_msg({"type": "tick"}, [])
    assert stepper.frames_pushed == 4 and not stepper.running and len(sent) == 2
    stepper._handle_custom_msg({"type": "step_frame"}, [])  # nothing left: reported, not raised
    assert stepper.error.startswith("ClipExhaustedError")
    stepper._handle_custom_msg({"type": "step_decode"}, [])
    assert stepper.error == ""


def test_listeners_see_every_step(tiny):
    stepper = _stepper(tiny, [], frames=2)
    seen = []
    stepper.add_listener(lambda session, events: seen.append((session, events)))
    events = stepper.run()
    assert all(session is stepper.session for session, _ in seen)
    assert [e for _, batch in seen for e in batch] == events


def test_model_and_processor_build_a_capped_session(tiny):
    model, processor = tiny
    stepper = StreamStepper(model=model, processor=processor, clip=_clip(2), prompt="what moves?")
    assert stepper.session.max_tokens_per_turn == 32
    stepper.run()
    assert stepper.frames_pushed == 2 and stepper.step_count >= 3


def test_bad_inputs_get_named_errors(tiny):
    model, processor = tiny
    with pytest.raises(WidgetInputError, match="RealtimeSession, or model= and processor="):
        StreamStepper()
    with pytest.raises(EmptyClipError):
        StreamStepper(model=model, processor=processor, clip=[])
    session = ml.RealtimeSession(model, processor)
    with pytest.raises(WidgetInputError, match="already has its prompt"):
        StreamStepper(session, prompt="hi")
    with pytest.raises(WidgetInputError, match="max_decode_steps"):
        StreamStepper(session, max_decode_steps=-1)
    stepper = StreamStepper(session)
    with pytest.raises(ClipExhaustedError, match="no clip"):
        stepper.step_frame()
    with pytest.raises(WidgetInputError, match="max_steps"):
        stepper.run(max_steps=-2)
