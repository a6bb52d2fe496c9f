"""The offline queue worker and batched generation (spec moss-video-preview §6.2-6.3, moss-vl §8.1-8.2).

Expectations come from independent paths: the worker's streamed text is checked against batched generation of
the same conversation, batched text against each item run alone, chunked vision against unchunked, and every bad
input against a named error while the worker keeps answering.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time

import numpy as np
import pytest
from media import write_audio_only
import torch
from PIL import Image

import mossvl_lab as ml
from mossvl_lab.generation.offline import ROUND_END, offline_batch_generate, stop_offline_generate
from mossvl_lab.generation.queries import QueryError, build_turn, parse_query
from mossvl_lab.processing.processor import ProcessingConfig
from mossvl_lab.processing.video import write_video

TIMEOUT = 60.0


def _gates_on(model):
    """Tiny models start with zero gates, which would hide the vision path from every comparison."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate"):
                param.copy_(torch.empty_like(param).uniform_(0.3, 1.2, generator=g))
    return model


def _family(preset: str):
    cfg = ml.config.preset(preset)
    torch.manual_seed(0)
    model = _gates_on(ml.build_model(cfg).eval())
    settings = ProcessingConfig.for_model(cfg)
    if cfg.family == "moss_vl":  # small frames keep the tower cheap on CPU (same code path)
        settings = dataclasses.replace(settings, video_min_pixels=1024, video_max_pixels=4096, min_pixels=1024,
                                       max_pixels=4096)
    return model, ml.processor_for_model(cfg, config=settings)


@pytest.fixture(scope="module")
def vp():
    return _family("video-preview-tiny")


