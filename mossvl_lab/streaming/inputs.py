"""Checking frames pushed into a session: shape, dtype and finite pixels, with named errors."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from PIL import Image


class FrameInputError(ValueError):
    """A pushed frame is unusable; the message says what shape/type is expected."""


def check_frame(image: Any) -> Image.Image:
    """PIL image, HxWx3 array (uint8, or float in [0, 1]) or encoded bytes (JPEG/PNG) -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        from ..processing.image import load_image
        try:
            return load_image(bytes(image))
        except Exception as exc:  # decoder errors of any kind: the bytes are not an image
            raise FrameInputError(f"frame bytes could not be decoded as an image ({exc})") from exc
    array = np.asarray(getattr(image, "numpy", lambda: image)())
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise FrameInputError(f"a frame must be an RGB image or an array of shape [height, width, 3]; got "
                              f"shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number):
            raise FrameInputError(f"frame array dtype {array.dtype} is not numeric")
        if not np.isfinite(array).all():
            raise FrameInputError("frame contains NaN or infinite pixels")
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array, "RGB")


class FrameTimestampError(ValueError):
    """Frame timestamps are seconds from the stream start: finite, >= 0 and never going backwards."""


def check_timestamp(timestamp: Any) -> float:
    if isinstance(timestamp, bool) or not isinstance(timestamp, numbers.Real):
        raise FrameTimestampError(f"a frame timestamp must be a number of seconds from the stream start, got "
                                  f"{timestamp!r}")
    value = float(timestamp)
    if not math.isfinite(value) or value < 0:
        raise FrameTimestampError(f"frame timestamp {value} must be finite and >= 0 (seconds from the stream start)")
    return value
