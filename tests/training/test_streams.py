"""Training sequences equal, token for token, what a RealtimeSession feeds when it follows the targets."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.data.synthetic import make_clip
from mossvl_lab.processing.processor import ProcessingConfig
from mossvl_lab.streaming.policies import TeacherForcedPolicy
from mossvl_lab.streaming.session import RealtimeSession
from mossvl_lab.training.streams import IGNORE, offline_qa_sample, realtime_sample

SIZES = {"video-preview-tiny": 56, "moss-vl-tiny": 64}


# (preset, processor settings, extra questions): the published prompts, and a checkpoint's own short prompt
# without frame times; training clips may ask more than one question
CASES = [("video-preview-tiny", {}, 0), ("moss-vl-tiny", {}, 0), ("video-preview-tiny", {}, 2),
         ("moss-vl-tiny", {"realtime_system_prompt": "Say what changes.", "frame_timestamps": False}, 1)]


@pytest.mark.parametrize("preset,settings,extra", CASES)
def test_realtime_sample_is_what_the_session_feeds(preset, settings, extra):
    cfg = ml.config.preset(preset)
    torch.manual_seed(0)
    model = ml.build_model(cfg).eval()
    processor = ml.processor_for_model(cfg, config=replace(ProcessingConfig.for_model(cfg), **settings))
    clip = make_clip(11, size=SIZES[preset], min_seconds=8, max_seconds=10, extra_questions=extra)
    assert clip.speech(), "pick a seed whose clip has something to say"
    assert len(clip.questions) == 1 + extra
    sample = realtime_sample(clip, processor, cfg)
    decisions = [int(t) for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE]
    fed = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs.get("input_ids", args[0] if args else None)),
                                             with_kwargs=True)
    session = RealtimeSession(model, processor, policy=TeacherForcedPolicy(decisions))
    session.step()
    for k, frame in enumerate(clip.frames):
        for question in clip.questions:
            if question.asked_at == k:
                session.push_prompt(question.text)
        session.push_frame(frame, clip.timestamps[k])
        session.step()
        while not session.waiting_for_input:  # speak until the scripted silence
            session.step()
    handle.remove()
    streamed = torch.cat([ids[0] for ids in fed])
    # the session has fed everything but the last decision, which stays pending
    assert torch.equal(streamed, sample.input_ids[:-1])
    assert int(sample.input_ids[-1]) == cfg.tokens.silence_token_id
    text = processor.decode(sample.input_ids.tolist())
    assert ("Say what changes." in text) == bool(settings)
    if cfg.family == "moss_vl":
        assert ("1.0 seconds" in text) != bool(settings)
    frames = int((sample.input_ids == cfg.tokens.image_token_id).sum())
    assert frames == len(clip.frames) and (sample.labels[sample.input_ids == cfg.tokens.image_token_id] == IGNORE).all()


def test_offline_follow_up_questions_extend_the_single_question_sample():
    processor = ml.processor_for_model(ml.config.preset("moss-vl-tiny"))
    clip = next(c for c in (make_clip(s, size=64, min_seconds=6, max_seconds=8, event_rate=0.5) for s in range(50))
                if len(c.qa) >= 3)
    first, *rest = clip.qa[:3]
    one = offline_qa_sample(clip, first.question, first.answer, processor)
    three = offline_qa_sample(clip, first.question, first.answer, processor,
                              follow_ups=[(p.question, p.answer) for p in rest])
    n = one.input_ids.numel()
    assert torch.equal(three.input_ids[:n], one.input_ids) and torch.equal(three.labels[:n], one.labels)
    tok = processor.tokenizer
    trained = tok.decode([t for t in three.labels.tolist() if t != IGNORE])
    assert trained == "".join(f"{p.answer}<|im_end|>\n" for p in (first, *rest))  # answers only carry loss
    tail = tok.decode(three.input_ids[n:].tolist())
    assert all(f"user\n{p.question}<|im_end|>" in tail for p in rest)


def test_question_first_moves_only_the_question_before_the_video(monkeypatch):
    """The same tokens, vision and trained answer; the question sits between the user header and the video. The
    evaluation asks with the very prompt the sample trains on."""
    from mossvl_lab.training import evaluate as evaluate_module

    processor = ml.processor_for_model(ml.config.preset("moss-vl-tiny"))
    clip = make_clip(3, size=64, min_seconds=6, max_seconds=8, event_rate=0.5)
    pair = clip.qa[0]
    after = offline_qa_sample(clip, pair.question, pair.answer, processor)
    before = offline_qa_sample(clip, pair.question, pair.answer, processor, question_first=True)
    assert sorted(after.input_ids.tolist()) == sorted(before.input_ids.tolist())
    assert torch.equal(after.vision["pixel_values"], before.vision["pixel_values"])
    tok = processor.tokenizer
    assert tok.decode([t for t in before.labels.tolist() if t != IGNORE]) == f"{pair.answer}<|im_end|>\n"
    text = tok.decode(before.input_ids.tolist())
    assert text.startswith(f"<|im_start|>user\n{pair.question}<|vision_start|>")
    assert text.endswith(f"<|vision_end|><|im_end|>\n<|im_start|>assistant\n{pair.answer}<|im_end|>\n")

    seen = []

    class Stop(Exception):
        pass

    def record(**inputs):
        seen.append(inputs["input_ids"][0].tolist())
        raise Stop

    model = ml.build_model(ml.config.preset("moss-vl-tiny"))
    monkeypatch.setattr(model, "generate", record)
    with pytest.raises(Stop):
        evaluate_module.answer_offline(model, processor, clip, pair.question, question_first=True)
    prompt = before.input_ids[before.labels == IGNORE].tolist()
    assert seen[0] == prompt


def test_decisions_mark_speaking_and_going_on():
    cfg = ml.config.preset("video-preview-tiny")
    processor = ml.processor_for_model(cfg)
    clip = next(c for c in (make_clip(s, size=56, min_seconds=8, max_seconds=12, event_rate=0.5) for s in range(40))
                if any(", " in text for text in c.speech().values()))
    sample = realtime_sample(clip, processor, cfg)
    tok, silence = processor.tokenizer, cfg.tokens.silence_token_id
    marked = sample.labels[sample.decisions].tolist()
    assert IGNORE not in marked and len(sample.decisions) == len(sample.labels)
    # one decision per silence target (before the first frame, after every frame or speech), one per first
    # spoken word and one per ", " that goes on to another part: counted from the clip, not from the sample
    speech = clip.speech()
    parts = sum(text.count(", ") for text in speech.values())
    assert marked.count(silence) == len(clip.frames) + 1
    assert len(marked) == len(clip.frames) + 1 + len(speech) + parts
    assert marked.count(tok.encode(",", add_special_tokens=False)[0]) == parts


@pytest.mark.parametrize("preset", ["video-preview-tiny", "moss-vl-tiny"])
def test_reply_marks_cover_exactly_the_replies(preset):
    """Decoding the marked targets frame by frame gives each frame's replies, with ", " when a caption precedes,
    rebuilt from the questions' answers rather than from the sample."""
    from mossvl_lab.data.synthetic import question_answers
    cfg = ml.config.preset(preset)
    processor = ml.processor_for_model(cfg)
    size = 56 if preset == "video-preview-tiny" else 64
    clips = (make_clip(s, size=size, min_seconds=10, max_seconds=14, event_rate=0.5) for s in range(60))
    clip = next(c for c in clips if {f for f, _ in question_answers(c)} & {e.frame for e in c.events}
                and len(question_answers(c)) >= 2)
    sample = realtime_sample(clip, processor, cfg)
    tok = processor.tokenizer
    assert not sample.replies[sample.labels == IGNORE].any()  # only targets carry reply marks
    runs, current = [], []  # contiguous marked spans, in stream order
    for marked, token in zip(sample.replies.tolist(), sample.input_ids.tolist()):
        if marked:
            current.append(token)
        elif current:
            runs.append(tok.decode(current)), current.clear()
    captioned = {e.frame for e in clip.events}
    expected = [(", " if frame in captioned else "") + answer for frame, answer in question_answers(clip)]
    assert runs == expected
