"""Stream adapters (viz.stream_data): clips, encoded frames, collapsed transcripts; and the widgets' import cost."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mossvl_lab.data.synthetic import make_clip
from mossvl_lab.streaming.events import Decision, RoundEnd, RoundStart, TextDelta
from mossvl_lab.viz.stream_data import (ClipFormatError, EmptyClipError, TranscriptBuilder, clip_frames, data_url,
                                        encode_image)

ROOT = Path(__file__).resolve().parents[2]
SILENCE = 7


def _decision(token: int) -> Decision:
    return Decision(step=0, token=token, p_silence=0.5, logits_topk=())


def test_a_synthetic_clip_keeps_frames_timestamps_and_its_question_as_a_prompt():
    clip = make_clip(3, size=56, max_seconds=9)
    frames = clip_frames(clip)
    assert len(frames) == len(clip.frames)
    assert frames.timestamps == list(clip.timestamps)
    assert all(np.array_equal(a, b) for a, b in zip(frames.frames, clip.frames))
    assert frames.prompts == {clip.question.asked_at: clip.question.text}


def test_pairs_are_accepted_and_bad_clips_get_named_errors():
    frame = np.zeros((8, 8, 3), np.uint8)
    assert clip_frames([(frame, 0.0), (frame, 0.5)]).timestamps == [0.0, 0.5]
    with pytest.raises(EmptyClipError, match="no frames"):
        clip_frames([])
    with pytest.raises(ClipFormatError, match="backwards"):
        clip_frames([(frame, 1.0), (frame, 0.5)])
    with pytest.raises(ClipFormatError, match="item 0"):
        clip_frames([frame])
    with pytest.raises(ClipFormatError, match="item 1"):
        clip_frames([(frame, 0.0), (np.zeros((8, 8)), 1.0)])
    with pytest.raises(ClipFormatError, match="Clip"):
        clip_frames("clip.mp4")


def test_png_is_lossless_and_jpeg_decodes_to_the_same_size():
    frame = make_clip(0, size=56).frames[2]
    png = encode_image(frame)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), frame)
    jpeg = encode_image(frame, "jpeg", max_side=28)
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    assert Image.open(io.BytesIO(jpeg)).size == (28, 28)
    assert data_url(png).startswith("data:image/png;base64,iVBOR")


def test_transcript_text_is_the_deltas_and_the_display_collapses_silence_runs():
    builder = TranscriptBuilder(SILENCE)
    builder.add([_decision(SILENCE)] * 3)
    builder.add([_decision(40), RoundStart(step=4), TextDelta(" the red"), _decision(41), TextDelta(" square ")])
    builder.add([_decision(SILENCE), RoundEnd(step=6)])
    builder.add([_decision(SILENCE)] * 6 + [_decision(42), TextDelta("gone")])
    assert builder.text == " the red square gone"
    assert builder.display() == "⋯ ×3 the red square ⋯ ×7 gone"


def test_importing_the_widgets_does_not_import_torch():
    code = (f"import importlib.util, sys; root = {str(ROOT)!r}; sys.path.insert(0, root); "
            "spec = importlib.util.spec_from_file_location('mossvl_lab.widgets', root + '/widgets/__init__.py', "
            "submodule_search_locations=[root + '/widgets']); m = importlib.util.module_from_spec(spec); "
            "sys.modules['mossvl_lab.widgets'] = m; spec.loader.exec_module(m); "
            "[getattr(m, n) for n in m.__all__]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
