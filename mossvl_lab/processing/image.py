"""Images in, pixel tensors out, for both families.

    load_image            any path / PIL image / array -> RGB PIL image (EXIF-rotated, alpha on white)
    mllama_preprocess     MOSS-Video-Preview and Mllama: tiles of 560x560, CLIP-normalised (spec v-p §2.2)
    smart_resize          MOSS-VL: sides rounded to multiples of 32 within a pixel budget (spec moss-vl §2.2)
    moss_patchify(_frames) MOSS-VL: flat 16x16 patches in 2x2 merge-window order, plus grid (t, h, w)
    blank_moss_image      MOSS-VL: the all-zero placeholder a text-only sample still carries

Resampling follows what each family's reference processor ran: Mllama, transformers' PIL processor
(PIL bilinear on uint8); MOSS-VL, the torchvision "fast" processor, whose CPU path is torch's native
uint8 antialiased bicubic (PIL's algorithm; within one grey level of PIL BICUBIC).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = str | os.PathLike | bytes | Image.Image | np.ndarray

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WIDE_INT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """Base class of every error this module raises on bad input."""


class ImageLoadError(ImageError):
    """The image is missing, unreadable, or of a kind we cannot turn into RGB."""


class ImageTooLargeError(ImageLoadError):
    """The image exceeds PIL's decompression-bomb limit."""


class AspectRatioError(ImageError):
    """The image is too elongated for MOSS-VL's smart_resize (long / short side > 200)."""


# --------------------------------------------------------------------------- loading


def load_image(x: ImageLike, *, max_pixels: int | None = None) -> Image.Image:
    """Load `x` (a path, encoded bytes such as a webcam JPEG, a PIL image or an array) as an RGB PIL
    image with its EXIF orientation applied.

    Transparency is composited on white, as transformers' `convert_to_rgb` does, so both families'
    references see the same pixels (and a transparent logo stays dark-on-light). 16-bit images are
    scaled (v / 257, so 65535 -> 255), never clipped.

    Large images: PIL warns above ~89 MP; we silence that warning (a 100 MP photo is legitimate and
    decodes to exactly its own size), and turn PIL's hard limit (~179 MP) into `ImageTooLargeError`.
    `max_pixels` bounds the returned size (aspect kept, box-filtered down). JPEGs are first decoded
    straight at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling), so the full image never exists in memory;
    other formats are decoded in full first. It changes pixel values: leave it None for parity.
    """
    if isinstance(x, np.ndarray):
        return _from_array(x)
    if isinstance(x, Image.Image):
        img, owned = x, False
    elif isinstance(x, (str, os.PathLike)):
        path = Path(x)
        if not path.exists():
            raise ImageLoadError(f"image file not found: {path} (resolved to {path.resolve()}); check the path")
        if path.is_dir():
            raise ImageLoadError(f"{path} is a directory, not an image file")
        img, owned = _open(path, str(path), max_pixels), True
    elif isinstance(x, (bytes, bytearray, memoryview)):
        img, owned = _open(io.BytesIO(x), f"<{len(x)} bytes>", max_pixels), True
    else:
        raise ImageLoadError(f"cannot load an image from {type(x).__name__}; pass a path, bytes, a PIL image "
                             "or an array")
    img = _apply_exif_orientation(img, in_place=owned)
    img = _to_rgb(img)
    if max_pixels is not None and img.width * img.height > max_pixels:
        img = img.resize(_fit_pixels(img.width, img.height, max_pixels), Image.Resampling.BOX)
    return img


def _open(source: Path | io.BytesIO, name: str, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"{name}: {exc} Downscale it first, or if you trust the file set PIL.Image.MAX_IMAGE_PIXELS higher"
        ) from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageLoadError(f"cannot read {name} as an image ({exc}); the data is corrupt or not an image") from exc
    if max_pixels is not None and img.format == "JPEG" and img.width * img.height > max_pixels:
        img.draft(None, _fit_pixels(img.width, img.height, max_pixels))  # picks a scale >= this size
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as exc:  # PIL reports truncated data as OSError
        raise ImageLoadError(f"cannot decode {name} ({exc}); the data is truncated or corrupt") from exc
    return img