@pytest.fixture(scope="module")
def vl():
    return _family("moss-vl-tiny")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    frames = np.zeros((6, 48, 64, 3), np.uint8)
    for i in range(6):
        frames[i, :, :] = (40 * i, 255 - 40 * i, 90)
        frames[i, 10:30, 5 + 8 * i:21 + 8 * i] = 250
    write_video(frames, root / "clip.mp4", fps=2.0)  # 3 s
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "img.png")
    data = (root / "clip.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "empty.mp4").write_bytes(b"")
    write_audio_only(root / "tone.m4a")  # no video stream
    (root / "folder.mp4").mkdir()
    return root


class Worker:
    """model.offline_generate on a thread, as the cards run it; `ask` sends a query and reads one round."""

    def __init__(self, model, processor, **kwargs):
        self.model = model
        self.q_in, self.q_out = queue.Queue(), queue.Queue()
        self.thread = threading.Thread(target=model.offline_generate, args=(processor, self.q_in, self.q_out),
                                       kwargs=kwargs, daemon=True)

    def __enter__(self) -> "Worker":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.q_in.put({"stop_offline_generate": True})
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the worker did not stop"

    def round(self) -> list[str]:
        pieces = []
        while True:
            item = self.q_out.get(timeout=TIMEOUT)
            if item == ROUND_END:
                return pieces
            pieces.append(item)

    def ask(self, query) -> list[str]:
        self.q_in.put(query)
        return self.round()


def _threads() -> set[threading.Thread]:
    """Live threads, without tqdm's global monitor (a daemon that any progress bar, e.g. in video decoding, may start
    and that exits on its own when the last bar closes)."""
    return {t for t in threading.enumerate() if t.name != "tqdm_monitor"}


def _ok(pieces: list[str]) -> str:
    assert not any(p.startswith("[ERROR]") for p in pieces), pieces
    return "".join(pieces)


def _text(model, processor, queries, states=None, **kw):
    return offline_batch_generate(model, processor, queries, session_states=states, **kw)


# --------------------------------------------------------------------------- worker == batch, history


def test_worker_streams_multi_turn_history_like_batch(vp, media):
    model, processor = vp
    first = {"prompt": "\nDescribe the video.", "videos": [str(media / "clip.mp4")],
             "media_kwargs": {"video_fps": 1.0, "video_minlen": 1, "video_maxlen": 4},
             "thinking_mode": "no_thinking", "system_prompt_type": "video", "generate_kwargs": {"max_new_tokens": 6}}
    follow = {"prompt": "\nWhat happens next?", "generate_kwargs": {"max_new_tokens": 6}}
    with Worker(model, processor) as w:
        a1 = w.ask(first)
        a2 = w.ask(follow)
        a3 = w.ask({**follow, "persist_session": False})
        a4 = w.ask({**follow, "persist_session": False})
        a5 = w.ask({**follow, "reset_session": True})
    assert len(a1) > 1  # streamed as pieces, not one string at the end
    b1 = _text(model, processor, [first])
    assert _ok(a1) == b1["results"][0]["text"]
    assert "specializing in video analysis" in b1["results"][0]["input_text"]  # system prompt on the first turn
    b2 = _text(model, processor, [follow], b1["session_states"])
    assert _ok(a2) == b2["results"][0]["text"]
    assert b2["results"][0]["input_text"].count("specializing in video analysis") == 1  # not repeated
    b3 = _text(model, processor, [follow], b2["session_states"])
    assert _ok(a3) == _ok(a4) == b3["results"][0]["text"]  # persist_session=False left the history alone
    b5 = _text(model, processor, [follow])
    assert _ok(a5) == b5["results"][0]["text"]  # reset_session started over
    messages = b2["results"][0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[-1]["content"] == b2["results"][0]["text"]


def test_stop_query_ends_worker_after_pending_work_and_leaves_no_thread(vp):
    model, processor = vp
    before = _threads()
    w = Worker(model, processor)
    for prompt in ("\nOne", "\nTwo"):
        w.q_in.put({"prompt": prompt, "generate_kwargs": {"max_new_tokens": 2}})
    w.q_in.put({"stop_offline_generate": True})
    w.thread.start()
    _ok(w.round())
    _ok(w.round())
    w.thread.join(TIMEOUT)
    assert not w.thread.is_alive()
    assert _threads() == before
    assert w.q_out.empty()


# --------------------------------------------------------------------------- cancel and stop


def _no_eos(model):
    """A scoped hook that makes end tokens impossible, so only max_new_tokens or a cancel can end a round."""
    eos = list(model.config.tokens.eos_token_ids)

    def hook(logits, hook=None):
        logits = logits.clone()
        logits[..., eos] = float("-inf")
        return logits

    return model.hooks([("hook_logits", hook)])


@pytest.mark.parametrize("key", ["cancel_current_generate", "stop_generation"])
def test_cancel_ends_round_early_and_buffers_the_next_query(vp, key):
    model, processor = vp
    with _no_eos(model), Worker(model, processor) as w:
        w.q_in.put({"prompt": "\nTell me a long story.", "generate_kwargs": {"max_new_tokens": 2000}})
        first = w.q_out.get(timeout=TIMEOUT)
        assert first != ROUND_END and not first.startswith("[ERROR]")
        w.q_in.put({"prompt": "\nHi", "generate_kwargs": {"max_new_tokens": 3}})  # arrives during generation
        w.q_in.put({key: True})
        start = time.monotonic()
        rest = w.round()
        assert time.monotonic() - start < 10 and len(rest) < 200  # 2000 tokens were asked for
        _ok(w.round())  # the buffered query is answered, not lost
        w.q_in.put({key: True})  # nothing running: ignored, no output
        assert _ok(w.ask({"prompt": "\nStill there?", "generate_kwargs": {"max_new_tokens": 2}})) is not None
        assert w.q_out.empty()


def test_stop_offline_generate_from_another_thread(vp):
    model, processor = vp
    before = _threads()
    assert stop_offline_generate(model) is False  # nothing running: nothing remembered
    w = Worker(model, processor)
    with _no_eos(model):
        w.thread.start()
        w.q_in.put({"prompt": "\nTell me a long story.", "generate_kwargs": {"max_new_tokens": 2000}})
        assert w.q_out.get(timeout=TIMEOUT) != ROUND_END
        stopper = threading.Thread(target=model.stop_offline_generate)
        start = time.monotonic()
        stopper.start()
        stopper.join(TIMEOUT)
        assert len(w.round()) < 200  # the running round is closed early
        w.thread.join(TIMEOUT)
    assert not w.thread.is_alive() and time.monotonic() - start < 10
    assert _threads() == before


# --------------------------------------------------------------------------- bad input: named errors, survival


@pytest.fixture(scope="module")
def vp_worker(vp):
    with Worker(*vp) as w:
        yield w


def _bad_cases(media):
    clip = {"media_kwargs": {"video_minlen": 1, "video_maxlen": 2}}
    return {
        "missing video": ({"prompt": "\nx", "videos": [str(media / "missing.mp4")], **clip}, "VideoNotFoundError"),
        "truncated mp4": ({"prompt": "\nx", "videos": [str(media / "truncated.mp4")], **clip}, "VideoDecodeError"),
        "zero-length video": ({"prompt": "\nx", "videos": [str(media / "empty.mp4")], **clip}, "EmptyVideoError"),
        "audio only": ({"prompt": "\nx", "videos": [str(media / "tone.m4a")], **clip}, "NoVideoStreamError"),
        "directory": ({"prompt": "\nx", "videos": [str(media / "folder.mp4")], **clip}, "is a directory"),
        "missing image": ({"prompt": "\nx", "images": [str(media / "nope.png")]}, "ImageLoadError"),
        "unknown key": ({"prompt": "\nx", "bogus": 1}, "accepted keys: prompt, images, videos"),
        "max_new_tokens str": ({"prompt": "\nx", "generate_kwargs": {"max_new_tokens": "10"}},
                               "generate_kwargs['max_new_tokens'] must be an int"),
        "temperature list": ({"prompt": "\nx", "generate_kwargs": {"temperature": [1]}},
                             "generate_kwargs['temperature'] must be a number"),
        "unknown generate kwarg": ({"prompt": "\nx", "generate_kwargs": {"max_tokens": 3}}, "max_new_tokens"),
        "media kwarg type": ({"prompt": "\nx", "media_kwargs": {"video_fps": "1"}}, "media_kwargs['video_fps']"),
        "moss-only media kwarg": ({"prompt": "\nx", "media_kwargs": {"max_pixels": 10}}, "accepted: video_fps"),
        "sampling range": ({"prompt": "\nx", "generate_kwargs": {"do_sample": True, "temperature": 0}},
                           "SamplingError"),
        "not a dict": ("describe the video", "QueryError"),
        "no prompt": ({"images": [str(media / "img.png")]}, "neither 'prompt' nor 'messages'"),
    }


BAD_IDS = ["missing video", "truncated mp4", "zero-length video", "audio only", "directory", "missing image",
           "unknown key", "max_new_tokens str", "temperature list", "unknown generate kwarg", "media kwarg type",
           "moss-only media kwarg", "sampling range", "not a dict", "no prompt"]


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_is_an_error_line_and_worker_survives(vp_worker, media, case):
    query, words = _bad_cases(media)[case]
    pieces = vp_worker.ask(query)
    assert len(pieces) == 1 and pieces[0].startswith("[ERROR] ") and words in pieces[0], pieces
    _ok(vp_worker.ask({"prompt": "\nHi", "generate_kwargs": {"max_new_tokens": 2}, "reset_session": True}))


def test_bad_input_raises_named_errors_in_batch(vp, media):
    model, processor = vp
    from mossvl_lab.processing import video as V
    cases = _bad_cases(media)
    for case, error in [("missing video", V.VideoNotFoundError), ("audio only", V.NoVideoStreamError),
                        ("unknown key", QueryError), ("temperature list", QueryError)]:
        with pytest.raises(error):
            offline_batch_generate(model, processor, [cases[case][0]])


def _peak_rss_mb() -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]) / 1024


