"""Streaming metrics on crafted predictions, every number computed by hand."""

from __future__ import annotations

import math

import pytest

from mossvl_lab.training.metrics import Metrics, normalize_text, score_clip, score_qa


def test_hand_computed_clip():
    # 10 frames; targets at 2, 6, 7. Frames within +-1 of a target: 1-3 and 5-8, so quiet = {0, 4, 9}.
    targets = {2: "a red square appears", 6: "the red square leaves", 7: "a blue circle appears"}
    predicted = {
        3: "A red  square appears ",  # target 2, one frame late, exact after normalisation
        6: "the red square moves",    # target 6 on time, wrong text
        8: "a blue circle appears",   # target 7, one frame late, exact
        9: "something",               # quiet frame: false alarm
    }
    m = score_clip(targets, predicted, n_frames=10)
    assert (m.clips, m.frames, m.targets, m.recalled, m.exact) == (1, 10, 3, 3, 2)
    assert (m.quiet_frames, m.false_alarms, m.spoken_frames) == (3, 1, 4)
    assert m.delay_sum == 1 + 0 + 1
    assert m.event_recall == 1.0
    assert m.caption_exact_match == pytest.approx(2 / 3)
    assert m.mean_delay_frames == pytest.approx(2 / 3)
    assert m.false_alarm_rate == pytest.approx(1 / 3)


def test_miss_and_early_speech():
    # targets 3 and 8 in 12 frames; the model speaks early at 2 (exact) and two frames late at 10 (a miss)
    targets = {3: "x", 8: "y"}
    predicted = {2: "x", 10: "y"}
    m = score_clip(targets, predicted, n_frames=12)
    # quiet frames: not in 2-4 or 7-9 -> 0, 1, 5, 6, 10, 11; frame 10 is quiet, so it is a false alarm
    assert (m.targets, m.recalled, m.exact, m.delay_sum) == (2, 1, 1, -1)
    assert (m.quiet_frames, m.false_alarms) == (6, 1)
    assert m.event_recall == 0.5 and m.mean_delay_frames == -1.0


def test_one_to_one_matching_prefers_the_matching_text():
    # adjacent targets, model one frame late on both: each target gets its own spoken frame
    targets = {4: "first", 5: "second"}
    predicted = {5: "first", 6: "second"}
    m = score_clip(targets, predicted, n_frames=8)
    assert (m.recalled, m.exact, m.delay_sum) == (2, 2, 2)
    # one utterance cannot recall two targets
    m = score_clip(targets, {5: "first"}, n_frames=8)
    assert (m.recalled, m.exact, m.delay_sum) == (1, 1, 1)
    # among candidates the one with the right text wins over the nearer one
    m = score_clip({4: "first"}, {4: "nope", 5: "first"}, n_frames=8)
    assert (m.recalled, m.exact, m.delay_sum) == (1, 1, 1)
    # no matching text: the nearest, ties to the earlier frame
    m = score_clip({4: "first"}, {3: "a", 5: "b"}, n_frames=8)
    assert (m.recalled, m.exact, m.delay_sum) == (1, 0, -1)


def test_silent_model_and_empty_text():
    m = score_clip({1: "a"}, {2: "   "}, n_frames=4)  # whitespace-only speech is silence
    assert (m.recalled, m.spoken_frames, m.false_alarms) == (0, 0, 0)
    assert m.event_recall == 0.0 and m.false_alarm_rate == 0.0
    assert math.isnan(m.caption_exact_match) and math.isnan(m.mean_delay_frames)
    assert m.to_dict()["caption_exact_match"] is None


def test_sums_and_qa():
    a = score_clip({2: "x"}, {2: "x"}, n_frames=5)
    b = score_clip({1: "y"}, {}, n_frames=3)
    qa = score_qa([("At 3.0 seconds", "at 3.0 seconds"), ("a red square appears", "a blue square appears")])
    total = sum([a, b, qa])
    assert isinstance(total, Metrics)
    assert (total.clips, total.frames, total.targets, total.recalled) == (2, 8, 2, 1)
    assert (total.quiet_frames, total.false_alarms) == (2 + 0, 0)
    assert (total.qa_total, total.qa_correct, total.qa_accuracy) == (2, 1, 0.5)
    assert total.event_recall == 0.5
    assert "timestamp QA 50.0%" in total.summary()
    assert normalize_text("  The  Red\tsquare ") == "the red square"


def test_qa_split_by_question_kind():
    answers = [("at 3.0 seconds", "at 3.0 seconds"), ("at 1.0 seconds", "at 12.0 seconds"),
               ("a red square appears", "a red square appears"), ("the red square moves", "a red square appears"),
               ("the blue circle leaves", "the blue circle leaves")]
    kinds = ["when", "when", "what_at", "what_at", "what_at"]
    m = score_qa(answers[:2], kinds[:2]) + score_qa(answers[2:], kinds[2:])  # split counts add up across clips
    assert (m.qa_total, m.qa_correct, m.qa_when_total, m.qa_when_correct) == (5, 3, 2, 1)
    assert (m.qa_when_accuracy, m.qa_what_at_accuracy) == (0.5, 2 / 3)
    assert "timestamp QA 60.0% (3/5) (when 1/2, what at 2/3)" in m.summary()
    assert m.to_dict()["qa_when_accuracy"] == 0.5
    unsplit = score_qa(answers)  # without kinds every question counts as "what at"
    assert (unsplit.qa_correct, unsplit.qa_when_total) == (3, 0) and "when" not in unsplit.summary()
    with pytest.raises(ValueError, match="one kind per answer"):
        score_qa(answers, kinds[:2])


def test_frames_out_of_range_are_an_error():
    with pytest.raises(ValueError, match="outside"):
        score_clip({5: "x"}, {}, n_frames=5)


def test_reply_targets_split_the_caption_exact_match():
    # targets at 2 (caption only), 5 and 8 (carry a reply); the model gets 2 right, 5 right, 8 without its reply
    targets = {2: "a red square appears", 5: "the square is red", 8: "the red square leaves, the square is gone"}
    predicted = {2: "a red square appears", 5: "the square is red", 8: "the red square leaves"}
    m = score_clip(targets, predicted, n_frames=10, reply_frames={5, 8})
    assert (m.recalled, m.exact, m.reply_recalled, m.reply_exact) == (3, 2, 2, 1)
    assert m.reply_exact_match == 0.5 and m.event_caption_exact_match == 1.0
    assert m.caption_exact_match == pytest.approx(2 / 3)
    assert "event captions 100.0%, replies 50.0%" in m.summary()
    # a reply target that was never recalled counts in neither split
    m = score_clip(targets, {2: "a red square appears"}, n_frames=10, reply_frames={5, 8})
    assert (m.reply_recalled, m.reply_exact) == (0, 0) and math.isnan(m.reply_exact_match)


def test_reply_frames_of_a_clip_are_where_its_questions_are_answered():
    from mossvl_lab.data.synthetic import make_clip

    for seed in range(10):
        clip = make_clip(seed, extra_questions=1)
        # replies read "the <shape> is <colour | gone | not here>"; no event caption contains " is "
        said_reply = {frame for frame, text in clip.speech().items() if " is " in text}
        assert clip.reply_frames() == said_reply and {q.asked_at for q in clip.questions} <= said_reply, seed
