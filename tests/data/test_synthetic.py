"""The procedural clip generator: determinism, rendered content, targets that never precede evidence."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from mossvl_lab.data.synthetic import BACKGROUND, COLORS, EVAL_SEEDS, make_clip, question_answers, write_clip


def test_same_seed_same_clip_and_eval_seeds_are_held_out():
    a, b = make_clip(7), make_clip(7)
    assert np.array_equal(a.frames, b.frames) and a.events == b.events and a.qa == b.qa
    assert min(EVAL_SEEDS) >= 1_000_000 and not np.array_equal(make_clip(8).frames[:5], a.frames[:5])


def test_frames_show_exactly_the_described_scene():
    for seed in range(20):
        clip = make_clip(seed)
        assert 8 <= len(clip.timestamps) <= 40 and clip.timestamps == tuple(float(t) for t in range(len(clip.frames)))
        visible: dict[str, str] = {}
        for t, frame in enumerate(clip.frames):
            for event in (e for e in clip.events if e.frame == t):
                if event.kind == "leave":
                    visible.pop(event.shape)
                else:
                    visible[event.shape] = event.new_color or event.color
            colours = {tuple(c) for c in frame.reshape(-1, 3)} - {BACKGROUND}
            assert colours == {COLORS[c] for c in visible.values()}, (seed, t)


def test_speech_targets_only_at_event_frames_or_answers():
    for seed in range(20):
        clip = make_clip(seed)
        speech = clip.speech()
        event_frames = {e.frame for e in clip.events}
        answer_frames = {f for f, _ in question_answers(clip)}
        assert set(speech) == event_frames | answer_frames
        assert all(f >= clip.question.asked_at for f in answer_frames)  # never before the question is asked


def test_a_question_is_answered_when_asked_and_revised_when_its_shape_changes():
    """Expected answers rebuilt from the events alone: the colour (or 'not here') at the asked frame, then a
    revision at each later frame where the asked shape appears, changes colour or leaves; moves say nothing."""
    for seed in range(40):
        clip = make_clip(seed, extra_questions=2)
        for question in clip.questions:
            shape, visible, expected = question.shape, None, []
            for t in range(len(clip.frames)):
                changes = [e for e in clip.events if e.frame == t and e.shape == shape and e.kind != "move"]
                for event in changes:
                    visible = None if event.kind == "leave" else (event.new_color or event.color)
                if t == question.asked_at:
                    expected.append((t, f"the {shape} is {visible or 'not here'}"))
                elif t > question.asked_at and changes:
                    expected.append((t, f"the {shape} is {visible or 'gone'}"))
            assert question_answers(clip, question) == expected, seed
            assert question_answers(clip, question)[0][0] == question.asked_at  # every question gets a reply


def test_offline_qa_answers_need_timestamps():
    clip = make_clip(3)
    for pair in clip.qa:
        if pair.question.startswith("when"):
            assert pair.answer.endswith("seconds") and pair.answer.startswith("at ")
        else:
            seconds = float(pair.question.split(" at ")[1].split(" seconds")[0])
            assert any(e.caption == pair.answer and clip.timestamps[e.frame] == seconds for e in clip.events)


def test_clip_writes_to_mp4_and_decodes_back(tmp_path):
    from mossvl_lab.processing.video import VideoSampling, decode_video

    clip = make_clip(5, min_seconds=8, max_seconds=8)
    path = write_clip(clip, tmp_path / "clip.mp4")
    decoded = decode_video(path, VideoSampling.moss_vl(video_fps=1.0, max_frames=64))
    assert len(decoded.frames) == 8 and list(decoded.timestamps) == [float(t) for t in range(8)]
    assert np.abs(decoded.frames.astype(int) - clip.frames.astype(int)).mean() < 12  # lossy codec, same picture


def test_kind_weights_change_only_which_events_training_clips_get():
    def kinds(weights):
        counts = collections.Counter()
        for seed in range(150):
            counts.update(e.kind for e in make_clip(seed, event_rate=0.5, kind_weights=weights).events)
        return counts

    uniform, moves, no_moves = kinds(None), kinds({"move": 4.0}), kinds({"move": 0.0})
    assert no_moves["move"] == 0 and sum(no_moves.values()) > 0
    # four times the odds of a move whenever one is possible: clearly more of them than the uniform draw gives
    assert moves["move"] / sum(moves.values()) > 1.5 * uniform["move"] / sum(uniform.values())
    with pytest.raises(ValueError, match="kind_weights"):
        make_clip(1, kind_weights={"teleport": 1.0})
    with pytest.raises(ValueError, match="kind_weights"):
        make_clip(1, kind_weights={"move": -1.0})


def test_extra_questions_are_training_only_additions():
    for seed in range(60):
        plain, more = make_clip(seed, event_rate=0.4), make_clip(seed, event_rate=0.4, extra_questions=2)
        # the same scene, first question and offline QA: evaluation seeds are untouched by the option
        assert plain.events == more.events and plain.question == more.question and plain.qa == more.qa
        asked = more.questions
        assert len(asked) == 3 and len({q.shape for q in asked}) == 3 and len({q.asked_at for q in asked}) == 3
        assert [q.asked_at for q in asked] == sorted(q.asked_at for q in asked)
        # every answer any question gets is spoken at its frame, after that frame's captions
        speech = more.speech()
        for question in asked:
            for frame, answer in question_answers(more, question):
                assert answer in speech[frame].split(", ")
                captions = [e.caption for e in more.events if e.frame == frame]
                assert speech[frame].split(", ")[:len(captions)] == captions
        for frame, text in plain.speech().items():  # nothing the single question says goes missing
            assert set(text.split(", ")) <= set(speech[frame].split(", "))
    with pytest.raises(ValueError, match="extra_questions"):
        make_clip(1, extra_questions=3)


def test_named_question_style_changes_only_how_replies_spell_the_shape():
    from mossvl_lab.training.metrics import normalize_text

    for seed in range(40):
        plain = make_clip(seed, extra_questions=2)
        named = make_clip(seed, extra_questions=2, question_style="named")
        assert np.array_equal(plain.frames, named.frames) and plain.events == named.events and plain.qa == named.qa
        for p, n in zip(plain.questions, named.questions):
            assert (p.asked_at, p.shape) == (n.asked_at, n.shape) and n.style == "named"
            assert n.text == p.text == f"what color is the {p.shape}?"  # the user's question is unchanged
            # each reply names the shape with a capital and nothing else differs: the metric scores them alike
            for (frame_p, answer_p), (frame_n, answer_n) in zip(question_answers(plain, p),
                                                               question_answers(named, n)):
                assert frame_p == frame_n
                assert answer_n == answer_p.replace(f"the {p.shape} is", f"the {p.shape.capitalize()} is")
        assert {f: normalize_text(t) for f, t in named.speech().items()} == \
            {f: normalize_text(t) for f, t in plain.speech().items()}
        captions = " ".join(e.caption for e in named.events)
        assert not any(shape.capitalize() in captions for shape in ("square", "circle", "triangle"))
    with pytest.raises(ValueError, match="question_style"):
        make_clip(1, question_style="shouted")
