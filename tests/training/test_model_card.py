"""The model card states every training choice that makes a run differ from evaluation's clips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mossvl_lab.training.metrics import Metrics
from mossvl_lab.training.model_card import render_card
from mossvl_lab.training.trainer import TrainConfig


def card(tmp_path: Path, **train) -> str:
    config = dataclasses.asdict(TrainConfig(**train))
    log = {"train_config": config, "history": [{"loss": 0.5}], "command": "python -m ..."}
    return render_card(tmp_path, log, Metrics(clips=1, frames=10, targets=2, recalled=2, exact=1, quiet_frames=6),
                       clips=1, eval_seconds=1.0, family="video_preview", processor_settings={}, parameters=10**6)


def test_card_names_training_only_choices(tmp_path):
    plain = card(tmp_path)
    assert "mid-stream questions" not in plain and "decisions" not in plain and "oversampled" not in plain
    chosen = card(tmp_path, extra_questions=2, decision_weight=4.0, decision_kinds="go_on",
                  event_kind_weights=(("move", 3.0),))
    assert "3 mid-stream questions per training clip (evaluation clips ask one)" in chosen
    assert "decisions to go on after speech weighted 4" in chosen
    assert "move x3" in chosen
    assert "decisions to speak and to go on weighted 2" in card(tmp_path, decision_weight=2.0)
    assert "replies to mid-stream questions" not in plain
    assert "replies to mid-stream questions weighted 3" in card(tmp_path, reply_weight=3.0)
    assert "streamed twice" not in plain and "the second time asking about another shape" in card(
        tmp_path, question_pairs=True)
    assert "sorted by length" not in plain
    assert "8-20 s (each window of 8 steps sorted by length into batches)" in card(
        tmp_path, group_by_length=8)


def test_card_splits_caption_exact_match_by_reply_targets(tmp_path):
    config = dataclasses.asdict(TrainConfig())
    log = {"train_config": config, "history": [{"loss": 0.5}], "command": "python -m ..."}
    metrics = Metrics(clips=2, frames=20, targets=10, recalled=10, exact=7, reply_recalled=4, reply_exact=2,
                      quiet_frames=6)
    text = render_card(tmp_path, log, metrics, clips=2, eval_seconds=1.0, family="video_preview",
                       processor_settings={}, parameters=10**6)
    # 7 exact of 10: 5 of the 6 caption-only targets, 2 of the 4 that carry a reply
    assert "event captions alone 83.3% (5/6), targets carrying a reply 50.0% (2/4)" in text
    assert "Caption exact match split" not in card(tmp_path)  # nothing marked as a reply: no split line


def test_card_splits_timestamp_qa_by_question_kind(tmp_path):
    log = {"train_config": dataclasses.asdict(TrainConfig()), "history": [{"loss": 0.5}], "command": "python -m ..."}
    metrics = Metrics(clips=2, frames=20, targets=2, recalled=2, exact=2, quiet_frames=6,
                      qa_total=8, qa_correct=3, qa_when_total=3, qa_when_correct=2)
    text = render_card(tmp_path, log, metrics, clips=2, eval_seconds=1.0, family="moss_vl",
                       processor_settings={}, parameters=10**6)
    # 3 right of 8: 2 of the 3 "when" questions, so 1 of the 5 "what happened at" ones
    assert '"when" questions 66.7% (2/3), "what happened at" questions 20.0% (1/5)' in text
    assert "Timestamp QA split" not in card(tmp_path)