def test_huge_image_is_resized_with_bounded_memory(vp_worker, vp):
    _, processor = vp
    huge = Image.new("RGB", (10000, 10000), (200, 30, 30))  # PIL holds 381 MiB
    query = {"prompt": "\nWhat colour is it?", "images": [huge], "generate_kwargs": {"max_new_tokens": 2}}
    measure = os.access("/proc/self/clear_refs", os.W_OK)
    if measure:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
        base = _peak_rss_mb()
    _, inputs = build_turn(processor, query, [])
    assert tuple(inputs["pixel_values"].shape) == (1, 1, 1, 3, 56, 56)  # one tile at the tiny tower's size
    _ok(vp_worker.ask(query))
    if measure:  # a float copy of the full image alone would be 1.1 GiB
        assert _peak_rss_mb() - base < 200


def test_prompt_longer_than_context(media, monkeypatch):
    cfg = ml.config.override(ml.config.preset("video-preview-tiny"), {"text.max_position_embeddings": 64})
    model, processor = ml.build_model(cfg).eval(), ml.processor_for_model(cfg)
    long = {"prompt": "\n" + "please describe every single frame in great detail " * 20,
            "generate_kwargs": {"max_new_tokens": 4}}
    with Worker(model, processor) as w:
        (line,) = w.ask(long)
        assert line.startswith("[ERROR] QueryError") and "context is 64" in line
        _ok(w.ask({"prompt": "\nHi", "generate_kwargs": {"max_new_tokens": 2}}))
    with pytest.raises(QueryError, match="context is 64"):
        offline_batch_generate(model, processor, [long])
    asked = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **kw: asked.append(kw["max_new_tokens"]) or original(*a, **kw))
    short = offline_batch_generate(model, processor, [{"prompt": "\nHi", "generate_kwargs": {"max_new_tokens": 500}}])
    used = len(processor.tokenizer.encode(short["results"][0]["input_text"]))
    assert asked == [64 - used]  # max_new_tokens capped so prompt + answer fit the context


