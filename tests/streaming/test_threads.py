"""Threaded real-time APIs: the seed card's streaming snippet, the session API, the queue API, output markers,
stop/close from any state, errors that become "[ERROR] ..." lines, and no thread left behind."""

from __future__ import annotations

import gc
import queue
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import mossvl_lab as ml
from mossvl_lab.streaming.events import Decision, FrameIngested, PromptAccepted, RoundStart, TextDelta
from mossvl_lab.streaming.inputs import FrameInputError
from mossvl_lab.streaming.policies import AlwaysSpeakPolicy, TeacherForcedPolicy
from mossvl_lab.streaming.session import FrameTimestampError, SessionClosedError
from mossvl_lab.streaming.protocol import ROUND_END, ROUND_START, SILENCE, OutputProtocol, QueueMessageError
from mossvl_lab.streaming import threads
from mossvl_lab.streaming.threads import (THREAD_NAME, ThreadedSession, online_generate, real_time_generate,
                                          stop_real_time_generate)

SIZES = {"video-preview-tiny": 56, "moss-vl-tiny": 64}
BANNER = "[Silence / Observing]"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The worker, the feeders and the test share 2 cores: one intra-op thread keeps a step from stalling on
    busy cores (with two, a tiny step occasionally took ~0.5 s on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(preset):
    torch.manual_seed(0)
    cfg = ml.config.preset(preset)
    return ml.build_model(cfg).eval(), ml.processor_for_model(cfg)


def _pil(preset, seed=0):
    size = SIZES[preset]
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def _our_threads():
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


def _drain(q, until=ROUND_END, timeout=5.0):
    """Chunks from `q` up to and including `until` (fails the test instead of hanging)."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = q.get(timeout=0.05)
        except queue.Empty:
            continue
        chunks.append(chunk)
        if chunk == until:
            return chunks
    raise AssertionError(f"no {until!r} within {timeout}s; got {chunks[-20:]}")


def _expect(q, predicate, timeout=5.0):
    """Read `q` until a chunk satisfies `predicate`; returns the chunks read."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunks.append(q.get(timeout=0.05))
        except queue.Empty:
            continue
        if predicate(chunks[-1]):
            return chunks
    raise AssertionError(f"expected chunk not seen within {timeout}s; got {chunks[-20:]}")


def _silence_runs(chunks):
    runs, previous = 0, None
    for chunk in chunks:
        runs += chunk == SILENCE and previous != SILENCE
        if chunk != ROUND_START:  # the consumer ignores markers other than silence between silence runs
            previous = chunk
    return runs


def _card_consumer(token_queue, printed, idle_timeout=5.0):
    """The seed card's consumer (spec moss-video-preview §6.4): hold back one token, discard it on
    <|round_start|>, print one banner per run of silences, stop at an end marker or after an idle timeout."""
    held, silent = None, False
    while True:
        try:
            token = token_queue.get(timeout=idle_timeout)
        except queue.Empty:
            break
        printed.append(token)
        if token in (ROUND_END, "[DONE]") or token.startswith("[ERROR]"):
            break
        if token == ROUND_START:
            held = None  # the model may already have said something from the empty-prompt context
            continue
        if token == SILENCE:
            if not silent:
                print(BANNER)
                silent = True
            continue
        silent = False
        if held is not None:
            print(held, end="", flush=True)
        held = token
    if held is not None:
        print(held, flush=True)


def test_seed_card_streaming_snippet_runs_with_only_loading_changed(capsys):
    model, processor = _setup("video-preview-tiny")  # the only change: a tiny model instead of the checkpoint
    fps, seconds = 10, 2.0
    image_queue, prompt_queue, token_queue = queue.Queue(), queue.Queue(), queue.Queue()

    def feeder():
        for i in range(int(fps * seconds)):
            image_queue.put(_pil("video-preview-tiny", i))
            time.sleep(1 / fps)

    feed = threading.Thread(target=feeder)
    feed.start()
    time.sleep(1.0)
    prompt_queue.put("What is happening in the video?")
    generation = threading.Thread(target=model.real_time_generate,
                                  args=(image_queue, prompt_queue, token_queue, processor),
                                  kwargs={"max_new_tokens": 86400, "do_sample": True})
    generation.start()
    printed = []
    consumer = threading.Thread(target=_card_consumer, args=(token_queue, printed))
    consumer.start()
    feed.join()
    model.stop_real_time_generate()
    generation.join(timeout=5)
    consumer.join(timeout=5)
    assert not generation.is_alive() and not consumer.is_alive() and not _our_threads()
    assert printed.count(ROUND_END) == 1 and printed[-1] == ROUND_END
    assert printed.count(ROUND_START) == 1  # one prompt, consumed once
    assert not [c for c in printed if c.startswith("[ERROR]")]
    assert all(isinstance(c, str) and c for c in printed)
    assert capsys.readouterr().out.count(BANNER) == _silence_runs(printed)


def test_output_protocol_markers_for_both_families():
    silence, response = 7, 8
    preview = OutputProtocol(silence, "prompt")
    events = [Decision(1, silence, 0.9, ()), PromptAccepted("q"), FrameIngested(0, 0.0, 17, 1.0),
              Decision(2, 40, 0.1, ()), RoundStart(2), TextDelta("Hi"), Decision(3, silence, 0.9, ())]
    assert [c for e in events for c in preview.render(e)] == [SILENCE, ROUND_START, SILENCE, "Hi", SILENCE]
    assert preview.end() == [ROUND_END]
    prompt_only = OutputProtocol(silence, "prompt")  # no frame in the prompt's step: no opener is sent
    assert [c for e in [PromptAccepted("q"), Decision(1, 40, 0.1, ())] for c in prompt_only.render(e)] == [ROUND_START]
    moss = OutputProtocol(silence, "answer")
    events = [PromptAccepted("q"), FrameIngested(0, 0.0, 5, 1.0), Decision(1, response, 0.1, ()), RoundStart(1),
              TextDelta("<|response|>"), TextDelta("Hello<|assistant|>"), Decision(2, silence, 0.8, ())]
    assert [c for e in events for c in moss.render(e)] == [ROUND_START, "Hello", SILENCE]


def test_session_api_end_to_end_moss_vl():
    model, processor = _setup("moss-vl-tiny")
    cfg = model.config.tokens
    words = processor.tokenizer.encode("Hi there", add_special_tokens=False)
    script = [cfg.silence_token_id, cfg.response_token_id, *words, cfg.silence_token_id]
    session = model.create_realtime_session(processor, "Tell me when a square appears.",
                                            policy=TeacherForcedPolicy(script))
    assert isinstance(session, ThreadedSession) and not session.active
    assert session.poll_output(0) is None
    session.start()
    assert session.active
    assert session.poll_output(5.0) == SILENCE  # the prefill's decision, then parked
    dropped = session.push_prompt_frame("Is there a square?", _pil("moss-vl-tiny", 1), 0.0)
    assert dropped is False
    chunks = _expect(session.output, lambda c: c == SILENCE)
    assert chunks[0] == ROUND_START and "".join(chunks[1:-1]) == "Hi there"
    assert session.push_frame(_pil("moss-vl-tiny", 2), 1.0) is False
    assert session.poll_output(5.0) == SILENCE  # the script ended: silent from now on
    assert session.pending_frames == 0
    started = time.monotonic()
    assert session.close() is True and time.monotonic() - started < 1.0
    assert not session.active and not _our_threads()
    assert session.poll_output(None) == ROUND_END and session.poll_output(None) is None
    events = []
    while not session.events.empty():
        events.append(session.events.get())
    assert sum(isinstance(e, FrameIngested) for e in events) == 2
    assert [e.text for e in events if isinstance(e, PromptAccepted)] == ["Is there a square?"]
    with pytest.raises(SessionClosedError):
        session.push_prompt("too late")
    with pytest.raises(SessionClosedError):
        session.start()


def test_prompt_rounds_on_video_preview_send_round_start_and_the_opener_silence():
    model, processor = _setup("video-preview-tiny")
    silence = model.config.tokens.silence_token_id
    words = processor.tokenizer.encode("ok", add_special_tokens=False)
    policy = TeacherForcedPolicy([silence, silence, *words, silence])
    with ThreadedSession(model, processor, policy=policy).start() as session:
        assert session.poll_output(5.0) == SILENCE
        session.push_prompt_frame("What is this?", _pil("video-preview-tiny"), 0.0)
        assert [session.poll_output(5.0) for _ in range(3)] == [ROUND_START, SILENCE, SILENCE]
        session.push_frame(_pil("video-preview-tiny", 1), 1.0)
        chunks = _expect(session.output, lambda c: c == SILENCE)
        assert "".join(chunks[:-1]) == "ok"
    assert not _our_threads()
    assert _drain(session.output) == [ROUND_END]


def test_push_prompt_frame_lands_in_one_step_while_the_model_speaks():
    model, processor = _setup("moss-vl-tiny")
    session = ThreadedSession(model, processor, policy=AlwaysSpeakPolicy()).start()
    for i in range(15):
        session.push_prompt_frame(f"q{i}", _pil("moss-vl-tiny", i), float(i))
        time.sleep(0.01)
    deadline = time.monotonic() + 5
    while session.state.pending_prompts and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.close()
    steps, current = [], []
    while not session.events.empty():
        event = session.events.get()
        current.append(event)
        if isinstance(event, Decision):
            steps.append(current)
            current = []
    for step in steps:  # every step that took a prompt also took its frame
        assert sum(isinstance(e, PromptAccepted) for e in step) == sum(isinstance(e, FrameIngested) for e in step)
    assert sum(isinstance(e, PromptAccepted) for step in steps for e in step) == 15


def test_named_errors_through_the_session_api():
    model, processor = _setup("video-preview-tiny")
    session = ThreadedSession(model, processor, policy=TeacherForcedPolicy([])).start()
    session.push_frame(_pil("video-preview-tiny"), 2.0)
    with pytest.raises(FrameTimestampError, match="backwards"):
        session.push_frame(_pil("video-preview-tiny"), 1.0)
    for bad in (-1.0, float("nan"), float("inf"), "3"):
        with pytest.raises(FrameTimestampError):
            session.push_frame(_pil("video-preview-tiny"), bad)
    with pytest.raises(FrameInputError, match=r"\[height, width, 3\]"):
        session.push_frame(np.zeros((56, 56)), 3.0)
    with pytest.raises(FrameInputError, match="NaN"):
        session.push_frame(np.full((56, 56, 3), np.nan, dtype=np.float32), 3.0)
    with pytest.raises(FrameInputError):  # a bad frame queues neither the frame nor the prompt
        session.push_prompt_frame("q", np.zeros((56, 56, 4), np.uint8), 3.0)
    with pytest.raises(TypeError):
        session.push_prompt(42)
    assert session.state.pending_prompts == 0
    with pytest.raises(RuntimeError, match="already started"):
        session.start()
    assert session.close()
    with pytest.raises(SessionClosedError):
        session.push_prompt("during close")
    with pytest.raises(SessionClosedError):
        session.push_prompt_frame("q", _pil("video-preview-tiny"), 5.0)
    assert not _our_threads()


class _Boom:
    """A policy that fails on its `at`-th decision."""

    def __init__(self, silence_id, at=2):
        self.silence_id, self.at, self.calls = silence_id, at, 0

    def __call__(self, logits, ctx):
        self.calls += 1
        if self.calls >= self.at:
            raise RuntimeError("boom")
        return self.silence_id


class _SeenTimestamps:
    """A no-op cache policy that records the cached frames' timestamps after every step."""

    name = "record"

    def __init__(self):
        self.stamps = []

    def apply(self, state):
        self.stamps = [seg.timestamp for seg in state.vision.segments]
        return []


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.mark.parametrize("state", ["before_start", "parked", "speaking", "paced", "failed"])
def test_close_returns_within_a_second_from_any_state(state):
    model, processor = _setup("video-preview-tiny")
    silence = model.config.tokens.silence_token_id
    kwargs = {"before_start": {}, "parked": {"policy": TeacherForcedPolicy([])},
              "speaking": {"policy": AlwaysSpeakPolicy()},
              "paced": {"policy": AlwaysSpeakPolicy(), "max_tokens_per_turn": 2},  # waits 0.5 s between tokens
              "failed": {"policy": _Boom(silence, at=1)}}[state]
    session = ThreadedSession(model, processor, **kwargs)
    if state != "before_start":
        session.start()
        _wait(lambda: not session.output.empty() or not session.active)
        time.sleep(0.2)
    started = time.monotonic()
    assert session.close(timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert not _our_threads()
    chunks = [] if state == "before_start" else _drain(session.output)
    if state == "failed":
        assert chunks[-2:] == ["[ERROR] RuntimeError: boom", ROUND_END]
    elif chunks:
        assert chunks.count(ROUND_END) == 1 and chunks[-1] == ROUND_END


def test_real_time_generate_timestamps_from_fps_pairs_and_the_clock():
    model, processor = _setup("moss-vl-tiny")
    for items, kwargs, expected in (
            ([_pil("moss-vl-tiny", i) for i in range(3)], {"fps": 4}, [0.0, 0.25, 0.5]),
            ([(_pil("moss-vl-tiny", i), ts) for i, ts in enumerate((1.0, 2.5))], {}, [1.0, 2.5]),
            ([_pil("moss-vl-tiny", i) for i in range(2)], {}, None)):
        image_queue, prompt_queue, token_queue = queue.Queue(), queue.Queue(), queue.Queue()
        for item in items:
            image_queue.put(item)
        seen = _SeenTimestamps()
        started = time.monotonic()
        worker = threading.Thread(target=real_time_generate, args=(model, image_queue, prompt_queue, token_queue,
                                                                  processor),
                                  kwargs={"policy": TeacherForcedPolicy([]), "cache_policy": seen, **kwargs})
        worker.start()
        _wait(lambda: len(seen.stamps) == len(items))
        assert stop_real_time_generate(model) is True
        worker.join(timeout=5)
        assert not worker.is_alive() and not _our_threads()
        if expected is not None:
            assert seen.stamps == expected
        else:  # the monotonic clock, relative to the loop's start
            assert seen.stamps == sorted(seen.stamps) and 0 <= seen.stamps[0]
            assert seen.stamps[-1] <= time.monotonic() - started
        assert _drain(token_queue)[-1] == ROUND_END
    assert stop_real_time_generate(model) is False  # nothing running: nothing is remembered


def test_stop_real_time_generate_from_another_thread_while_parked():
    model, processor = _setup("video-preview-tiny")
    token_queue = queue.Queue()
    worker = threading.Thread(target=model.real_time_generate,
                              args=(queue.Queue(), queue.Queue(), token_queue, processor),
                              kwargs={"policy": TeacherForcedPolicy([])})
    worker.start()
    assert token_queue.get(timeout=5) == SILENCE  # parked: waiting for input
    time.sleep(0.2)
    started = time.monotonic()
    threading.Thread(target=model.stop_real_time_generate).start()
    worker.join(timeout=2)
    assert not worker.is_alive() and time.monotonic() - started < 1.0
    assert _drain(token_queue) == [ROUND_END] and not _our_threads()


def test_a_stop_leaves_the_memory_release_to_the_loops_it_stops(monkeypatch):
    """The loop releases memory once, after dropping its session, without a full collection (reference counting
    already freed the session); the stopping thread does not collect (a gc.collect while the session is still
    alive frees nothing and, in a big heap, costs the stop ~seconds). With no loop running, the stop collects."""
    released = []
    monkeypatch.setattr(threads, "_release_memory",
                        lambda collect=True: released.append((threading.current_thread().name, collect)))
    model, processor = _setup("video-preview-tiny")
    token_queue = queue.Queue()
    worker = threading.Thread(target=model.real_time_generate, name="the-loop",
                              args=(queue.Queue(), queue.Queue(), token_queue, processor),
                              kwargs={"policy": TeacherForcedPolicy([])})
    worker.start()
    assert token_queue.get(timeout=5) == SILENCE
    stopper = threading.Thread(target=model.stop_real_time_generate, name="the-stopper")
    stopper.start()
    stopper.join(timeout=5)
    worker.join(timeout=5)
    assert not worker.is_alive() and released == [("the-loop", False)]
    assert threads.stop_real_time_generate(model) is False
    assert released == [("the-loop", False), (threading.current_thread().name, True)]


def _recording_sessions(monkeypatch):
    """Patch `threads.ThreadedSession` to keep a weak reference to every engine session it builds."""
    sessions = []

    class Recorded(ThreadedSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append(weakref.ref(self.session))

    monkeypatch.setattr(threads, "ThreadedSession", Recorded)
    return sessions


def _counting_collections(monkeypatch):
    calls, collect = [], gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: calls.append(args) or collect(*args))
    return calls


def test_a_stopped_loop_frees_its_session_by_reference_counting_alone(monkeypatch):
    """After a loop that spoke (its caches filled) is stopped, its session is gone with the collector disabled and
    no gc.collect was run: nothing in the loop keeps it in a reference cycle."""
    sessions, collections = _recording_sessions(monkeypatch), _counting_collections(monkeypatch)
    model, processor = _setup("video-preview-tiny")
    image_queue, token_queue = queue.Queue(), queue.Queue()
    image_queue.put(_pil("video-preview-tiny"))
    worker = threading.Thread(target=real_time_generate, args=(model, image_queue, queue.Queue(), token_queue,
                                                              processor), kwargs={"policy": AlwaysSpeakPolicy()})
    gc.disable()
    try:
        worker.start()
        _wait(lambda: token_queue.qsize() >= 3)
        assert stop_real_time_generate(model)
        worker.join(timeout=5)
        assert not worker.is_alive() and len(sessions) == 1
        assert sessions[0]() is None and collections == []
    finally:
        gc.enable()


def test_a_failed_loop_whose_traceback_keeps_its_session_is_collected(monkeypatch):
    """A failure stores its exception (traceback -> frames -> session): a cycle, so then the loop collects."""
    monkeypatch.setattr(threads.logger, "disabled", True)  # pytest's log capture would keep the traceback alive
    sessions, collections = _recording_sessions(monkeypatch), _counting_collections(monkeypatch)
    model, processor = _setup("video-preview-tiny")
    image_queue = queue.Queue()
    image_queue.put(_pil("video-preview-tiny"))
    worker = threading.Thread(target=real_time_generate, args=(model, image_queue, queue.Queue(), queue.Queue(),
                                                              processor),
                              kwargs={"policy": _Boom(model.config.tokens.silence_token_id, at=2)})
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive() and len(collections) == 1 and sessions[0]() is None


def test_errors_inside_the_loop_become_error_lines_and_never_hang_the_consumer():
    model, processor = _setup("video-preview-tiny")
    silence = model.config.tokens.silence_token_id
    image_queue, prompt_queue, token_queue = queue.Queue(), queue.Queue(), queue.Queue()
    image_queue.put(np.zeros((56, 56)))                   # a bad input: reported, the loop keeps serving
    image_queue.put(_pil("video-preview-tiny"))           # the 2nd decision fails: the loop itself ends
    worker = threading.Thread(target=real_time_generate, args=(model, image_queue, prompt_queue, token_queue,
                                                              processor), kwargs={"policy": _Boom(silence, at=2)})
    worker.start()
    worker.join(timeout=5)  # ends by itself, no stop needed
    assert not worker.is_alive() and not _our_threads()
    chunks = _drain(token_queue)
    assert any(c.startswith("[ERROR] FrameInputError") for c in chunks)
    assert chunks[-2:] == ["[ERROR] RuntimeError: boom", ROUND_END]
    # bad options fail before the loop starts, the same way
    token_queue = queue.Queue()
    real_time_generate(model, queue.Queue(), queue.Queue(), token_queue, processor, do_sample=True, temperature=0)
    chunks = _drain(token_queue)
    assert chunks[0].startswith("[ERROR] SamplingError") and chunks[-1] == ROUND_END
    real_time_generate(model, queue.Queue(), queue.Queue(), token_queue, processor, fps=0)
    assert _drain(token_queue) == ["[ERROR] ValueError: fps must be a number > 0 (or None: timestamps from the "
                                   "monotonic clock), got 0", ROUND_END]
    output = queue.Queue()
    inputs = queue.Queue()
    inputs.put({"frame_queue_size": 0})
    online_generate(model, processor, inputs, output)
    assert _drain(output) == ["[ERROR] ValueError: frame_queue_size must be an integer >= 1, got 0", ROUND_END]


def test_queue_api_messages_errors_and_the_stop_message():
    model, processor = _setup("moss-vl-tiny")
    first_ids = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: first_ids.append(args[0] if args else kwargs["input_ids"]) if not first_ids
        else None, with_kwargs=True)
    inputs, output = queue.Queue(), queue.Queue()
    worker = threading.Thread(target=model.online_generate, args=(processor, inputs, output),
                              kwargs={"policy": TeacherForcedPolicy([])})
    worker.start()
    try:
        inputs.put({"initial_prompt": "Count the squares.", "system_prompt": "You watch a stream.",
                    "frame_queue_size": 4, "max_tokens_per_turn": 20})
        assert output.get(timeout=5) == SILENCE
        inputs.put({"frame": _pil("moss-vl-tiny"), "timestamp": 5.0})
        assert output.get(timeout=5) == SILENCE
        bad = [({"frame": _pil("moss-vl-tiny"), "timestamp": 4.0}, "FrameTimestampError"),
               ({"frame": _pil("moss-vl-tiny"), "timestamp": float("nan")}, "FrameTimestampError"),
               ({"frame": np.zeros((64, 64)), "timestamp": 6.0}, "FrameInputError"),
               ({"frame": np.full((64, 64, 3), np.nan, np.float32), "timestamp": 6.0}, "FrameInputError: frame "
                                                                                        "contains NaN"),
               ({"prompt": 42}, "TypeError"),
               ({"system_prompt": "too late"}, "QueueMessageError"),
               ({"frame": _pil("moss-vl-tiny")}, "QueueMessageError"),
               ({"frame": _pil("moss-vl-tiny"), "timestamp": 6.0, "colour": "red"}, "QueueMessageError"),
               ("hello", "QueueMessageError")]
        for message, name in bad:
            inputs.put(message)
            assert output.get(timeout=5).startswith(f"[ERROR] {name}")
        inputs.put({"frame": _pil("moss-vl-tiny", 1), "timestamp": 6.0, "prompt": "And now?"})
        assert output.get(timeout=5) == SILENCE  # still serving
        inputs.put({"prompt": "Anything else?", "drop_oldest": False})
        assert output.get(timeout=5) == SILENCE
        inputs.put({"frame": _pil("moss-vl-tiny", 2), "timestamp": 7.0, "drop_oldest": False})
        assert output.get(timeout=5) == SILENCE
        inputs.put({"stop_online_generate": True})
        worker.join(timeout=5)
    finally:
        handle.remove()
        model.stop_real_time_generate()
    assert not worker.is_alive() and not _our_threads()
    assert _drain(output) == [ROUND_END]
    prefill = processor.tokenizer.decode(first_ids[0][0].tolist())
    assert "You watch a stream." in prefill and "Count the squares." in prefill
    assert issubclass(QueueMessageError, ValueError)


def test_queue_api_stops_while_waiting_for_its_first_message():
    model, processor = _setup("moss-vl-tiny")
    output = queue.Queue()
    worker = threading.Thread(target=online_generate, args=(model, processor, queue.Queue(), output))
    worker.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert stop_real_time_generate(model)
    worker.join(timeout=2)
    assert not worker.is_alive() and time.monotonic() - started < 1.0
    assert _drain(output) == [ROUND_END] and not _our_threads()


def test_a_consumer_that_stops_reading_a_bounded_queue_never_blocks_stop():
    model, processor = _setup("video-preview-tiny")
    token_queue = queue.Queue(maxsize=3)  # nobody reads it: the loop fills it and must still stop promptly
    image_queue = queue.Queue()
    for i in range(5):
        image_queue.put(np.zeros((56, 56)))  # bad frames: their [ERROR] lines also need room
    worker = threading.Thread(target=real_time_generate, args=(model, image_queue, queue.Queue(), token_queue,
                                                              processor), kwargs={"policy": AlwaysSpeakPolicy()})
    worker.start()
    _wait(token_queue.full)
    time.sleep(0.3)
    started = time.monotonic()
    assert stop_real_time_generate(model)
    worker.join(timeout=3)
    assert not worker.is_alive() and time.monotonic() - started < 2.5 and not _our_threads()


def test_closing_chunks_share_one_deadline_when_nobody_reads():
    """A full queue nobody reads gives the worker's closing chunks one second in all, not one second each."""
    model, processor = _setup("video-preview-tiny")
    unread = queue.Queue(maxsize=1)
    unread.put("never read")
    threaded = ThreadedSession(model, processor, output=unread)
    threaded.protocol.end = lambda: iter(["a", "b", "c"])  # three closing chunks and no room for any
    threaded.start()
    started = time.monotonic()
    assert threaded.close(timeout=5)
    assert time.monotonic() - started < 2.0 and not _our_threads()
