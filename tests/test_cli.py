"""The `mossvl-lab` command: the demo prints a timeline and writes its figure; stream reads any video."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mossvl_lab.cli import main


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    """A random video-preview-tiny with the toy tower, saved with a train_log asking for 2-3 s clips at 56 px."""
    import json

    import torch

    import mossvl_lab as ml
    from mossvl_lab.config import ToyConvConfig, override

    cfg = override(ml.config.preset("video-preview-tiny"),
                   {"vision": ToyConvConfig(image_size=56), "text.num_layers": 2, "text.cross_attention_layers": [1]})
    path = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    ml.save_model(ml.build_model(cfg), path)
    ml.processor_for_model(cfg).save_pretrained(path)
    log = {"train_config": {"clip_seconds": [2, 3], "frame_size": 56, "max_tokens_per_turn": 4}}
    (path / "train_log.json").write_text(json.dumps(log))
    return path


def test_demo_prints_a_timeline_and_writes_a_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--max-seconds", "8", "--seed", "1000001"]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if "p(silence)=" in line]
    assert len(lines) >= 8 and all(("silence" in line) or ("speech" in line) for line in lines)
    image = Image.open(out)
    assert image.size[0] > 400 and image.size[1] > 300
    assert np.asarray(image.convert("L")).std() > 5  # not a blank canvas


def test_stream_reads_a_video_file(tmp_path, capsys):
    from mossvl_lab.data.synthetic import make_clip, write_clip

    video = write_clip(make_clip(3, size=56, min_seconds=6, max_seconds=6), tmp_path / "clip.mp4")
    import mossvl_lab as ml

    cfg = ml.config.preset("video-preview-tiny")
    checkpoint = tmp_path / "ckpt"
    ml.save_model(ml.build_model(cfg), checkpoint)
    ml.processor_for_model(cfg).save_pretrained(checkpoint)
    out = tmp_path / "stream.png"
    assert main(["stream", str(video), "--checkpoint", str(checkpoint), "--prompt", "what moves?",
                 "--out", str(out)]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if "p(silence)=" in line]) == 6
    assert out.exists()
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["stream", str(video), "--checkpoint", str(tmp_path / "nothing")])


def test_eval_scores_a_checkpoint_and_fails_the_targets(toy_checkpoint, tmp_path, capsys):
    import json

    import torch

    from mossvl_lab.data.synthetic import EVAL_SEEDS, make_clip

    torch.set_num_threads(1)
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(toy_checkpoint), "--clips", "2", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "recall" in out and "false alarms" in out and "FAIL: not met:" in out
    data = json.loads(report.read_text())
    # the train_log's 2-3 s clips were used: exactly the frames of the first two held-out clips at that length
    frames = sum(len(make_clip(s, size=56, min_seconds=2, max_seconds=3).frames) for s in EVAL_SEEDS[:2])
    assert data["metrics"]["clips"] == 2 and data["metrics"]["frames"] == frames
    assert [t["metric"] for t in data["targets"]] == ["event_recall", "false_alarm_rate", "caption_exact_match"]
    assert data["passed"] is False and not all(t["met"] for t in data["targets"])


def test_eval_passes_when_every_target_is_met(toy_checkpoint, monkeypatch, capsys):
    from mossvl_lab.training import evaluate as evaluate_module
    from mossvl_lab.training.metrics import Metrics

    calls = []

    def perfect(model, processor, seeds, **kwargs):
        calls.append((list(seeds), kwargs))
        return Metrics(clips=len(calls[-1][0]), targets=10, recalled=10, exact=10, quiet_frames=30)

    monkeypatch.setattr(evaluate_module, "evaluate", perfect)
    assert main(["eval", "--checkpoint", str(toy_checkpoint), "--clips", "3",
                 "--cache-policy", '{"window": {"frames": 2}}']) == 0
    assert "PASS: every target met" in capsys.readouterr().out
    (seeds, kwargs), = calls
    assert seeds == [1_000_000, 1_000_001, 1_000_002] and kwargs["clip_seconds"] == (2, 3)
    assert [p.frames for p in kwargs["cache_policy"]] == [2]
    with pytest.raises(SystemExit, match="--cache-policy: unknown cache policy"):
        main(["eval", "--checkpoint", str(toy_checkpoint), "--cache-policy", '{"windw": {}}'])
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["eval", "--checkpoint", str(toy_checkpoint / "missing")])