# --------------------------------------------------------------------------- batched generation


def _mixed_queries(media, family: str):
    if family == "moss_vl":
        media_kwargs = {"video_fps": 1.0, "min_frames": 1, "max_frames": 3}
    else:
        media_kwargs = {"video_fps": 1.0, "video_minlen": 1, "video_maxlen": 3}
    common = {"media_kwargs": media_kwargs, "generate_kwargs": {"max_new_tokens": 5}}
    return [{"prompt": "\nWhat happens in the video?", "videos": [str(media / "clip.mp4")], **common},
            {"prompt": "\nDescribe this image in detail, please.", "images": [str(media / "img.png")], **common},
            {"prompt": "\nHello!", **common}]


@pytest.mark.parametrize("family", ["vp", "vl"])
def test_batched_text_equals_each_item_alone(request, media, family):
    model, processor = request.getfixturevalue(family)
    queries = _mixed_queries(media, processor.family)
    batched = offline_batch_generate(model, processor, queries)
    alone = [offline_batch_generate(model, processor, [q])["results"][0] for q in queries]
    assert [r["index"] for r in batched["results"]] == [0, 1, 2]
    assert [r["text"] for r in batched["results"]] == [r["text"] for r in alone]
    assert [r["input_text"] for r in batched["results"]] == [r["input_text"] for r in alone]
    assert all(r["text"] for r in alone)
    for result, state in zip(batched["results"], batched["session_states"]):
        assert result["messages"] == state and state[-1] == {"role": "assistant", "content": result["text"]}


def test_batch_follow_ups_with_session_states(vl, media):
    model, processor = vl
    queries = _mixed_queries(media, "moss_vl")[:2]
    first = offline_batch_generate(model, processor, queries)
    gen = {"generate_kwargs": {"max_new_tokens": 5}}
    follow = [{"prompt": "\nAnd what comes next?", **gen}, {"prompt": "\nHello!", "reset_session": True, **gen}]
    second = offline_batch_generate(model, processor, follow, session_states=first["session_states"])
    kept, reset = second["session_states"]
    assert kept[:2] == first["session_states"][0][:2] and len(kept) == 4
    assert "<|video|>" in second["results"][0]["input_text"]  # the history's video is still in context
    assert [m["role"] for m in reset] == ["user", "assistant"]
    fresh = offline_batch_generate(model, processor, [{"prompt": "\nHello!", **gen}])
    assert second["results"][1]["text"] == fresh["results"][0]["text"]
    frozen = offline_batch_generate(model, processor, [{"prompt": "\nOk?", "persist_session": False, **gen}],
                                    session_states=[first["session_states"][1]])
    assert frozen["session_states"] == [first["session_states"][1]]
    assert frozen["results"][0]["messages"][-2]["content"] == "Ok?"  # MOSS-VL strips the "\n" convention


def test_batch_rejects_disagreeing_kwargs_and_control_keys(vp, media):
    model, processor = vp
    a = {"prompt": "\nA", "generate_kwargs": {"max_new_tokens": 2}}
    with pytest.raises(QueryError, match="same generate_kwargs"):
        offline_batch_generate(model, processor, [a, {**a, "generate_kwargs": {"max_new_tokens": 3}}])
    with pytest.raises(QueryError, match="same media_kwargs"):
        offline_batch_generate(model, processor, [a, {**a, "media_kwargs": {"video_fps": 2.0}}])
    with pytest.raises(QueryError, match="stop/cancel"):
        offline_batch_generate(model, processor, [a, {**a, "stop_offline_generate": True}])
    with pytest.raises(QueryError, match="one entry per query"):
        offline_batch_generate(model, processor, [a, a], session_states=[None])


