"""The tiny checkpoints that ship in checkpoints/ still do what their model cards say.

Each card's numbers come from eval.json (per-clip counts on the held-out EVAL_SEEDS); re-evaluating the first
CI_CLIPS clips here must give exactly those counts (the evaluation is greedy, so any change in the model, the
processor, the session or the metrics shows up), and those clips must meet the benchmark targets.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.cli import main
from mossvl_lab.data.synthetic import EVAL_SEEDS, make_clip
from mossvl_lab.training.evaluate import check_targets, evaluate, trained_eval_settings
from mossvl_lab.training.metrics import Metrics

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
SHIPPED = ("video-preview-tiny", "moss-vl-tiny")
CI_CLIPS = 30


def _load(name: str):
    root = CHECKPOINTS / name
    assert (root / "config.json").is_file(), f"{root} is not a shipped checkpoint"
    return root, ml.load_model(root, progress=False).eval(), ml.load_processor(root)


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    """(name, model, eval.json, the first CI_CLIPS held-out clips re-evaluated now), once per checkpoint."""
    torch.manual_seed(0)
    root, model, processor = _load(request.param)
    card = json.loads((root / "eval.json").read_text())
    measured = evaluate(model, processor, EVAL_SEEDS[:CI_CLIPS], **trained_eval_settings(root))
    return request.param, model, card, measured


@pytest.mark.slow
def test_checkpoint_reproduces_its_model_card(shipped):
    name, model, card, measured = shipped
    assert card["first_seed"] == EVAL_SEEDS[0] and card["clips"] >= CI_CLIPS
    recorded = sum((Metrics(**clip) for clip in card["per_clip"][:CI_CLIPS]), Metrics())
    assert measured == recorded, f"{name}: card {recorded.summary()} vs now {measured.summary()}"
    totals = sum((Metrics(**clip) for clip in card["per_clip"]), Metrics())
    assert {k: card["metrics"][k] for k in dataclasses.asdict(totals)} == dataclasses.asdict(totals)
    readme = (CHECKPOINTS / name / "README.md").read_text()
    assert f"{100 * totals.event_recall:.1f}%" in readme and "mossvl_lab.training.trainer" in readme


@pytest.mark.slow
def test_checkpoint_watches_the_frames(shipped):
    """A floor far above what a model that ignores the frames can do (it cannot know when to speak): the
    shipped checkpoints must keep detecting most events without talking over quiet frames."""
    name, model, card, measured = shipped
    assert measured.event_recall >= 0.45 and measured.false_alarm_rate <= 0.1, f"{name}: {measured.summary()}"


# The targets each shipped checkpoint reaches today: kept for real, so a retrained checkpoint cannot lose them.
MET_TARGETS = {"video-preview-tiny": ("event_recall", "false_alarm_rate", "caption_exact_match"),
               "moss-vl-tiny": ("event_recall", "false_alarm_rate")}


@pytest.mark.slow
def test_checkpoint_keeps_the_targets_it_meets(shipped):
    name, model, card, measured = shipped
    kept = [(t, value, met) for t, value, met in check_targets(measured, model.config.family)
            if t.metric in MET_TARGETS[name]]
    assert len(kept) == len(MET_TARGETS[name])
    lost = [f"{t.label} {value:.3f} (target {t.op} {t.value})" for t, value, met in kept if not met]
    assert not lost, f"{name} on {CI_CLIPS} held-out clips: {measured.summary()}"


# Checkpoints that do not reach every target yet (issue 7; their cards give the numbers). Strict: the day one
# does, its test fails until its name leaves this set.
BELOW_TARGETS = {"moss-vl-tiny"}


@pytest.mark.slow
def test_checkpoint_meets_the_benchmark_targets(shipped, request):
    name, model, card, measured = shipped
    if name in BELOW_TARGETS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{name} misses a benchmark target (issue 7)"))
    missed = [f"{t.label} {value:.3f}" for t, value, met in check_targets(measured, model.config.family) if not met]
    assert not missed, f"{name} on {CI_CLIPS} held-out clips: {measured.summary()}"


@pytest.mark.slow
def test_demo_speaks_at_the_event_frames_within_a_minute(tmp_path, capsys):
    started = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path / "demo.png")]) == 0
    elapsed = time.perf_counter() - started
    out = capsys.readouterr().out
    assert elapsed < 60, f"demo took {elapsed:.1f} s"
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    spoken = {round(float(m.group(1))) for m in re.finditer(r"^\s*([\d.]+)s\s+p\(silence\)=[\d.]+\s+speech", out, re.M)}
    _, model, _ = _load("video-preview-tiny")
    clip = make_clip(EVAL_SEEDS[0], size=model.config.vision.image_size, max_seconds=20)  # the demo's default
    events = sorted({e.frame for e in clip.events})
    assert events, "the demo clip should have events"
    missed = [f for f in events if not spoken & {f - 1, f, f + 1}]
    assert not missed, f"no speech near event frames {missed}; spoke at {sorted(spoken)}\n{out}"
