"""The `mossvl-lab` command: the demo prints a timeline and writes its figure; stream reads any video."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mossvl_lab.cli import main


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
