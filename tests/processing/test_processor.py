"""Cross-attention masks (checked against transformers' Mllama helpers) and the Processor end to end."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.processing import masks as M
from mossvl_lab.processing.processor import (Processor, ProcessorArgumentError, ProcessingConfig,
                                             TokenizerMismatchError, collect_media, load_processor,
                                             processor_for_model)
from mossvl_lab.processing.templates import PlaceholderCountError, TimestampOrderError, realtime_system_prompt
from mossvl_lab.processing.tokenizer import Tokenizer, build_tiny_tokenizer

IMG = 99


def _hf_mask(rows, num_tiles, max_tiles):
    hf = pytest.importorskip("transformers.models.mllama.processing_mllama")
    sparse = [hf.get_cross_attention_token_mask(r, IMG) for r in rows]
    return torch.from_numpy(hf.convert_sparse_cross_attention_mask_to_dense(sparse, num_tiles, max_tiles,
                                                                            len(rows[0])))


def _random_rows(rng, batch, length, contiguous):
    rows, tiles = [], []
    for _ in range(batch):
        row = [rng.randrange(0, 50) for _ in range(length)]
        n = rng.randrange(1, 6)
        if contiguous:
            start = rng.randrange(0, length - n)
            spots = list(range(start, start + n))
        else:
            spots = rng.sample(range(length), n)
            spots += [s + 1 for s in spots[:2] if s + 1 < length]  # some adjacent groups
        for s in spots:
            row[s] = IMG
        rows.append(row)
        tiles.append([rng.randrange(1, 5) for _ in range(row.count(IMG))])
    return rows, tiles


@pytest.mark.parametrize("seed", range(6))
def test_mllama_stock_mask_equals_transformers(seed):
    rng = random.Random(seed)
    rows, tiles = _random_rows(rng, batch=3, length=24, contiguous=False)
    ours = M.mllama_cross_attention_mask(torch.tensor(rows), IMG, num_tiles=tiles, max_tiles=4, rule="mllama_stock")
    assert torch.equal(ours, _hf_mask(rows, tiles, 4))


@pytest.mark.parametrize("seed", range(4))
def test_cumulative_mask_equals_transformers_for_adjacent_frames(seed):
    rng = random.Random(100 + seed)
    rows, tiles = _random_rows(rng, batch=2, length=20, contiguous=True)
    for rule in ("cumulative", "mllama_stock"):
        ours = M.mllama_cross_attention_mask(torch.tensor(rows), IMG, num_tiles=tiles, max_tiles=4, rule=rule)
        assert torch.equal(ours, _hf_mask(rows, tiles, 4))


def test_cumulative_rule_and_left_padding_by_hand():
    pad = 0
    ids = torch.tensor([[pad, pad, 5, IMG, 6, IMG, 7],
                        [5, IMG, IMG, 6, 7, 8, 9]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    got = M.mllama_cross_attention_mask(ids, IMG, attention_mask=attn)[..., 0]  # [batch, pos, media]
    expected = torch.tensor([[[0, 0], [0, 0], [0, 0], [1, 0], [1, 0], [1, 1], [1, 1]],
                             [[0, 0], [1, 0], [1, 1], [1, 1], [1, 1], [1, 1], [1, 1]]])
    assert torch.equal(got, expected)
    stock = M.mllama_cross_attention_mask(ids, IMG, attention_mask=attn, rule="mllama_stock")[..., 0]
    assert stock[0, 4].tolist() == [1, 0] and stock[0, 5].tolist() == [0, 1]  # stock forgets the earlier image
    # left padding: the padded rows are all zero, the rest equals the unpadded sample's mask (and transformers')
    alone = M.mllama_cross_attention_mask(ids[:1, 2:], IMG)
    assert torch.equal(M.mllama_cross_attention_mask(ids, IMG, attention_mask=attn)[:1, 2:], alone)
    assert torch.equal(stock[:1, :2], torch.zeros(1, 2, 2, dtype=torch.long))
    assert torch.equal(stock[:1, 2:, :, None], _hf_mask([ids[0, 2:].tolist()], [[1, 1]], 1))


def test_moss_mask_by_hand():
    P = 7  # <|image_pad|>
    ids = torch.tensor([[0, 0, 1, P, 2, P, 3],
                        [1, 2, P, 3, 4, 5, 6],
                        [1, 2, 3, 4, 5, 6, 8]])  # text-only sample with the blank image: 1 frame, no pad token
    attn = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [1] * 7])
    mask = M.moss_cross_attention_mask(ids, P, frames_per_sample=[2, 1, 1], attention_mask=attn)
    assert mask.shape == (3, 1, 7, 2) and mask.dtype == torch.bool
    visible = (~mask[:, 0]).int().tolist()
    assert visible[0] == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 0], [1, 1], [1, 1]]
    assert visible[1] == [[0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [1, 0], [1, 0]]  # frame 1 does not exist
    assert visible[2] == [[0, 0]] * 7
    assert M.visible_frame_counts(mask)[0].tolist() == [0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(M.MaskInputError):
        M.moss_cross_attention_mask(ids, P, frames_per_sample=[1, 1, 1], attention_mask=attn)


# ----------------------------------------------------------------------------- processors

@pytest.fixture(scope="module")
def procs():
    return {name: processor_for_model(ml.config.preset(name))
            for name in ("mllama-tiny", "video-preview-tiny", "moss-vl-tiny")}


@pytest.fixture
def image_module():
    mod = pytest.importorskip("mossvl_lab.processing.image", reason="mossvl_lab.processing.image not written yet")
    missing = [n for n in ("load_image", "mllama_preprocess", "moss_patchify", "moss_patchify_frames",
                           "blank_moss_image") if not hasattr(mod, n)]
    if missing:
        pytest.skip(f"mossvl_lab.processing.image lacks {missing} (being written concurrently)")
    return mod


def _frames(n, h=32, w=48):
    frames = np.zeros((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, :, :, 0] = 40 * i
    return frames


def test_chat_template_per_family(procs):
    msgs = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "\nWhy?"}]}]
    assert procs["video-preview-tiny"].apply_chat_template(msgs) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|video|>\nWhy?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert procs["moss-vl-tiny"].apply_chat_template(msgs, system_prompt="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|video|>\nWhy?<|im_end|>\n<|im_start|>assistant\n")
    assert collect_media(msgs + [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}]) == \
        (["a.png"], ["clip.mp4"])


def test_left_padded_text_batch(procs):
    p = procs["video-preview-tiny"]
    texts = [p.apply_chat_template([{"role": "user", "content": "Describe the kitchen in detail please."}]), "Hi"]
    out = p(texts)
    assert set(out) == {"input_ids", "attention_mask"}
    ids, attn = out["input_ids"], out["attention_mask"]
    short = p.tokenizer.encode("Hi")
    assert ids[0].tolist() == p.tokenizer.encode(texts[0]) and attn[0].all()
    assert ids[1, -len(short):].tolist() == short
    assert (ids[1, :-len(short)] == p.tokenizer.pad_token_id).all()
    assert attn[1].tolist() == [0] * (ids.shape[1] - len(short)) + [1] * len(short)
    right = p(texts, padding_side="right")
    assert right["input_ids"][1, :len(short)].tolist() == short and right["attention_mask"][1, len(short):].sum() == 0
    assert p.decode(ids[0]) == texts[0]
    assert p.decode(ids, skip_special_tokens=True)[1] == "Hi"


def test_unknown_kwarg_and_placeholder_errors(procs):
    p = procs["video-preview-tiny"]
    with pytest.raises(ProcessorArgumentError, match="video_maxlen") as err:
        p("hi", video_max_len=4)
    assert isinstance(err.value, TypeError) and "video_max_len" in str(err.value)
    with pytest.raises(PlaceholderCountError, match="more placeholders"):
        p("<|image|><|image|>x", images=[np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(PlaceholderCountError, match="fewer placeholders"):
        p("<|video|>x", videos=[_frames(2), _frames(2)])
    with pytest.raises(PlaceholderCountError, match="fewer placeholders"):
        p("no media here", images=[np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(PlaceholderCountError, match="raw frame tokens"):
        procs["moss-vl-tiny"]("typed <|image_pad|> by hand")
    with pytest.raises(TimestampOrderError):
        p("<|video|>", videos=[(_frames(3), [0.0, 2.0, 1.0])])


def test_video_preview_media(procs, image_module):
    p = procs["video-preview-tiny"]
    image = np.full((40, 30, 3), 200, np.uint8)
    texts = ["<|image|>A<|video|>\nWhat changed?", "<|video|>B"]
    out = p(texts, images=[image], videos=[_frames(3), (_frames(2), [5.0, 6.0])])
    S = p.config.image_size
    assert out["pixel_values"].shape == (2, 4, 1, 3, S, S)
    assert out["aspect_ratio_ids"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["aspect_ratio_mask"][..., 0].tolist() == [[1] * 4, [1] * 4]
    assert out.sample_timestamps == [[None, 0.0, 1.0, 2.0], [5.0, 6.0]]
    assert out["frame_timestamps"] == [None, None, 1.0, 2.0]  # per frame column, where the samples agree
    image_id = p.image_token_id
    assert ((out["input_ids"] == image_id).sum(1)).tolist() == [4, 2]
    expected = M.mllama_cross_attention_mask(out["input_ids"], image_id, attention_mask=out["attention_mask"],
                                             num_media=4)
    assert torch.equal(out["cross_attention_mask"], expected)
    assert torch.equal(out["pixel_values"][1, 2:], torch.zeros_like(out["pixel_values"][1, 2:]))
    # frames are ordinary images: frame k of the video equals the image path for the same array
    alone = p("<|image|>", images=[_frames(3)[1]])
    assert torch.equal(alone["pixel_values"][0, 0], out["pixel_values"][0, 2])
    text = p.decode(out["input_ids"][0])
    assert text.endswith("<|image|>A<|image|><|image|><|image|>\nWhat changed?")


def test_mllama_family_uses_transformers_rule(procs, image_module):
    p = procs["mllama-tiny"]
    out = p("<|image|>one <|image|>two", images=[np.zeros((20, 20, 3), np.uint8), np.zeros((20, 90, 3), np.uint8)])
    num_tiles = [[int(out["aspect_ratio_mask"][0, i].sum()) for i in range(2)]]
    assert torch.equal(out["cross_attention_mask"], _hf_mask_for(out["input_ids"], p.image_token_id, num_tiles, 4))


def _hf_mask_for(input_ids, image_id, num_tiles, max_tiles):
    hf = pytest.importorskip("transformers.models.mllama.processing_mllama")
    rows = input_ids.tolist()
    sparse = [hf.get_cross_attention_token_mask(r, image_id) for r in rows]
    return torch.from_numpy(hf.convert_sparse_cross_attention_mask_to_dense(sparse, num_tiles, max_tiles, len(rows[0])))


def test_moss_media_text_and_pixels(procs, image_module):
    p = procs["moss-vl-tiny"]
    image = np.full((24, 40, 3), 10, np.uint8)
    out = p(["<|image|>\nA<|video|>B", "C"], images=[image], videos=[(_frames(2), [0.0, 1.5])],
            video_min_pixels=1024, video_max_pixels=4096)
    text = p.decode(out["input_ids"][0], skip_special_tokens=False)
    assert text.endswith("<|image_pad|>\nA<|vision_start|><|time_start|>0.0 seconds<|time_end|><|image_pad|>"
                         "<|time_start|>1.5 seconds<|time_end|><|image_pad|><|vision_end|>B")
    grid = out["grid_thw"].tolist()
    assert [g[0] for g in grid] == [1, 2, 1]  # image, video (text order), then sample 2's blank image
    assert out["media_nums_per_sample"] == [2, 1]
    assert out["pixel_values"].shape == (sum(t * h * w for t, h, w in grid), 3 * p.config.patch_size ** 2)
    blank = out["pixel_values"][-grid[-1][1] * grid[-1][2]:]
    assert torch.equal(blank, torch.zeros_like(blank))
    mask = out["cross_attention_mask"]
    assert mask.shape == (2, 1, out["input_ids"].shape[1], 3) and mask.dtype == torch.bool
    assert mask[1].all()  # the text-only sample sees nothing (its blank frame has no placeholder)
    assert torch.equal(mask, M.moss_cross_attention_mask(out["input_ids"], p.image_token_id, frames_per_sample=[3, 1],
                                                         attention_mask=out["attention_mask"]))
    assert out.sample_timestamps == [[None, 0.0, 1.5], [None]]


def test_moss_text_only_gets_the_blank_image(procs, image_module):
    out = procs["moss-vl-tiny"]("just text")
    assert out["media_nums_per_sample"] == [1] and out["grid_thw"].shape == (1, 3)
    assert out["grid_thw"][0, 0] == 1 and not out["pixel_values"].any() and out["cross_attention_mask"].all()


def test_video_paths_use_the_family_sampling(procs, image_module, tmp_path):
    video = pytest.importorskip("mossvl_lab.processing.video")
    try:
        path = video.write_video(_frames(6, 32, 32), tmp_path / "clip.mp4", fps=2.0)
    except Exception as exc:  # no encoder in this environment
        pytest.skip(f"cannot write a test clip: {exc}")
    p = procs["video-preview-tiny"]
    out = p("<|video|>", videos=[str(path)], video_fps=1.0, video_minlen=1, video_maxlen=8)
    stamps = out.sample_timestamps[0]
    assert int((out["input_ids"] == p.image_token_id).sum()) == len(stamps) == 3
    assert stamps == sorted(stamps)
    capped = p("<|video|>", videos=[str(path)], video_fps=2.0, video_minlen=1, video_maxlen=2)
    assert len(capped.sample_timestamps[0]) == 2


@pytest.mark.parametrize("name", ["video-preview-tiny", "moss-vl-tiny"])
def test_model_accepts_processor_outputs(procs, image_module, name):
    cfg = ml.config.preset(name)
    model = ml.build_model(cfg).eval()
    p = procs[name]
    out = p(["<|image|>hello <|video|>there", "<|image|>hi"], images=[np.zeros((40, 60, 3), np.uint8)] * 2,
            videos=[(_frames(3), [0.0, 1.0, 2.0])], video_min_pixels=1024, video_max_pixels=4096)
    with torch.no_grad():
        logits = model(**out).logits
    assert logits.shape == (2, out["input_ids"].shape[1], cfg.text.vocab_size)
    assert torch.isfinite(logits[out["attention_mask"].bool()]).all()
    moved = out.to("cpu")
    assert moved.sample_timestamps == out.sample_timestamps and set(moved) == set(out)


def test_save_and_load(procs, tmp_path):
    p = procs["moss-vl-tiny"]
    custom = Processor(p.family, p.tokenizer, dataclasses.replace(p.config, max_frames=17))
    custom.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "processor_config.json").read_text())
    assert saved["family"] == "moss_vl" and saved["settings"]["max_frames"] == 17
    loaded = load_processor(tmp_path / "a")
    assert (loaded.family, loaded.config) == ("moss_vl", custom.config)
    text = "<|im_start|>user\nhé 🎉<|im_end|>\n"
    assert loaded.tokenizer.encode(text) == p.tokenizer.encode(text)
    # a checkpoint dir: the family comes from config.json
    cfg = ml.config.preset("video-preview-tiny")
    ml.save_model(ml.build_model(cfg), tmp_path / "b")
    procs["video-preview-tiny"].save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "processor_config.json").unlink()
    loaded = load_processor(tmp_path / "b")
    assert loaded.family == "video_preview" and loaded.config == ProcessingConfig.for_model(cfg)


def test_checkpoint_prompt_settings_travel_and_apply(procs, tmp_path):
    p = procs["moss-vl-tiny"]
    custom = Processor(p.family, p.tokenizer, dataclasses.replace(p.config, realtime_system_prompt="Be brief.",
                                                                  frame_timestamps=False))
    custom.save_pretrained(tmp_path)
    loaded = load_processor(tmp_path)
    assert loaded.default_realtime_system_prompt() == "Be brief."
    assert p.default_realtime_system_prompt() == realtime_system_prompt("moss_vl")
    video = {"frames": np.zeros((3, 64, 64, 3), np.uint8), "timestamps": [0.0, 1.0, 2.0]}
    with_time = p.tokenizer.decode(p("<|video|>", videos=[video])["input_ids"][0].tolist())
    without = loaded.tokenizer.decode(loaded("<|video|>", videos=[video])["input_ids"][0].tolist())
    assert with_time.count("seconds") == 3 and "seconds" not in without
    assert without.count("<|image_pad|>") == with_time.count("<|image_pad|>") > 0


def test_tokenizer_must_match_the_config(tmp_path):
    cfg = ml.config.preset("video-preview-tiny")
    other = ml.config.preset("video-preview-small")
    wrong = Tokenizer(build_tiny_tokenizer(other), "video_preview")
    with pytest.raises(TokenizerMismatchError, match="bos_token_id"):
        processor_for_model(cfg, wrong)
    assert processor_for_model(cfg, build_tiny_tokenizer(cfg)).image_token_id == cfg.tokens.image_token_id
    # a checkpoint whose tokenizer files do not fit its config.json
    ml.save_model(ml.build_model(cfg), tmp_path)
    Processor("video_preview", wrong).save_pretrained(tmp_path)
    with pytest.raises(TokenizerMismatchError, match="image_token_id"):
        load_processor(tmp_path)


def test_nested_per_sample_media(procs, image_module):
    p = procs["video-preview-tiny"]
    a, b = np.full((20, 20, 3), 10, np.uint8), np.full((20, 20, 3), 250, np.uint8)
    nested = p(["<|image|>x", "<|image|>y<|image|>"], images=[[a], [b, a]])
    flat = p(["<|image|>x", "<|image|>y<|image|>"], images=[a, b, a])
    assert all(torch.equal(nested[k], flat[k]) for k in ("input_ids", "pixel_values", "cross_attention_mask"))
    assert not torch.equal(nested["pixel_values"][1, 0], nested["pixel_values"][1, 1])  # b then a, in text order
    with pytest.raises(PlaceholderCountError, match="per-sample counts differ"):
        p(["<|image|>x", "<|image|>y<|image|>"], images=[[a, b], [a]])
    assert collect_media([{"role": "user", "content": ["plain", {"type": "text", "text": "t"}]}]) == ([], [])


def test_moss_text_only_prompt_runs_and_equals_the_pure_text_forward(procs, image_module):
    """The blank image the processor adds to text-only prompts is hidden by its mask: the model treats it as
    padding, so the logits equal a forward without any pixels."""
    torch.manual_seed(0)
    model = ml.build_model(ml.config.preset("moss-vl-tiny")).eval()
    out = procs["moss-vl-tiny"]("just text")
    with torch.no_grad():
        with_blank = model(**{k: v for k, v in out.items() if k != "frame_timestamps"}).logits
        plain = model(out["input_ids"], attention_mask=out["attention_mask"]).logits
    assert torch.equal(with_blank, plain)