def _fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _apply_exif_orientation(img: Image.Image, *, in_place: bool) -> Image.Image:
    # exif_transpose copies even when nothing needs turning; skip it for upright images (most of them)
    if img.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
        return img
    if in_place:
        ImageOps.exif_transpose(img, in_place=True)
        return img
    return ImageOps.exif_transpose(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB" and "transparency" not in img.info:  # (an RGB PNG may carry a colour key)
        return img
    if img.mode in _WIDE_INT_MODES:
        # PIL's own convert("L") clips 16-bit values at 255, turning most of the range white
        wide = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        img = Image.fromarray(np.rint(wide / 257).astype(np.uint8))  # 2-D uint8 -> mode L
    elif img.mode == "F":  # float images are taken to be in [0, 1]
        img = Image.fromarray(np.rint(np.clip(np.asarray(img), 0, 1) * 255).astype(np.uint8))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageLoadError(f"cannot convert a {img.mode} image to RGB ({exc}); convert it to RGB first") from exc


def _from_array(a: np.ndarray) -> Image.Image:
    """[height, width] or [height, width, 1|3|4] arrays: uint8, uint16 (scaled), bool, or float in [0, 1]."""
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        raise ImageLoadError(f"array of shape {a.shape} looks channels-first; pass a.transpose(1, 2, 0)")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
        raise ImageLoadError(f"expected an image array [height, width(, 1|3|4)], got shape {a.shape}")
    if a.dtype == np.uint16:
        a = np.rint(a / 257)
    elif a.dtype == bool:
        a = a * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = np.rint(np.clip(a, 0, 1) * 255)
    elif a.dtype != np.uint8:
        raise ImageLoadError(f"unsupported array dtype {a.dtype}; use uint8, uint16, bool, or float in [0, 1]")
    a = a.astype(np.uint8, copy=False)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return _to_rgb(Image.fromarray(a))


# --------------------------------------------------------------------------- Mllama (tiles)


@dataclass(frozen=True)
class MllamaPixels:
    pixel_values: torch.Tensor  # [tile, 3, size, size] float32, CLIP-normalised
    aspect_ratio_id: int  # 1 + index into supported_aspect_ratios(max_tiles); 0 means batch padding
    num_tiles: int
    aspect_ratio: tuple[int, int]  # (tiles down, tiles across)


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Tile arrangements (down, across) with at most `max_tiles` tiles, in Mllama's id order."""
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


def _optimal_canvas(height: int, width: int, max_tiles: int, size: int) -> tuple[int, int]:
    """Mllama's canvas choice: the smallest upscale if any arrangement allows one, else the mildest downscale."""
    best = None  # ((is_downscale, how far from 1, area), canvas)
    for tiles_down, tiles_across in supported_aspect_ratios(max_tiles):
        ch, cw = tiles_down * size, tiles_across * size
        scale = min(ch / height, cw / width)
        key = (scale < 1, scale if scale >= 1 else -scale, ch * cw)
        if best is None or key < best[0]:
            best = (key, (ch, cw))
    return best[1]


def _fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, size: int) -> tuple[int, int]:
    """Aspect-preserving size inside the canvas; each side is first pulled into [size, canvas side]."""
    target_h, target_w = min(max(height, size), canvas_h), min(max(width, size), canvas_w)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def mllama_preprocess(image: ImageLike, size: int = 560, max_tiles: int = 1, *,
                      mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> MllamaPixels:
    """Resize into the best tile canvas, pad bottom/right with zeros, rescale, normalise, cut into tiles."""
    if max_tiles < 1 or size < 1:
        raise ImageError(f"size and max_tiles must be positive, got size={size}, max_tiles={max_tiles}")
    img = load_image(image)
    canvas_h, canvas_w = _optimal_canvas(img.height, img.width, max_tiles, size)
    new_h, new_w = _fit_to_canvas(img.height, img.width, canvas_h, canvas_w, size)
    resized = np.array(img.resize((new_w, new_h), Image.Resampling.BILINEAR))  # [height, width, 3] uint8
    canvas = torch.zeros(3, canvas_h, canvas_w)
    canvas[:, :new_h, :new_w] = torch.from_numpy(resized).permute(2, 0, 1).float() / 255
    # padding precedes normalisation, so padded pixels become -mean/std as in the reference
    canvas = (canvas - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    tiles = rearrange(canvas, "c (td h) (ta w) -> (td ta) c h w", h=size, w=size)  # [tile, 3, size, size]
    arrangement = (canvas_h // size, canvas_w // size)
    return MllamaPixels(tiles.contiguous(), supported_aspect_ratios(max_tiles).index(arrangement) + 1,
                        len(tiles), arrangement)


# --------------------------------------------------------------------------- MOSS-VL (patches)


@dataclass(frozen=True)
class MossPixels:
    pixel_values: torch.Tensor  # [patch, 3 * 1 * patch_size * patch_size] float32
    grid_thw: tuple[int, int, int]  # (frames, patch rows, patch columns)


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 4096,
                 max_pixels: int = 16777216) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with area in [min_pixels, max_pixels] (Qwen2-VL rule)."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image must have positive height and width, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise AspectRatioError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} of a {height}x{width} image exceeds 200; "
            "crop it or pad its short side before MOSS-VL preprocessing"
        )
    h, w = round(height / factor) * factor, round(width / factor) * factor  # Python round: halves go to even
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _patchify(frames: torch.Tensor, patch_size: int, merge_size: int, mean, std) -> torch.Tensor:
    """[frame, 3, height, width] uint8 at a multiple of patch*merge -> [patch, 3 * patch_size**2] float32."""
    # rescale and normalise fused, as the fast processor does: (x - 255 mean) / (255 std)
    x = (frames.float() - 255 * torch.tensor(mean).view(1, 3, 1, 1)) / (255 * torch.tensor(std).view(1, 3, 1, 1))
    # rows: each 2x2 merge window is contiguous, windows row-major; columns: channel, then patch pixels
    return rearrange(x, "t c (bh mh ph) (bw mw pw) -> (t bh bw mh mw) (c ph pw)",
                     mh=merge_size, mw=merge_size, ph=patch_size, pw=patch_size).contiguous()


def moss_patchify_frames(frames: np.ndarray, *, patch_size: int = 16, merge_size: int = 2,
                         mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
                         min_pixels: int = 131072, max_pixels: int = 786432) -> MossPixels:
    """Video frames [frame, height, width, 3] uint8 -> patches of every frame, frame-major, grid (T, h, w).

    Defaults are the MOSS-VL video processor's per-frame bounds (128 and 768 merged 32x32 windows).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ImageError(f"frames must be a non-empty uint8 array [frame, height, width, 3], got "
                         f"{frames.dtype} {frames.shape}")
    factor = patch_size * merge_size
    h, w = smart_resize(frames.shape[1], frames.shape[2], factor, min_pixels, max_pixels)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # [frame, 3, height, width] uint8
    if (h, w) != tuple(x.shape[-2:]):
        # uint8 in, uint8 out: torch's native antialiased bicubic, the kernel torchvision uses on CPU
        x = torch.nn.functional.interpolate(x.contiguous(), size=(h, w), mode="bicubic", align_corners=False,
                                            antialias=True)
    grid = (len(frames), h // patch_size, w // patch_size)
    return MossPixels(_patchify(x, patch_size, merge_size, mean, std), grid)


def moss_patchify(image: ImageLike, *, patch_size: int = 16, merge_size: int = 2,
                  mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
                  min_pixels: int = 4096, max_pixels: int = 16777216) -> MossPixels:
    """One image -> MOSS-VL patches; defaults are the official offline runner's pixel bounds."""
    rgb = np.array(load_image(image))[None]  # [1, height, width, 3]; a writable copy torch can wrap
    return moss_patchify_frames(rgb, patch_size=patch_size, merge_size=merge_size, mean=mean, std=std,
                                min_pixels=min_pixels, max_pixels=max_pixels)


def blank_moss_image(patch_size: int = 16, merge_size: int = 2) -> MossPixels:
    """The 128x128 placeholder of text-only samples: grid (1, 8, 8), 64 patches of zeros.

    Zeros in pixel_values, as the spec states, not a black image: black would normalise to -1.
    """
    side = 128 // patch_size
    return MossPixels(torch.zeros(side * side, 3 * patch_size * patch_size), (1, side, side))
