"""Frame sampling rules (spec moss-video-preview §2.1, moss-vl §2.2), both decoders, segments, named errors.

Test clips are 64x48 H.264 written by `write_video`; frame i is a flat grey of level 6*i, so a decoded
frame tells which source frame it is (H.264 at crf 18 keeps a flat grey within a level or two).
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from media import write_audio_only

from mossvl_lab.processing import video as V

BACKENDS = ["torchcodec", "pyav"]
GREY_STEP = 6


def _needs(backend: str) -> None:
    if backend not in V.available_backends():
        pytest.skip(f"{backend} is not installed")


def _clip(n_frames: int) -> np.ndarray:
    frames = np.empty((n_frames, 48, 64, 3), dtype=np.uint8)
    for i in range(n_frames):
        frames[i] = (GREY_STEP * i) % 256  # unique for the first 43 frames
    return frames


def _source_index(frame: np.ndarray) -> int:
    return round(float(frame.mean()) / GREY_STEP)


@pytest.fixture(scope="module")
def clip_10s(tmp_path_factory):
    """10 s at 4 fps: 40 frames, frame i shown at t = i / 4."""
    return V.write_video(_clip(40), tmp_path_factory.mktemp("video") / "clip.mp4", fps=4.0)


# --------------------------------------------------------------------------- pure sampling rules


def test_video_preview_fixed_rate_when_clip_fits():
    # target = ceil(10 * 1) = 10 = n -> frames at t = k s: floor(k * 4 / 1)
    assert V.sample_indices(40, 4.0, 10.0, V.VideoSampling.video_preview()) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    # non-integer ratio 30 / 4 = 7.5: floor(7.5 k)
    assert V.sample_indices(300, 30.0, 10.0, V.VideoSampling.video_preview(4.0))[:6] == [0, 7, 15, 22, 30, 37]


def test_video_preview_switches_to_uniform_over_budget():
    # target 10 > maxlen 6 -> n = 6, linspace(0, 39, 6) = 0, 7.8, 15.6, 23.4, 31.2, 39 -> truncated
    sampling = V.VideoSampling.video_preview(video_minlen=1, video_maxlen=6)
    assert V.sample_indices(40, 4.0, 10.0, sampling) == [0, 7, 15, 23, 31, 39]
    # minlen above the target also leaves fixed-rate: target 5, n = 8, linspace(0, 39, 8)
    sampling = V.VideoSampling.video_preview(video_fps=0.5, video_minlen=8)
    assert V.sample_indices(40, 4.0, 10.0, sampling) == [0, 5, 11, 16, 22, 27, 33, 39]


def test_ceil_ignores_float_noise_in_duration():
    # 10.0000001 s at 1 fps is 10 frames, not 11 (the -1e-6 in the spec's ceil)
    assert len(V.sample_indices(40, 4.0, 10.0000001, V.VideoSampling.video_preview())) == 10


def test_video_preview_rejects_fps_above_source():
    with pytest.raises(V.SamplingError, match="video_fps=8"):
        V.sample_indices(40, 4.0, 10.0, V.VideoSampling.video_preview(8.0))


def test_moss_vl_is_uniform_and_clamped():
    sampling = V.VideoSampling.moss_vl()
    # linspace(0, 39, 10) = 0, 4.33, 8.67, 13, 17.33, 21.67, 26, 30.33, 34.67, 39
    assert V.sample_indices(40, 4.0, 10.0, sampling) == [0, 4, 8, 13, 17, 21, 26, 30, 34, 39]
    assert V.sample_indices(40, 4.0, 10.0, V.VideoSampling.moss_vl(max_frames=3)) == [0, 19, 39]
    # min_frames and fps above the source are both capped by the frames that exist
    assert V.sample_indices(40, 4.0, 10.0, V.VideoSampling.moss_vl(min_frames=100, max_frames=200)) == list(range(40))
    assert V.sample_indices(40, 4.0, 10.0, V.VideoSampling.moss_vl(video_fps=8.0)) == list(range(40))


@pytest.mark.parametrize("kwargs", [
    dict(fps=0.0, min_frames=1, max_frames=4, rule="moss_vl"),
    dict(fps=float("nan"), min_frames=1, max_frames=4, rule="moss_vl"),
    dict(fps=1.0, min_frames=0, max_frames=4, rule="moss_vl"),
    dict(fps=1.0, min_frames=8, max_frames=4, rule="video_preview"),
    dict(fps=1.0, min_frames=1, max_frames=4, rule="qwen"),
])
def test_bad_sampling_is_a_named_error(kwargs):
    with pytest.raises(V.SamplingError) as info:
        V.VideoSampling(**kwargs)
    assert isinstance(info.value, V.VideoError) and isinstance(info.value, ValueError)


def test_empty_stream_cannot_be_sampled():
    with pytest.raises(V.EmptyVideoError):
        V.sample_indices(0, 4.0, 0.0, V.VideoSampling.moss_vl())


def test_segment_times():
    assert V.segment_times(1.0, 3.0, 2.0) == [1.0, 1.5, 2.0, 2.5]
    assert V.segment_times(1.3, 3.3, 2.0) == pytest.approx([1.3, 1.8, 2.3, 2.8])  # 2.0000000000000004 s
    assert V.segment_times(0.0, 0.1, 1.0) == [0.0]  # at least one frame
    with pytest.raises(V.SamplingError):
        V.segment_times(3.0, 3.0, 1.0)


# --------------------------------------------------------------------------- decoding


def test_backends_detected(clip_10s):
    assert V.available_backends() and set(V.available_backends()) <= {"torchcodec", "pyav"}
    assert V.default_backend() == V.available_backends()[0]
    with pytest.raises(V.VideoError, match="not available"):
        V.decode_video(clip_10s, V.VideoSampling.moss_vl(), backend="opencv")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_10s_clip_at_1fps(clip_10s, backend):
    _needs(backend)
    out = V.decode_video(clip_10s, V.VideoSampling.video_preview(), backend=backend)
    assert out.backend == backend
    assert out.frames.shape == (10, 48, 64, 3) and out.frames.dtype == np.uint8
    assert out.timestamps == pytest.approx([float(t) for t in range(10)])
    assert out.sample_times == pytest.approx(out.timestamps)
    assert out.indices == (0, 4, 8, 12, 16, 20, 24, 28, 32, 36)
    assert [_source_index(f) for f in out.frames] == list(out.indices)
    assert (out.source_fps, out.duration, out.total_frames) == (pytest.approx(4.0), pytest.approx(10.0), 40)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_uniform_when_over_budget(clip_10s, backend):
    _needs(backend)
    out = V.decode_video(clip_10s, V.VideoSampling.video_preview(video_minlen=1, video_maxlen=6), backend=backend)
    assert out.indices == (0, 7, 15, 23, 31, 39)
    assert [_source_index(f) for f in out.frames] == [0, 7, 15, 23, 31, 39]
    assert out.timestamps == pytest.approx([i / 4 for i in (0, 7, 15, 23, 31, 39)])


def test_backends_agree(clip_10s):
    for b in BACKENDS:
        _needs(b)
    a, b = (V.decode_video(clip_10s, V.VideoSampling.moss_vl(), backend=name, num_threads=2) for name in BACKENDS)
    assert a.indices == b.indices and a.timestamps == pytest.approx(b.timestamps)
    # two FFmpeg builds (system vs PyAV's) may convert YUV -> RGB with different rounding
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_rate_timestamps_come_from_container(tmp_path, backend):
    _needs(backend)
    pts_ms = [0, 100, 500, 600, 2000, 2100, 3000, 3900]  # irregular: index / fps would be wrong
    with av.open(str(tmp_path / "vfr.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for i, pts in enumerate(pts_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), GREY_STEP * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            c.mux(s.encode(frame))
        c.mux(s.encode())
    out = V.decode_video(tmp_path / "vfr.mp4", V.VideoSampling.moss_vl(min_frames=8, max_frames=8), backend=backend)
    assert out.indices == tuple(range(8)) and [_source_index(f) for f in out.frames] == list(range(8))
    assert out.timestamps == pytest.approx([p / 1000 for p in pts_ms])
    # B-frames make this stream's header duration 2.7 s; frames up to 3.9 s must still be reachable
    shown = V.decode_segments(tmp_path / "vfr.mp4", [[0.55], [2.05], [3.5]], backend=backend)
    assert [seg.timestamps for seg in shown] == [(0.5,), (2.0,), (3.0,)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_segments(clip_10s, backend):
    _needs(backend)
    span, point, late, early = V.decode_segments(clip_10s, [[1.0, 3.0], [2.6], [20.0], [-1.0]], fps=2.0,
                                                 backend=backend)
    assert span.timestamps == pytest.approx([1.0, 1.5, 2.0, 2.5]) and span.sample_times == span.timestamps
    assert [_source_index(f) for f in span.frames] == [4, 6, 8, 10]
    assert point.timestamps == pytest.approx([2.5]) and point.sample_times == (2.6,)  # frame shown at 2.6 s
    assert _source_index(point.frames[0]) == 10
    assert late.timestamps == pytest.approx([9.75]) and late.sample_times == pytest.approx([10.0])  # clamped
    assert early.timestamps == (0.0,) and early.sample_times == (0.0,)
    with pytest.raises(V.SamplingError):
        V.decode_segments(clip_10s, [[1.0, 2.0, 3.0]], backend=backend)


def test_progress_bar(clip_10s, tmp_path, capsys):
    V.decode_video(clip_10s, V.VideoSampling.moss_vl(), progress=True)
    assert "decoding clip.mp4" in capsys.readouterr().err
    V.decode_video(clip_10s, V.VideoSampling.moss_vl())  # 10 frames: no bar by default
    assert "decoding" not in capsys.readouterr().err
    long = V.write_video(_clip(70), tmp_path / "long.mp4", fps=10.0)
    assert len(V.decode_video(long, V.VideoSampling.moss_vl(video_fps=10.0)).frames) == 70
    assert "70/70" in capsys.readouterr().err  # more than 64 frames: a bar by default
    V.decode_video(long, V.VideoSampling.moss_vl(video_fps=10.0), progress=False)
    assert "decoding" not in capsys.readouterr().err


def test_write_video_keeps_ntsc_rate(tmp_path):
    path = V.write_video(_clip(6), tmp_path / "ntsc.mp4", fps=30000 / 1001)
    out = V.decode_video(path, V.VideoSampling.moss_vl(video_fps=30.0))
    assert out.source_fps == pytest.approx(30000 / 1001)
    assert out.timestamps == pytest.approx([i * 1001 / 30000 for i in range(6)], abs=1e-4)


@pytest.mark.parametrize("frames", [np.zeros((2, 47, 64, 3), np.uint8), np.zeros((2, 48, 64, 3), np.float32),
                                    np.zeros((0, 48, 64, 3), np.uint8), np.zeros((2, 48, 64), np.uint8)])
def test_write_video_rejects_bad_frames(tmp_path, frames):
    with pytest.raises(V.VideoWriteError):
        V.write_video(frames, tmp_path / "bad.mp4", fps=4.0)


# --------------------------------------------------------------------------- named errors


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, clip_10s):
    root = tmp_path_factory.mktemp("bad")
    data = clip_10s.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov atom at the end is lost
    # moov up front (faststart) and the data cut: the header promises 40 frames, about 20 remain
    with av.open(str(root / "faststart.mp4"), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for f in np.random.default_rng(0).integers(0, 256, (40, 48, 64, 3), dtype=np.uint8):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    data = (root / "faststart.mp4").read_bytes()
    (root / "cut_faststart.mp4").write_bytes(data[: len(data) // 2])
    (root / "empty.mp4").write_bytes(b"")
    write_audio_only(root / "tone.m4a")  # no video stream
    (root / "folder.mp4").mkdir()
    return root


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, error, words", [
    ("missing.mp4", V.VideoNotFoundError, "not found"),
    ("folder.mp4", V.VideoNotFoundError, "is a directory"),
    ("empty.mp4", V.EmptyVideoError, "0 bytes"),
    ("tone.m4a", V.NoVideoStreamError, "no video stream"),
    ("truncated.mp4", V.VideoDecodeError, "corrupt, truncated"),
    ("cut_faststart.mp4", V.VideoDecodeError, "truncated or damaged"),
])
def test_named_errors(bad_files, backend, name, error, words):
    _needs(backend)
    with pytest.raises(error, match=words) as info:
        V.decode_video(bad_files / name, V.VideoSampling.video_preview(), backend=backend)
    assert isinstance(info.value, V.VideoError)
    assert str(bad_files / name) in str(info.value) or name in str(info.value)


def test_fps_above_source_raises_for_file(clip_10s):
    with pytest.raises(V.SamplingError, match="<= 4"):
        V.decode_video(clip_10s, V.VideoSampling.video_preview(video_fps=5.0))
    assert len(V.decode_video(clip_10s, V.VideoSampling.moss_vl(video_fps=5.0)).frames) == 40  # moss_vl allows it
