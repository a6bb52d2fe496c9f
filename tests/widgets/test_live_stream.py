"""Webcam and LiveStream without a browser: frames go in through push_jpeg or the front end's message."""

from __future__ import annotations

import threading
import time

import pytest

import mossvl_lab as ml
from mossvl_lab.data.synthetic import make_clip
from mossvl_lab.streaming.events import Decision, FrameIngested, TextDelta
from mossvl_lab.viz.stream_data import encode_image
from mossvl_lab.widgets import FrameAttentionView, KVCacheInspector, LiveStream, Webcam, WidgetInputError
from mossvl_lab.widgets.live_stream import THREAD_PREFIX
from reference import tiny_model


@pytest.fixture(scope="module")
def vl():
    model = tiny_model("moss-vl-tiny", 0)
    return model, ml.processor_for_model(model.config)


@pytest.fixture(scope="module")
def jpegs():
    return [encode_image(frame, "jpeg") for frame in make_clip(4, size=64, min_seconds=12, max_seconds=12).frames]


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _widget_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


@pytest.fixture
def live(vl):
    model, processor = vl
    widget = LiveStream(model, processor, prompt="describe", max_queued=4, max_tokens_per_turn=2)
    events = []
    widget.add_listener(lambda session, batch: events.extend(batch))
    widget.captured = events
    yield widget
    widget.close()


def test_frames_reach_the_session_and_the_traits_follow_its_events(live, jpegs):
    live.start()
    for i in range(3):
        live.push_jpeg(jpegs[i], float(i))
        _wait(lambda: live.frames_ingested == i + 1)
    assert live.pause()  # idle: everything published
    events = live.captured
    assert live.text == "".join(e.text for e in events if isinstance(e, TextDelta)) != ""
    decisions = [e for e in events if isinstance(e, Decision)]
    assert live.p_silence == pytest.approx([d.p_silence for d in decisions]) and live.steps == len(decisions)
    assert [e.timestamp for e in events if isinstance(e, FrameIngested)] == [0.0, 1.0, 2.0]
    assert live.last_timestamp == 2.0 and live.session.state.frames_ingested == 3
    assert "⋯" in live.transcript and live.frames_received == 3 and live.frames_dropped == 0


def test_while_paused_the_full_queue_drops_the_oldest_frames(live, jpegs):
    live.start()
    assert live.pause()
    for i in range(10):
        live.push_jpeg(jpegs[i], float(i))
    assert (live.frames_received, live.frames_dropped, live.queued) == (10, 10 - live.max_queued, live.max_queued)
    live.resume()
    _wait(lambda: live.frames_ingested == live.max_queued)
    assert live.pause()
    kept = [e.timestamp for e in live.captured if isinstance(e, FrameIngested)]
    assert kept == [6.0, 7.0, 8.0, 9.0]  # the newest survive


def test_stop_joins_the_worker_and_close_also_stops(live, jpegs):
    live.start()
    live.push_jpeg(jpegs[0], 0.0)
    worker = live.worker
    assert worker.is_alive() and _widget_threads() == [worker]
    started = time.monotonic()
    live.stop()
    assert time.monotonic() - started < 1.5
    assert not worker.is_alive() and _widget_threads() == [] and live.session.closed and not live.running
    live.start()  # a new stream: new session, counters from zero
    assert live.worker is not worker and live.frames_received == 0 and live.worker.is_alive()
    live.close()
    assert _widget_threads() == []


def test_front_end_messages_from_many_threads_never_raise_and_never_run_the_model(vl, live, jpegs):
    model, _ = vl
    forward_threads = set()
    handle = model.register_forward_pre_hook(lambda *args: forward_threads.add(threading.get_ident()))
    live.start()
    clock, clock_lock, errors = iter(range(10_000)), threading.Lock(), []

    def sender(k: int) -> None:
        try:
            for i in range(12):
                with clock_lock:  # timestamps rise in the order the frames are queued
                    live._handle_custom_msg({"type": "frame", "ts": next(clock) * 0.1}, [memoryview(jpegs[i])])
                live._handle_custom_msg({"type": "frame", "ts": "soon"}, [jpegs[i]])   # rejected: no timestamp
                live._handle_custom_msg({"type": "frame", "ts": 1.0}, [])               # rejected: no bytes
                live._handle_custom_msg({"type": "unknown"}, [])                         # ignored
        except Exception as exc:  # the point of the test: nothing may escape a handler
            errors.append(exc)

    try:
        senders = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
        _wait(lambda: live.queued == 0)
        assert live.pause()
    finally:
        handle.remove()
    assert errors == [] and live.error == "" and live.worker.is_alive()
    assert live.frames_received == 48 and live.frames_rejected == 96
    assert live.frames_ingested + live.frames_dropped == 48
    assert forward_threads == {live.worker.ident}


def test_an_inspector_follows_the_live_session(live, jpegs):
    inspector = KVCacheInspector(live)
    live.start()
    for i in range(2):
        live.push_jpeg(jpegs[i], float(i))
    _wait(lambda: live.frames_ingested == 2)
    assert live.pause()
    assert inspector.totals["vision_frames"] == 2 and inspector.totals["bytes"] == live.session.stream.memory_bytes()
    inspector._handle_custom_msg({"type": "refresh"}, [])  # polling takes the step lock; the worker is idle
    assert inspector.step == live.session.state.step


def test_a_recording_live_stream_can_be_replayed_with_thumbnails(vl, jpegs):
    model, processor = vl
    live = LiveStream(model, processor, record=True, max_tokens_per_turn=1)
    try:
        live.start()
        for i in range(2):
            live.push_jpeg(jpegs[i], float(i))
        _wait(lambda: live.frames_ingested == 2)
        view = FrameAttentionView.from_session(live)  # while the worker runs: it waits for the step lock
    finally:
        live.close()
    assert [f["timestamp"] for f in view.frames] == [0.0, 1.0]
    assert all(f["thumb"].startswith("data:image/png;base64,") for f in view.frames)
    assert sum(view.bars) == pytest.approx(1.0, abs=1e-4)


def test_webcam_queues_frames_and_reports_camera_errors(jpegs):
    cam = Webcam(fps=2.0, max_queued=2)
    cam.start()
    for i in range(3):
        cam._handle_custom_msg({"type": "frame", "ts": float(i)}, [jpegs[i]])
    assert (cam.frames_received, cam.frames_dropped, cam.queued) == (3, 1, 2)
    assert cam.get() == (1.0, jpegs[1]) and cam.get() == (2.0, jpegs[2]) and cam.get(timeout=0.01) is None
    cam._handle_custom_msg({"type": "camera_error", "message": "NotAllowedError: denied"}, [])
    assert cam.camera_error == "NotAllowedError: denied" and not cam.running
    cam.close()


def test_bad_arguments_get_named_errors(vl):
    model, processor = vl
    with pytest.raises(WidgetInputError, match="fps"):
        Webcam(fps=0)
    with pytest.raises(WidgetInputError, match="max_queued"):
        Webcam(max_queued=0)
    with pytest.raises(WidgetInputError, match="processor"):
        LiveStream(model, None)
    live = LiveStream(model, processor, max_frames_queued=0)  # checked by the session each start opens
    with pytest.raises(ValueError, match="max_frames_queued"):
        live.start()
    assert not live.running and live.worker is None
    live.close()