def test_moss_vl_messages_image_url_and_segments(vl, media):
    model, processor = vl
    gen = {"generate_kwargs": {"max_new_tokens": 4}, "media_kwargs": {"video_fps": 2.0}}
    video = {"video_path": str(media / "clip.mp4"), "segments": [[0.0, 1.0], [2.0]]}
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file://" + str(media / "img.png")}},
        {"type": "video", "video": video},
        {"type": "text", "text": "Compare them."}]}]
    by_messages = offline_batch_generate(model, processor, [{"messages": messages, **gen}])["results"][0]
    by_prompt = offline_batch_generate(model, processor, [{"prompt": "\nCompare them.", "images": [
        str(media / "img.png")], "videos": [video], **gen}])["results"][0]
    assert by_messages["input_text"].count("<|image|>") == 1
    assert by_messages["input_text"].count("<|video|>") == 2  # one video item per segment
    assert by_messages["input_text"] == by_prompt["input_text"] and by_messages["text"] == by_prompt["text"]
    assert by_messages["messages"][0]["content"][0] == {"type": "image", "image": "file://" + str(media / "img.png")}
    q = parse_query({"messages": messages}, "moss_vl")
    assert [p["type"] for p in q.messages[0]["content"]] == ["image", "video", "video", "text"]


# --------------------------------------------------------------------------- vision_chunked_length


@pytest.mark.parametrize("family", ["vp", "vl"])
def test_vision_chunked_length_gives_identical_logits(request, family):
    model, processor = request.getfixturevalue(family)
    frames = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                       {"type": "text", "text": "What?"}]}])
    inputs = processor(text=text, videos=[frames])
    with torch.no_grad():
        logits = {c: model(**inputs, vision_chunked_length=c).logits for c in (1, 4, 64)}
        other = model(**processor(text=text, videos=[frames[::-1].copy()])).logits
    # equal up to fp32 GEMM rounding: a 1-frame matmul may round differently from a 6-frame one (~2e-7 seen)
    for chunk in (1, 4):
        torch.testing.assert_close(logits[chunk], logits[64], rtol=0, atol=1e-5)
        assert torch.equal(logits[chunk].argmax(-1), logits[64].argmax(-1))
    assert not torch.allclose(other, logits[64])  # the frames do reach the logits


def test_vision_chunked_length_reaches_the_vision_tower(vp, media, monkeypatch):
    model, processor = vp
    seen = []
    original = model.encode_frames

    def spy(pixel_values, aspect_ratio_ids, aspect_ratio_mask, chunk=None):
        seen.append(chunk)
        return original(pixel_values, aspect_ratio_ids, aspect_ratio_mask, chunk)

    monkeypatch.setattr(model, "encode_frames", spy)
    query = {"prompt": "\nx", "images": [str(media / "img.png")], "generate_kwargs": {"max_new_tokens": 1}}
    offline_batch_generate(model, processor, [query], vision_chunked_length=2)
    offline_batch_generate(model, processor, [{**query, "generate_kwargs": {"max_new_tokens": 1,
                                                                            "vision_chunked_length": 3}}])
    with Worker(model, processor, vision_chunked_length=5) as w:
        _ok(w.ask(query))
    assert seen == [2, 3, 5]


@pytest.mark.parametrize("family", ["vp", "vl"])
def test_context_check_counts_the_positions_the_model_uses(request, media, family):
    """MOSS-VL frames consume max(h, w) / merge + 1 positions; the context check must count what the model does."""
    from mossvl_lab.generation.queries import positions_used, render_turn
    model, processor = request.getfixturevalue(family)
    turns = [render_turn(processor, parse_query(q, processor.family)) for q in _mixed_queries(media, processor.family)]
    inputs = processor(text=[t.text for t in turns], images=[t.images for t in turns],
                       videos=[t.videos for t in turns], padding_side="left", **turns[0].media_kwargs)
    state = ml.StreamState()
    with torch.no_grad():
        model(**inputs, state=state)
    assert positions_used(processor, inputs) == state.next_position.tolist()
    if family == "vl":
        assert positions_used(processor, inputs)[0] > int(inputs["attention_mask"][0].sum())
