"""Image loading (modes, EXIF, size limits), Mllama tiles vs transformers, MOSS-VL smart_resize and patches."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mossvl_lab.processing import image as I

RNG = np.random.default_rng(0)


def _noise(h: int, w: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- load_image


def test_rgba_composited_on_white():
    a = np.zeros((2, 3, 4), np.uint8)
    a[0, 0] = (10, 20, 30, 255)  # opaque: unchanged
    a[0, 1] = (255, 0, 0, 0)  # fully transparent: white
    a[0, 2] = (255, 0, 0, 128)  # half red over white: g = b = 255 * 127 / 255
    rgb = np.asarray(I.load_image(Image.fromarray(a, "RGBA")))
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[0, 2, 0] == 255 and abs(int(rgb[0, 2, 1]) - 127) <= 1 and abs(int(rgb[0, 2, 2]) - 127) <= 1
    assert np.array_equal(np.asarray(I.load_image(a)), rgb)  # an RGBA array takes the same path
    keyed = Image.new("RGB", (2, 1), (10, 20, 30))
    keyed.putpixel((1, 0), (1, 2, 3))
    keyed.info["transparency"] = (1, 2, 3)  # an RGB PNG's colour key is transparency too
    assert np.asarray(I.load_image(keyed)).tolist() == [[[10, 20, 30], [255, 255, 255]]]


def test_grey_palette_and_cmyk():
    assert np.asarray(I.load_image(Image.new("L", (2, 2), 77)))[0, 0].tolist() == [77, 77, 77]
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.putpixel((1, 0), 1)
    assert np.asarray(I.load_image(p)).tolist() == [[[0, 0, 0], [200, 100, 50]]]
    p.info["transparency"] = 1  # palette index 1 transparent -> white
    assert np.asarray(I.load_image(p)).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # full cyan ink
    assert np.asarray(I.load_image(cmyk)).tolist() == [[[255, 255, 255], [0, 255, 255]]]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"
    rgb = np.asarray(I.load_image(tmp_path / "depth.png"))
    assert rgb[..., 0].tolist() == [[0, 100, 255, 4]]  # 1000 / 257 = 3.9 -> 4
    assert np.array_equal(np.asarray(I.load_image(values)), rgb)


def test_encoded_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (0, 200, 0)).save(buf, "PNG")
    img = I.load_image(buf.getvalue())
    assert img.size == (8, 6) and np.asarray(img)[0, 0].tolist() == [0, 200, 0]
    with pytest.raises(I.ImageLoadError, match="corrupt"):
        I.load_image(b"\x00garbage")


def test_arrays():
    assert np.asarray(I.load_image(np.full((2, 2), 0.5))).tolist()[0][0] == [128, 128, 128]
    with pytest.raises(I.ImageLoadError, match="channels-first"):
        I.load_image(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(I.ImageLoadError, match="dtype"):
        I.load_image(np.zeros((8, 8, 3), np.int64))


def test_exif_rotation_applied(tmp_path):
    # stored 64 wide x 32 high, left half red, right half blue; orientation 6 = display rotated 90 deg clockwise
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = (255, 0, 0)
    a[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    img = I.load_image(tmp_path / "phone.jpg")
    assert img.size == (32, 64)  # (width, height): now portrait
    rgb = np.asarray(img).astype(int)
    assert rgb[5, 16, 0] > 200 and rgb[5, 16, 2] < 60  # the left (red) half is on top after a clockwise turn
    assert rgb[58, 16, 2] > 200 and rgb[58, 16, 0] < 60
    # a PIL image handed in is rotated too, and left untouched
    src = Image.open(tmp_path / "phone.jpg")
    assert I.load_image(src).size == (32, 64) and src.size == (64, 32)


def test_missing_corrupt_and_directory(tmp_path):
    with pytest.raises(I.ImageLoadError, match="not found"):
        I.load_image(tmp_path / "nope.png")
    with pytest.raises(I.ImageLoadError, match="directory"):
        I.load_image(tmp_path)
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(I.ImageLoadError, match="corrupt"):
        I.load_image(tmp_path / "junk.png")
    buf = io.BytesIO()
    _noise(64, 64).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:300])
    with pytest.raises(I.ImageLoadError, match="truncated"):
        I.load_image(tmp_path / "cut.png")
    assert issubclass(I.ImageLoadError, ValueError)


def test_decompression_bomb_is_named(tmp_path, monkeypatch):
    _noise(100, 100).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px > 2 x limit: PIL's hard error
    with pytest.raises(I.ImageTooLargeError, match="MAX_IMAGE_PIXELS"):
        I.load_image(tmp_path / "small.png")


def _peak_rss_mb() -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]) / 1024


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    """10000 x 10000 RGB JPEG (100 MP: above PIL's 89 MP warning, below its hard limit)."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    Image.new("RGB", (10000, 10000), (200, 100, 50)).save(path, quality=50)
    return path


def test_huge_image_loads_at_its_own_size(huge_jpeg):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc to measure peak memory")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    base = _peak_rss_mb()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning escapes
        img = I.load_image(huge_jpeg)
    assert img.size == (10000, 10000) and img.mode == "RGB"
    # PIL holds RGB as 4 bytes a pixel: the decoded image alone is 381 MiB. An extra full-size copy
    # (a mode conversion, an EXIF transpose, a numpy round trip) would double the peak
    decoded_mb = 10000 * 10000 * 4 / 2**20
    assert _peak_rss_mb() - base < 1.25 * decoded_mb
    del img


def test_huge_jpeg_decoded_reduced(huge_jpeg):
    img = I.load_image(huge_jpeg, max_pixels=1_000_000)
    assert img.size == (1000, 1000)  # libjpeg decodes at 1/8 (1250 px), a box filter takes it to the budget
    assert np.abs(np.asarray(img)[500, 500].astype(int) - (200, 100, 50)).max() <= 3


# --------------------------------------------------------------------------- Mllama


def test_mllama_one_tile_hand_checked():
    out = I.mllama_preprocess(_noise(1080, 1920))  # spec example: 560 x 315 + 245 padded rows
    assert out.pixel_values.shape == (1, 3, 560, 560) and out.pixel_values.dtype == torch.float32
    assert (out.aspect_ratio_id, out.num_tiles, out.aspect_ratio) == (1, 1, (1, 1))
    pad = -torch.tensor(I.CLIP_MEAN) / torch.tensor(I.CLIP_STD)
    assert torch.allclose(out.pixel_values[0, :, 315:, :], pad.view(3, 1, 1).expand(3, 245, 560))
    assert not torch.allclose(out.pixel_values[0, :, 314, :], pad.view(3, 1).expand(3, 560))
    small = I.mllama_preprocess(_noise(20, 40))  # upscaled: width 40 -> 560, height 20 -> 280
    assert not torch.allclose(small.pixel_values[0, :, 279], pad.view(3, 1))
    assert torch.allclose(small.pixel_values[0, :, 280], pad.view(3, 1).expand(3, 560))


@pytest.mark.parametrize("max_tiles", [1, 4])
def test_mllama_matches_transformers(max_tiles):
    # the PIL processor is what MOSS-Video-Preview ran (transformers 4.46 "slow" Mllama processor)
    pil_mllama = pytest.importorskip("transformers.models.mllama.image_processing_pil_mllama")
    ref = pil_mllama.MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=max_tiles,
                                             image_mean=list(I.CLIP_MEAN), image_std=list(I.CLIP_STD))
    for h, w in [(300, 700), (900, 400), (1000, 1000), (50, 1200)]:
        img = _noise(h, w)
        expected = ref([img], return_tensors="np")
        n = expected["num_tiles"][0][0]
        out = I.mllama_preprocess(img, 560, max_tiles)
        assert out.num_tiles == n and out.aspect_ratio_id == expected["aspect_ratio_ids"][0, 0]
        np.testing.assert_allclose(out.pixel_values.numpy(), expected["pixel_values"][0, 0, :n], atol=1e-5, rtol=0)
    assert I.mllama_preprocess(_noise(900, 400), 560, 4).aspect_ratio == (2, 1)  # two tiles stacked


