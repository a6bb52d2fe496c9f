"""MOSS-VL processor on a real decoded clip: documented token string, tensors and presentation timestamps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.processing.image import AspectRatioError, smart_resize
from mossvl_lab.processing.video import VideoSampling, decode_video, write_video


def _clip(tmp_path, seconds=4, fps=2.0, size=(48, 64)):
    frames = np.zeros((int(seconds * fps), *size, 3), dtype=np.uint8)
    for i in range(len(frames)):
        frames[i, :, (i * 5) % size[1]:(i * 5) % size[1] + 8] = (200, 60, 30)
    return write_video(frames, tmp_path / "clip.mp4", fps=fps)


def test_processor_turns_a_decoded_video_into_the_documented_tokens_and_tensors(tmp_path):
    path = _clip(tmp_path)
    cfg = ml.config.preset("moss-vl-tiny")
    processor = ml.processor_for_model(cfg)
    out = processor("<|video|>What moves?", videos=[str(path)], video_fps=1.0)
    decoded = decode_video(path, VideoSampling.moss_vl(video_fps=1.0))  # independent decode, same sampling
    stamps = [float(t) for t in decoded.timestamps]
    # spec moss-vl §2.2: n = ceil(4 s x 1 fps) = 4 frames at unique(int(linspace(0, 7, 4))) of a 2 fps clip
    assert stamps == [i / 2.0 for i in np.unique(np.linspace(0, 7, 4).astype(np.int32))] == [0.0, 1.0, 2.0, 3.5]
    expected = "<|vision_start|>" + "".join(
        f"<|time_start|>{t:.1f} seconds<|time_end|><|image_pad|>" for t in stamps) + "<|vision_end|>What moves?"
    assert processor.decode(out["input_ids"][0], skip_special_tokens=False) == expected
    assert out["frame_timestamps"] == stamps
    factor = cfg.vision.merge_factor
    grid = out["grid_thw"].tolist()
    assert len(grid) == 1 and grid[0][0] == 4  # one video of 4 frames, t = #frames
    h, w = grid[0][1] * cfg.vision.patch_size, grid[0][2] * cfg.vision.patch_size
    assert h % factor == 0 and w % factor == 0
    assert tuple(out["pixel_values"].shape) == (4 * grid[0][1] * grid[0][2], cfg.vision.patch_dim)
    mask = out["cross_attention_mask"]  # [batch, 1, text_pos, frame], True = masked
    pads = (out["input_ids"][0] == cfg.tokens.image_token_id).nonzero().flatten()
    expected_visible = torch.arange(out["input_ids"].shape[1])[:, None] >= pads[None, :]
    assert torch.equal(~mask[0, 0], expected_visible)
    with torch.no_grad():  # and the model takes it as is
        model = ml.build_model(cfg).eval()
        logits = model(**{k: v for k, v in out.items() if k != "frame_timestamps"}).logits
    assert logits.shape[1] == out["input_ids"].shape[1]


def test_aspect_ratio_over_200_is_a_named_error():
    with pytest.raises(AspectRatioError, match="200"):
        smart_resize(32, 32 * 250)
