"""Video decoding and frame sampling for both MOSS families.

Two backends read the file (`video_backends`): torchcodec (preferred; random access by frame index or by
time) and PyAV (fallback; sequential decode). Which ones exist is decided once, at import, by what imports.
Sampling is a pure function (`sample_indices`) so the families' rules are testable without a file:

    video_preview  MOSS-Video-Preview (spec moss-video-preview §2.1): fixed-rate frames at
                   0, 1/fps, 2/fps, ... while the clip fits the frame budget, else uniform.
    moss_vl        MOSS-VL (spec moss-vl §2.2): always uniform over the clip, `min_frames..max_frames`.

Both backends read the stream header (frame count, average rate, duration), as the reference
PyAV path does, so they pick the same frames; a file whose data ends before its header says
(an interrupted download) then shows up as missing tail frames and raises `VideoDecodeError`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np

from .video_backends import (Backend, EmptyVideoError, NoVideoStreamError, SamplingError, VideoDecodeError,
                             VideoError, VideoNotFoundError, VideoWriteError, av, available_backends,
                             default_backend, open_reader)

__all__ = ["Backend", "DecodedVideo", "EmptyVideoError", "NoVideoStreamError", "SamplingError", "VideoDecodeError",
           "VideoError", "VideoNotFoundError", "VideoSampling", "VideoWriteError", "available_backends",
           "decode_segments", "decode_video", "default_backend", "sample_indices", "segment_times", "write_video"]

logger = logging.getLogger(__name__)

_AUTO_PROGRESS_FRAMES = 64  # decoding more frames than this shows a progress bar unless progress=False


@dataclass(frozen=True, kw_only=True)
class VideoSampling:
    """Which frames to take from a clip; `rule` picks the family's formula (see module docstring)."""

    fps: float = 1.0
    min_frames: int
    max_frames: int
    rule: Literal["video_preview", "moss_vl"]

    def __post_init__(self) -> None:
        if self.rule not in ("video_preview", "moss_vl"):
            raise SamplingError(f"rule must be 'video_preview' or 'moss_vl', got {self.rule!r}")
        if not (isinstance(self.fps, numbers.Real) and math.isfinite(self.fps) and self.fps > 0):
            raise SamplingError(f"fps must be a positive number of frames per second, got {self.fps!r}")
        if not (isinstance(self.min_frames, int) and self.min_frames >= 1):
            raise SamplingError(f"min_frames (video_minlen) must be an int >= 1, got {self.min_frames!r}")
        if not (isinstance(self.max_frames, int) and self.max_frames >= self.min_frames):
            raise SamplingError(f"max_frames (video_maxlen) must be an int >= min_frames={self.min_frames}, "
                                f"got {self.max_frames!r}")

    @classmethod
    def video_preview(cls, video_fps: float = 1.0, video_minlen: int = 8, video_maxlen: int = 256) -> VideoSampling:
        """MOSS-Video-Preview media kwargs (spec §7); defaults are the inference scripts'."""
        return cls(fps=video_fps, min_frames=video_minlen, max_frames=video_maxlen, rule="video_preview")

    @classmethod
    def moss_vl(cls, video_fps: float = 1.0, min_frames: int = 1, max_frames: int = 256) -> VideoSampling:
        """MOSS-VL video processor parameters (spec §2.2); defaults are the class defaults."""
        return cls(fps=video_fps, min_frames=min_frames, max_frames=max_frames, rule="moss_vl")


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames of one clip.

    `timestamps` are the decoded frames' presentation times read from the container (seconds).
    `sample_times` are the times the family's processor writes into the prompt: index / source_fps
    for index sampling, the requested times for segments. They agree on constant-rate clips.
    """

    frames: np.ndarray  # [frame, height, width, 3] uint8 RGB
    timestamps: tuple[float, ...]
    source_fps: float
    duration: float  # seconds, from the stream header
    total_frames: int  # frame count the sampling rule saw (spec §2.1 step 1)
    backend: str
    sample_times: tuple[float, ...] = ()
    indices: tuple[int, ...] = ()  # frame indices decoded (index sampling); () for time-based segments


def sample_indices(total_frames: int, source_fps: float, duration: float, sampling: VideoSampling) -> list[int]:
    """Frame indices the family's rule decodes from a clip of `total_frames` frames and `duration` s."""
    if total_frames <= 0 or duration <= 0 or source_fps <= 0:
        raise EmptyVideoError(f"video has total_frames={total_frames}, duration={duration}s, fps={source_fps}: "
                              "nothing to sample; check the file plays, or re-encode it with ffmpeg")
    target = math.ceil(duration * sampling.fps - 1e-6)
    if sampling.rule == "video_preview":
        if sampling.fps > source_fps * (1 + 1e-9):
            raise SamplingError(f"video_fps={sampling.fps} exceeds the source frame rate {source_fps:g}; "
                                f"pass video_fps <= {source_fps:g} (MOSS-Video-Preview asserts this)")
        n = min(max(target, sampling.min_frames), sampling.max_frames, total_frames)
        if n == target:  # the clip fits the budget: frames at t = k / fps
            # min() only guards headers whose duration * rate overstates the frame count
            return [min(math.floor(k * source_fps / sampling.fps), total_frames - 1) for k in range(n)]
        return np.linspace(0, total_frames - 1, n).astype(int).tolist()
    n = min(max(target, sampling.min_frames), sampling.max_frames, total_frames)
    return np.unique(np.linspace(0, total_frames - 1, n).astype(np.int32)).tolist()


