"""Video decoding and frame sampling for both MOSS families.

Two backends read the file: torchcodec (preferred; random access by frame index or by time) and
PyAV (fallback; sequential decode). Which ones exist is decided once, at import, by what imports.
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
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np

try:
    from torchcodec.decoders import VideoDecoder as _TorchcodecDecoder
except Exception:  # ImportError, or OSError/RuntimeError when FFmpeg's shared libraries are missing
    _TorchcodecDecoder = None
try:
    import av
except ImportError:
    av = None

logger = logging.getLogger(__name__)

Backend = Literal["torchcodec", "pyav"]
_BACKENDS: tuple[str, ...] = tuple(
    name for name, module in (("torchcodec", _TorchcodecDecoder), ("pyav", av)) if module is not None
)
_AUTO_PROGRESS_FRAMES = 64  # decoding more frames than this shows a progress bar unless progress=False
_CHUNK = 16  # torchcodec frames per call: small enough for a live progress bar, large enough to batch seeks


class VideoError(ValueError):
    """Base class of every error this module raises on bad input."""


class VideoNotFoundError(VideoError):
    """The path does not exist or is not a regular file."""


class VideoDecodeError(VideoError):
    """The file exists but cannot be decoded (corrupt, truncated, unsupported)."""


class EmptyVideoError(VideoError):
    """The file has no frames or no duration."""


class NoVideoStreamError(VideoError):
    """The container holds no video stream (e.g. an audio-only file)."""


class SamplingError(VideoError):
    """Sampling parameters are invalid, or invalid for this video."""


class VideoWriteError(VideoError):
    """Frames passed to `write_video` cannot be encoded as given."""


def available_backends() -> list[str]:
    """Backends that imported, in order of preference."""
    return list(_BACKENDS)


def default_backend() -> str:
    if not _BACKENDS:
        raise VideoError("no video backend is installed: `pip install torchcodec==0.13.0` (needs FFmpeg) "
                         "or `pip install av`")
    return _BACKENDS[0]


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


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class _StreamInfo:
    source_fps: float
    duration: float
    total_frames: int
    begin: float  # first presentation time, seconds
    end: float  # end of the decodable range as far as the header (or torchcodec's scan) knows


def _stream_info(header_frames: int | None, fps: float | None, duration: float | None, begin: float | None,
                 end: float | None, content_duration: float | None = None) -> _StreamInfo:
    fps = float(fps or 0.0)
    duration = float(duration or content_duration or 0.0)
    if fps <= 0 or duration <= 0:
        raise EmptyVideoError(f"video stream reports fps={fps:g} and duration={duration:g}s: no playable frames")
    # spec §2.1: the smallest positive of the header count and round(duration * rate)
    counts = [c for c in (header_frames, round(duration * fps)) if c and c > 0]
    if not counts:
        raise EmptyVideoError("video stream has zero frames; the file was probably written without any")
    begin = float(begin or 0.0)
    return _StreamInfo(fps, duration, min(counts), begin, max(float(end or 0.0), begin + duration))


def _classify_open_error(path: Path, exc: Exception) -> VideoError:
    if "video stream" in str(exc).lower():
        return NoVideoStreamError(f"{path} has no video stream (audio-only or data-only file); pass a file with video")
    reason = re.sub(r"^.*?\.cpp:\d+, ", "", str(exc).splitlines()[0])  # drop torchcodec's C++ source location
    return VideoDecodeError(f"cannot open {path} as a video ({reason}); the file is corrupt, truncated or not "
                            "a video. Re-download it or re-encode it with ffmpeg")


class _TorchcodecReader:
    name = "torchcodec"

    def __init__(self, path: Path, num_threads: int) -> None:
        try:
            self._dec = _TorchcodecDecoder(str(path), dimension_order="NHWC", num_ffmpeg_threads=num_threads,
                                           seek_mode="exact")
        except Exception as exc:
            # an exact-mode scan of a stream-less file fails on seeking, before it checks for a video stream;
            # the approximate mode reports the missing stream clearly, so ask it which failure this is
            try:
                _TorchcodecDecoder(str(path), seek_mode="approximate")
            except Exception as probe:
                exc = probe if "video stream" in str(probe).lower() else exc
            raise _classify_open_error(path, exc) from exc
        m = self._dec.metadata
        self.info = _stream_info(m.num_frames_from_header or m.num_frames, m.average_fps_from_header or m.average_fps,
                                 m.duration_seconds_from_header, m.begin_stream_seconds, m.end_stream_seconds,
                                 m.duration_seconds)

    def _chunks(self, fetch: Callable, keys: list) -> Iterator[tuple[float, np.ndarray]]:
        for lo in range(0, len(keys), _CHUNK):
            try:
                batch = fetch(keys[lo:lo + _CHUNK])
            except (RuntimeError, IndexError, ValueError):
                # find the first frame that fails; everything from there on counts as missing
                for key in keys[lo:lo + _CHUNK]:
                    try:
                        batch = fetch([key])
                    except (RuntimeError, IndexError, ValueError):
                        return
                    yield float(batch.pts_seconds[0]), batch.data[0].numpy()
                return
            for pts, frame in zip(batch.pts_seconds.tolist(), batch.data.numpy()):
                yield pts, frame

    def at_indices(self, indices: list[int]) -> Iterator[tuple[float, np.ndarray]]:
        return self._chunks(self._dec.get_frames_at, indices)

    def played_at(self, times: list[float]) -> Iterator[tuple[float, np.ndarray]]:
        return self._chunks(self._dec.get_frames_played_at, times)

    def decodable_end(self) -> float:
        return self.info.end  # exact mode already scanned every packet

    def close(self) -> None:
        self._dec = None


class _PyAVReader:
    name = "pyav"

    def __init__(self, path: Path, num_threads: int) -> None:
        try:
            self._container = av.open(str(path))
        except av.error.FFmpegError as exc:
            raise _classify_open_error(path, exc) from exc
        if not self._container.streams.video:
            self._container.close()
            raise _classify_open_error(path, ValueError("no video stream"))
        stream = self._stream = self._container.streams.video[0]
        stream.thread_type = "AUTO" if num_threads != 1 else "SLICE"
        stream.codec_context.thread_count = num_threads
        tb = stream.time_base
        duration = (stream.duration * tb) if stream.duration else (self._container.duration or 0) / av.time_base
        begin = stream.start_time * tb if stream.start_time is not None else 0.0
        end = begin + (self._container.duration or 0) / av.time_base
        self.info = _stream_info(stream.frames, stream.average_rate or stream.guessed_rate, duration, begin, end)

    def decodable_end(self) -> float:
        # headers can understate the end (B-frames reorder a variable-rate stream); reading the packets
        # without decoding them finds it, as torchcodec's exact scan does at open
        end = self.info.end
        try:
            for packet in self._container.demux(self._stream):
                if packet.pts is not None:
                    end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
        except av.error.FFmpegError:
            pass  # a damaged tail: the packets read so far bound the range
        return end

    def _decoded(self) -> Iterator[av.VideoFrame]:
        try:
            yield from self._container.decode(self._stream)
        except av.error.FFmpegError as exc:  # a damaged packet ends decoding; later frames count as missing
            logger.warning("decoding stopped early: %s", exc)

    def at_indices(self, indices: list[int]) -> Iterator[tuple[float, np.ndarray]]:
        wanted, last = set(indices), max(indices)  # sequential decode: PyAV cannot address frames by index
        for i, frame in enumerate(self._decoded()):
            if i in wanted:
                yield float(frame.time), frame.to_ndarray(format="rgb24")
            if i >= last:
                return

    def played_at(self, times: list[float]) -> Iterator[tuple[float, np.ndarray]]:
        # the frame played at t is the last one whose presentation time is <= t; times arrive sorted
        self._container.seek(int(times[0] / self._stream.time_base), stream=self._stream, backward=True)
        j, prev = 0, None
        for frame in self._decoded():
            while j < len(times) and times[j] < frame.time and prev is not None:
                yield float(prev.time), prev.to_ndarray(format="rgb24")
                j += 1
            if j == len(times):
                return
            prev = frame
        while prev is not None and j < len(times):  # times past the last frame's start
            yield float(prev.time), prev.to_ndarray(format="rgb24")
            j += 1

    def close(self) -> None:
        self._container.close()


def _open(path: str | os.PathLike, backend: Backend | None, num_threads: int) -> _TorchcodecReader | _PyAVReader:
    path = Path(path)
    if not path.exists():
        raise VideoNotFoundError(f"video file not found: {path} (resolved to {path.resolve()}); check the path")
    if path.is_dir():
        raise VideoNotFoundError(f"{path} is a directory, not a video file; pass the path of a file inside it")
    if path.stat().st_size == 0:
        raise EmptyVideoError(f"{path} is empty (0 bytes); the write or download was probably interrupted")
    backend = backend or default_backend()
    if backend not in _BACKENDS:
        raise VideoError(f"video backend {backend!r} is not available; available: {available_backends()}")
    return (_TorchcodecReader if backend == "torchcodec" else _PyAVReader)(path, num_threads)


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
    reader = _open(path, backend, num_threads)
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
    reader = _open(path, backend, num_threads)
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
