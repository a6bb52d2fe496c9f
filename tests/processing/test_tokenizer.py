"""Tiny tokenizers, special-token layouts, tokenizer files and streaming decode."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

import mossvl_lab as ml
from mossvl_lab.processing import tokenizer as T

TINY = ["mllama-tiny", "video-preview-tiny", "moss-vl-tiny"]


@pytest.fixture(scope="module")
def toks():
    return {name: T.Tokenizer(T.build_tiny_tokenizer(ml.config.preset(name)), ml.config.preset(name).family)
            for name in TINY}


def test_documented_layouts():
    # the ids the module docstring (and the presets) promise, written out by hand
    assert T.llama_token_layout(512) == {
        "<|begin_of_text|>": 496, "<|end_of_text|>": 497, "<|finetune_right_pad_id|>": 498,
        "<|start_header_id|>": 499, "<|end_header_id|>": 500, "<|eot_id|>": 501, "<|silence|>": 502, "<|...|>": 503,
        "<|video|>": 504, **{f"<|reserved_special_token_{k}|>": 505 + k for k in range(7)}, "<|image|>": 512}
    assert T.chatml_token_layout(640) == {
        "<|endoftext|>": 624, "<|im_start|>": 625, "<|im_end|>": 626, "<|vision_start|>": 627, "<|vision_end|>": 628,
        "<|image_pad|>": 629, "<|video_pad|>": 630, "<|time_start|>": 631, "<|time_end|>": 632, "<|silence|>": 633,
        "<|response|>": 634, "<|...|>": 635, **{f"<|reserved_special_token_{k}|>": 636 + k for k in range(4)}}
    real = T.llama_token_layout(128256)  # spec moss-video-preview §5.1
    assert (real["<|begin_of_text|>"], real["<|finetune_right_pad_id|>"], real["<|eot_id|>"], real["<|silence|>"],
            real["<|...|>"], real["<|video|>"], real["<|image|>"]) == (128000, 128004, 128009, 128011, 128012, 128255,
                                                                      128256)
    qwen = T.chatml_token_layout(151936)  # spec moss-vl §3.1 / §6.1
    assert (qwen["<|endoftext|>"], qwen["<|im_end|>"], qwen["<|vision_start|>"], qwen["<|image_pad|>"],
            qwen["<|video_pad|>"], qwen["<|response|>"]) == (151643, 151645, 151652, 151655, 151656, 151672)


@pytest.mark.parametrize("name", TINY)
def test_special_ids_equal_the_config(toks, name):
    cfg = ml.config.preset(name)
    tok, t = toks[name], cfg.tokens
    llama = cfg.family != "moss_vl"
    image = "<|image|>" if llama else "<|image_pad|>"
    assert tok.token_to_id(image) == t.image_token_id == tok.image_token_id
    assert tok.token_to_id("<|begin_of_text|>" if llama else "<|endoftext|>") == t.bos_token_id == tok.bos_token_id
    assert tok.pad_token_id == t.pad_token_id
    assert [tok.id_to_token(i) for i in t.eos_token_ids] == (["<|end_of_text|>", "<|eot_id|>"] if llama
                                                           else ["<|im_end|>"])
    assert tok.eos_token_id in t.eos_token_ids
    for field, token in (("silence_token_id", "<|silence|>"), ("response_token_id", "<|response|>"),
                         ("ellipsis_token_id", "<|...|>")):
        if getattr(t, field) is not None:
            assert tok.token_to_id(token) == getattr(t, field)
    # every family special is one id, ordinary tokens stay below the specials, the LM vocab is covered
    for token in T.FAMILY_SPECIALS[cfg.family]:
        assert tok.encode(token) == [tok.token_to_id(token)]
    first = min(tok.special_ids.values())
    assert first == cfg.text.vocab_size - 16
    assert len(tok) == cfg.text.vocab_size + (1 if llama else 0)
    ordinary = tok.encode("The camera watches the kitchen, and 世界 too!")
    assert max(ordinary) < first


def test_round_trip_and_merges(toks):
    tok = toks["video-preview-tiny"]
    for text in ["héllo 世界 🎉", "  two  spaces\n\nand\ttabs", "12.5 seconds", "<|eot_id|>x<|silence|>"]:
        assert tok.decode(tok.encode(text)) == text
    sentence = "The camera watches the kitchen."
    assert len(tok.encode(sentence)) < len(sentence.encode()) / 1.5  # merges learned from the built-in corpus
    caption = "the yellow triangle turns green, the triangle is green"
    assert len(tok.encode(caption)) == len(caption.split()) + 1  # the synthetic task's words are one token each
    assert tok.encode("a<|silence|>b") == tok.encode("a") + [tok.token_to_id("<|silence|>")] + tok.encode("b")
    assert tok.decode(tok.encode("a<|silence|>b"), skip_special_tokens=True) == "ab"
    ids = tok.encode("hi", add_special_tokens=True)
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "hi"


def test_deterministic_and_corpus_argument():
    cfg = ml.config.preset("moss-vl-tiny")
    assert T.build_tiny_tokenizer(cfg).to_str() == T.build_tiny_tokenizer(cfg).to_str()
    custom = T.Tokenizer(T.build_tiny_tokenizer(cfg, corpus=["zyzzyva zyzzyva zyzzyva"] * 20), "moss_vl")
    assert len(custom.encode("zyzzyva")) == 1
    assert custom.token_to_id("<|image_pad|>") == cfg.tokens.image_token_id


def test_config_ids_win_and_clashes_are_named():
    cfg = ml.config.preset("video-preview-tiny")
    moved = cfg.replace(tokens=cfg.tokens.replace(silence_token_id=cfg.tokens.silence_token_id + 5))  # a free slot
    tok = T.Tokenizer(T.build_tiny_tokenizer(moved), "video_preview")
    assert tok.token_to_id("<|silence|>") == moved.tokens.silence_token_id
    clash = cfg.replace(tokens=cfg.tokens.replace(silence_token_id=cfg.tokens.bos_token_id))
    with pytest.raises(T.ProcessingError, match="several special tokens on one id"):
        T.build_tiny_tokenizer(clash)


def test_save_load_round_trip(toks, tmp_path):
    tok = toks["video-preview-tiny"]
    T.save_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == \
        ("<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>")
    assert config["added_tokens_decoder"]["502"]["content"] == "<|silence|>"
    loaded = T.load_tokenizer(tmp_path, "video_preview", realtime=True)
    text = "<|begin_of_text|>héllo <|video|> world<|eot_id|>"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.special_ids == tok.special_ids
    assert loaded.backend.to_str() == tok.backend.to_str()
    # transformers reads the same two files and agrees
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (496, 501, 498)


def _drop(path, names, keep_in_vocab=False):
    data = json.loads((path / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in names]
    if not keep_in_vocab:
        data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k not in names}
    (path / "tokenizer.json").write_text(json.dumps(data))


def test_missing_specials_lists_all_of_them(toks, tmp_path):
    T.save_tokenizer(toks["video-preview-tiny"], tmp_path)
    _drop(tmp_path, {"<|silence|>", "<|video|>"})
    _drop(tmp_path, {"<|...|>"}, keep_in_vocab=True)  # still in the vocab, but the text splits into pieces
    with pytest.raises(T.MissingSpecialTokensError) as err:
        T.load_tokenizer(tmp_path, "video_preview")
    assert err.value.missing == ["<|video|>", "<|silence|>", "<|...|>"]
    message = str(err.value)
    for name in ("<|video|>", "<|silence|>", "<|...|>", "tokenizer.json and tokenizer_config.json", "128011"):
        assert name in message
    assert "absent" in message and "encodes to" in message
    T.load_tokenizer(tmp_path, "mllama")  # vanilla Llama-3.2-Vision needs none of them


def test_realtime_requirements(toks, tmp_path):
    T.save_tokenizer(toks["moss-vl-tiny"], tmp_path)
    _drop(tmp_path, {"<|silence|>", "<|response|>"})
    T.load_tokenizer(tmp_path, "moss_vl")  # offline checkpoints need no decision tokens
    with pytest.raises(T.MissingSpecialTokensError) as err:
        T.load_tokenizer(tmp_path, "moss_vl", realtime=True)
    assert err.value.missing == ["<|silence|>", "<|response|>"]


def test_incremental_decoding_is_utf8_safe(toks):
    tok = toks["video-preview-tiny"]
    text = "héllo 世界 🎉"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters are split over several byte tokens
    dec = tok.incremental_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "" in pieces  # held back while a character was incomplete
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text
    assert "世界" in pieces or any("世" in p for p in pieces)


@pytest.mark.parametrize("skip", [False, True])
def test_incremental_matches_batch_decode_with_specials(toks, skip):
    tok = toks["moss-vl-tiny"]
    ids = tok.encode("<|im_start|>assistant\n<|silence|>🎉 ok<|im_end|>")
    ids = ids + tok.encode("世")[:2] + [tok.token_to_id("<|silence|>")]  # a character cut short by a special
    dec = tok.incremental_decoder(skip_special_tokens=skip)
    streamed = dec.extend(ids) + dec.flush()
    assert streamed == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|silence|>" in streamed) != skip


def test_incremental_fallback_for_other_decoders():
    backend = BackendTokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.add_special_tokens(["<|im_end|>"])
    tok = T.Tokenizer(backend, "moss_vl")
    dec = tok.incremental_decoder()
    ids = tok.encode("hello world")
    assert dec.extend(ids) + dec.flush() == tok.decode(ids) == "hello world"
