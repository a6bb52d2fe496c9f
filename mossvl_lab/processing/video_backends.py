"""Video backends: torchcodec (random access by index or time) and PyAV (sequential fallback) behind one reader
interface (`info`, `at_indices`, `played_at`, `decodable_end`, `close`), and the errors both raise.

Which backends exist is decided once, at import, by what imports. Both read the stream header (frame count,
average rate, duration), as the reference PyAV path does, so they pick the same frames.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


def open_reader(path: str | os.PathLike, backend: Backend | None, num_threads: int
                ) -> _TorchcodecReader | _PyAVReader:
    """The chosen (default: preferred) backend's reader of `path`, after the checks every backend shares."""
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