# --------------------------------------------------------------------------- MOSS-VL


@pytest.mark.parametrize("hw, expected", [
    ((352, 640), (352, 640)),  # spec example: already multiples of 32 and inside the budget
    ((100, 200), (96, 192)),  # 3.125 -> 3, 6.25 -> 6
    ((80, 112), (64, 128)),  # 2.5 -> 2 and 3.5 -> 4: Python's round-half-even, as the reference
    ((10, 20), (64, 96)),  # under 4096 px: beta = sqrt(4096/200) = 4.53; ceil(1.41) = 2, ceil(2.83) = 3
    ((1, 200), (32, 928)),  # aspect exactly 200 is allowed; ceil(0.14) = 1, ceil(28.3) = 29
])
def test_smart_resize_examples(hw, expected):
    assert I.smart_resize(*hw) == expected


def test_smart_resize_over_budget_floors():
    # 10016 x 10016 > 1e6 -> beta = 10 -> floor(1000 / 32) * 32 = 992
    assert I.smart_resize(10000, 10000, max_pixels=1_000_000) == (992, 992)
    # beta = sqrt(320000 / 1e5) = 1.79: floor(0.7) = 0 is lifted to one factor; floor(139.75) = 139
    assert I.smart_resize(40, 8000, max_pixels=100_000) == (32, 4448)