def segment_times(start: float, end: float, fps: float) -> list[float]:
    """Times sampled from `[start, end)` at `fps` (MOSS-VL segments): linspace without the end point."""
    if not end > start:
        raise SamplingError(f"segment [start, end) needs end > start, got [{start}, {end}]")
    # the 1e-6 keeps float noise ((3.3 - 1.3) * 2 = 4.000000000000001) from adding a frame, as in §2.2 step 2
    n = max(1, math.ceil((end - start) * fps - 1e-6))
    return np.linspace(start, end, n, endpoint=False).tolist()


def _collect(frames: Iterator[tuple[float, np.ndarray]], n: int, what: str, progress: bool | None
             ) -> tuple[np.ndarray, list[float]]:
    """Gather up to `n` frames into one preallocated array; drop a failing tail as the spec allows."""
    show = progress if progress is not None else n > _AUTO_PROGRESS_FRAMES
    bar = None
    if show:  # even a disabled tqdm bar starts tqdm's monitor thread, so build one only when shown
        from tqdm import tqdm
        bar = tqdm(total=n, desc=f"decoding {what}", unit="frame")
    out, pts = None, []
    try:
        for t, frame in frames:
            if out is None:  # one allocation: stacking a list would hold every frame twice
                out = np.empty((n, *frame.shape), dtype=np.uint8)
            out[len(pts)] = frame
            pts.append(t)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    missing = n - len(pts)
    # spec §2.1 step 4: a few undecodable tail frames are dropped; more than 2 and >10 % is an error
    if not pts or (missing > 2 and missing > 0.1 * n):
        raise VideoDecodeError(f"only {len(pts)} of {n} sampled frames of {what} could be decoded; the file is "
                               "truncated or damaged (its header promises more frames than it holds). "
                               "Re-download or re-encode it")
    if missing:
        logger.warning("dropped %d undecodable tail frame(s) of %s", missing, what)
    return out[: len(pts)], pts


def decode_video(path: str | os.PathLike, sampling: VideoSampling, *, backend: Backend | None = None,
                 num_threads: int = 1, progress: bool | None = None) -> DecodedVideo:
    """Decode the frames `sampling` picks (and only those).

    `num_threads` goes to FFmpeg's decoder (0 = let FFmpeg choose). `progress`: True/False forces
    a tqdm bar on/off; None shows one when more than 64 frames are decoded.
    """
    reader = open_reader(path, backend, num_threads)
    try:
        info = reader.info
        indices = sample_indices(info.total_frames, info.source_fps, info.duration, sampling)
        frames, pts = _collect(reader.at_indices(indices), len(indices), Path(path).name, progress)
    finally:
        reader.close()
    kept = indices[: len(pts)]
    return DecodedVideo(frames, tuple(pts), info.source_fps, info.duration, info.total_frames, reader.name,
                        sample_times=tuple(i / info.source_fps for i in kept), indices=tuple(kept))


def decode_segments(path: str | os.PathLike, segments: list[list[float]], fps: float = 1.0, *,
                    backend: Backend | None = None, num_threads: int = 1, progress: bool | None = None
                    ) -> list[DecodedVideo]:
    """MOSS-VL segment input: one `DecodedVideo` per segment (each is its own video item).

    `[start, end]` samples `[start, end)` at `fps`; `[t]` takes the single frame played at t.
    Times are clamped into the decodable range `[begin, end)`.
    """
    if not (math.isfinite(fps) and fps > 0):
        raise SamplingError(f"fps must be positive, got {fps!r}")
    reader = open_reader(path, backend, num_threads)
    try:
        info = reader.info
        lo, hi = info.begin, reader.decodable_end() - 1e-6
        out = []
        for seg in segments:
            if len(seg) == 1:
                times = [float(seg[0])]
            elif len(seg) == 2:
                times = segment_times(float(seg[0]), float(seg[1]), fps)
            else:
                raise SamplingError(f"a segment is [start, end] or [t], got {seg!r}")
            times = [min(max(t, lo), hi) for t in times]
            frames, pts = _collect(reader.played_at(times), len(times), f"{Path(path).name} {seg}", progress)
            out.append(DecodedVideo(frames, tuple(pts), info.source_fps, info.duration, info.total_frames,
                                    reader.name, sample_times=tuple(times[: len(pts)])))
    finally:
        reader.close()
    return out


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: float) -> Path:
    """Encode `frames` [frame, height, width, 3] uint8 RGB as H.264 (yuv420p) in an mp4; returns the path."""
    if av is None:
        raise VideoWriteError("write_video needs PyAV: `pip install av`")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise VideoWriteError(f"frames must be a non-empty uint8 array [frame, height, width, 3], "
                              f"got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        # yuv420p stores chroma at half resolution, so H.264 rejects odd sizes
        raise VideoWriteError(f"height and width must be even for yuv420p, got {height}x{width}; crop or pad a pixel")
    if not (math.isfinite(fps) and fps > 0):
        raise VideoWriteError(f"fps must be positive, got {fps!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        # a float rate becomes the nearest fraction with denominator <= 1001, so 30000/1001 (NTSC) round-trips
        # crf 18 is near-lossless: synthetic targets (colours, positions) must survive the round trip
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