def test_smart_resize_matches_qwen2vl():
    qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    for h, w in RNG.integers(1, 3000, (200, 2)):
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in [(4096, 16777216), (131072, 786432)]:
            assert I.smart_resize(int(h), int(w), 32, lo, hi) == qwen.smart_resize(int(h), int(w), 32, lo, hi)


def test_aspect_ratio_error():
    with pytest.raises(I.AspectRatioError, match="exceeds 200"):
        I.smart_resize(1, 201)
    with pytest.raises(I.AspectRatioError):
        I.moss_patchify(np.zeros((2, 500, 3), np.uint8))


def _loop_patchify(x: np.ndarray, p: int = 16, m: int = 2) -> np.ndarray:
    """Independent reference: walk merge windows row-major, 2x2 patches inside, vector = channel-major pixels."""
    _, h, w = x.shape  # [3, height, width] float
    rows = []
    for wy in range(h // (p * m)):
        for wx in range(w // (p * m)):
            for dy in range(m):
                for dx in range(m):
                    y0, x0 = (wy * m + dy) * p, (wx * m + dx) * p
                    rows.append(x[:, y0:y0 + p, x0:x0 + p].reshape(-1))
    return np.stack(rows)


def test_moss_patch_order_against_loop_and_qwen2vl():
    img = _noise(64, 96)  # already 32-aligned: no resize, so only layout and normalisation are compared
    out = I.moss_patchify(img)
    assert out.grid_thw == (1, 4, 6) and out.pixel_values.shape == (24, 768)
    x = (np.asarray(img, np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(out.pixel_values.numpy(), _loop_patchify(x), atol=1e-6)
    qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    ref = qwen.Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=1, merge_size=2, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3, size={"shortest_edge": 4096, "longest_edge": 16777216})
    expected = ref([img], return_tensors="np")
    assert expected["image_grid_thw"].tolist() == [[1, 4, 6]]
    np.testing.assert_allclose(out.pixel_values.numpy(), expected["pixel_values"], atol=1e-6)
    # with a resize, torch's uint8 bicubic and PIL's BICUBIC agree within one grey level (2/255 here)
    odd = _noise(100, 200)
    got, want = I.moss_patchify(odd).pixel_values.numpy(), ref([odd], return_tensors="np")["pixel_values"]
    assert got.shape == want.shape == (72, 768) and np.abs(got - want).max() <= 2 / 255 + 1e-6


def test_moss_flat_colour_and_frames():
    flat = I.moss_patchify(Image.new("RGB", (40, 37), (255, 0, 51)))  # resized; a flat colour stays flat
    assert flat.grid_thw == (1, 4, 6)
    assert torch.allclose(flat.pixel_values[:, :256], torch.tensor(1.0))
    assert torch.allclose(flat.pixel_values[:, 256:512], torch.tensor(-1.0))
    assert torch.allclose(flat.pixel_values[:, 512:], torch.tensor(51 / 127.5 - 1))
    frames = RNG.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    video = I.moss_patchify_frames(frames, min_pixels=4096)
    assert video.grid_thw == (3, 4, 4) and video.pixel_values.shape == (48, 768)
    for t in range(3):  # frames concatenated frame-major, each laid out like a single image
        assert torch.equal(video.pixel_values[16 * t:16 * (t + 1)], I.moss_patchify(frames[t]).pixel_values)
    with pytest.raises(I.ImageError):
        I.moss_patchify_frames(frames.astype(np.float32))


def test_blank_moss_image():
    blank = I.blank_moss_image()
    assert blank.grid_thw == (1, 8, 8)
    assert blank.pixel_values.shape == (64, 768) and not blank.pixel_values.any()
