"""Token selection by hand: repetition penalty (control tokens exempt), top-k / top-p masks, generate's stopping,
streaming callback and the MOSS-VL decode mask."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.generation.sampling import (SamplingConfig, SamplingError, apply_repetition_penalty,
                                            control_token_ids, filter_logits, select_next_token)

NEG = float("-inf")


@pytest.fixture(scope="module")
def video_preview():
    cfg = ml.config.preset("video-preview-tiny")
    torch.manual_seed(0)
    return ml.build_model(cfg).eval(), ml.processor_for_model(cfg)


# --------------------------------------------------------------------------- repetition penalty by hand


def test_repetition_penalty_hf_semantics_with_exempt_ids():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    seen = torch.tensor([[0, 1, 1, 4, 5]])  # token 1 twice: penalised once, as transformers does
    got = apply_repetition_penalty(logits, seen, 2.0, exempt={4, 5})
    # seen and not exempt: 0 (positive -> / 2), 1 (negative -> * 2); 4, 5 exempt; 2, 3 unseen
    assert got.tolist() == [[1.0, -2.0, 0.5, 3.0, -2.0, 1.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]]  # input untouched
    # a penalty below 1 rewards repeats the same way (HF): 2 / 0.5 = 4, -1 * 0.5 = -0.5
    assert apply_repetition_penalty(logits, seen, 0.5).tolist() == [[4.0, -0.5, 0.5, 3.0, -1.0, 2.0]]


def test_repetition_penalty_rows_are_independent_and_negative_ids_ignored():
    logits = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    seen = torch.tensor([[0, -1], [2, 2]])
    assert apply_repetition_penalty(logits, seen, 4.0).tolist() == [[0.25, 1.0, 1.0], [1.0, 1.0, 0.25]]


@pytest.mark.parametrize("preset, names", [
    ("video-preview-tiny", ["<|silence|>", "<|...|>", "<|image|>", "<|eot_id|>", "<|begin_of_text|>",
                            "<|video|>", "<|start_header_id|>"]),
    ("moss-vl-tiny", ["<|silence|>", "<|response|>", "<|...|>", "<|image_pad|>", "<|time_start|>", "<|time_end|>",
                      "<|vision_start|>", "<|im_end|>", "<|im_start|>"]),
])
def test_control_token_ids_cover_the_family_specials_but_not_digits(preset, names):
    cfg = ml.config.preset(preset)
    processor = ml.processor_for_model(cfg)
    exempt = control_token_ids(cfg, processor)
    tok = processor.tokenizer
    for name in names:
        assert tok.token_to_id(name) in exempt, name
    assert cfg.tokens.silence_token_id in exempt and cfg.tokens.image_token_id in exempt
    digits = tok.encode("12.5 seconds")
    assert digits and not set(digits) & exempt  # timestamp text is ordinary text
    assert control_token_ids(cfg) <= exempt  # the config alone gives a subset


def test_select_next_token_keeps_silence_when_exempt():
    silence, word = 3, 1
    logits = torch.tensor([[0.0, 2.9, 0.0, 3.0]])
    seen = torch.tensor([[silence, silence]])
    cfg = SamplingConfig(repetition_penalty=2.0)
    assert select_next_token(logits, cfg, seen=seen, exempt={silence}).item() == silence
    assert select_next_token(logits, cfg, seen=seen).item() == word  # a stock penalty flips the decision
    window = SamplingConfig(repetition_penalty=2.0, repetition_window=1)
    assert select_next_token(logits, window, seen=torch.tensor([[silence, 0]])).item() == silence  # out of window


def _constant_logits(values: dict[int, float]):
    def hook(tensor, hook=None):
        out = torch.full_like(tensor, -10.0)
        for token, value in values.items():
            out[..., token] = value
        return out
    return hook


def test_generate_penalises_generated_words_not_prompt_nor_control_tokens(video_preview):
    model, _ = video_preview
    silence = model.config.tokens.silence_token_id
    a, b = 100, 101
    prompt = torch.tensor([[a, a, 7, 8]])  # `a` in the prompt is never penalised
    with model.hooks([("hook_logits", _constant_logits({silence: 3.0, a: 2.9, b: 1.0}))]):
        exempt = model.generate(prompt, max_new_tokens=4, repetition_penalty=2.0, eos_token_id=[])
        stock = model.generate(prompt, max_new_tokens=4, repetition_penalty=2.0, exempt_token_ids=(), eos_token_id=[])
    assert exempt[0, 4:].tolist() == [silence] * 4
    # stock penalty: silence 3.0 -> 1.5 once seen; a 2.9 wins; then a 1.45 < silence 1.5; silence again
    assert stock[0, 4:].tolist() == [silence, a, silence, silence]
    with model.hooks([("hook_logits", _constant_logits({a: 3.0, b: 2.0}))]):
        words = model.generate(prompt, max_new_tokens=3, repetition_penalty=2.0, eos_token_id=[])
        greedy = model.generate(prompt, max_new_tokens=3, eos_token_id=[])
    assert words[0, 4:].tolist() == [a, b, a]  # a 3 -> 1.5 beats b 2 -> 1 at step 3
    assert greedy[0, 4:].tolist() == [a, a, a]


# --------------------------------------------------------------------------- top-k / top-p masks by hand


def test_top_k_mask_and_temperature_by_hand():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert filter_logits(logits, SamplingConfig(do_sample=True, top_k=2)).tolist() == [[NEG, 4.0, 3.0, NEG]]
    assert filter_logits(logits, SamplingConfig(do_sample=True, top_k=2, temperature=2.0)).tolist() == \
        [[NEG, 2.0, 1.5, NEG]]
    assert filter_logits(logits, SamplingConfig(do_sample=True, top_k=10)).tolist() == [[1.0, 4.0, 3.0, 2.0]]


@pytest.mark.parametrize("top_p, kept", [(0.45, [0]), (0.51, [0, 1]), (0.79, [0, 1]), (0.81, [0, 1, 2]),
                                         (1.0, [0, 1, 2, 3])])
def test_top_p_mask_by_hand(top_p, kept):
    probs = [0.5, 0.3, 0.15, 0.05]  # mass before each token: 0, 0.5, 0.8, 0.95
    logits = torch.tensor([[math.log(p) for p in probs]])
    scores = filter_logits(logits, SamplingConfig(do_sample=True, top_p=top_p))
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == kept


def test_sampling_draws_only_inside_the_masks():
    logits = torch.tensor([[math.log(p) for p in (0.1, 0.5, 0.3, 0.1)]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = select_next_token(logits, SamplingConfig(do_sample=True, top_k=3, top_p=0.7), g)
    assert set(drawn.tolist()) == {1, 2}  # top-k keeps 1, 2, 0|3 ; top-p (0.5 + 0.3 >= 0.7) keeps 1, 2
    share = (drawn == 1).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.05


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(repetition_penalty=0.0), dict(repetition_penalty=-2.0),
                                    dict(temperature="1"), dict(top_k=2.5), dict(do_sample="yes"),
                                    dict(repetition_window=0)])
def test_bad_sampling_values_raise_sampling_error(kwargs):
    with pytest.raises(SamplingError):
        SamplingConfig(**kwargs)


def test_generate_rejects_bad_sampling_values(video_preview):
    model, _ = video_preview
    with pytest.raises(SamplingError, match="repetition_penalty"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, repetition_penalty=0)


# --------------------------------------------------------------------------- stopping, streaming


def test_stopping_event_and_on_token(video_preview):
    model, _ = video_preview
    prompt = torch.tensor([[5, 6, 7]])
    stop = threading.Event()
    streamed = []

    def on_token(ids):
        streamed.append(int(ids[0]))
        if len(streamed) == 3:
            stop.set()

    out = model.generate(prompt, max_new_tokens=50, eos_token_id=[], stopping=stop, on_token=on_token)
    assert out.shape == (1, 6) and out[0, 3:].tolist() == streamed
    full = model.generate(prompt, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(out, full)  # cancelling changes nothing about the tokens already chosen
    calls = []
    model.generate(prompt, max_new_tokens=10, eos_token_id=[], stopping=lambda: calls.append(1) or len(calls) > 2)
    assert len(calls) == 3  # checked before every token


def test_moss_vl_generate_with_processor_mask_equals_recomputation():
    """generate() reuses the prompt's last cross-attention mask row; MOSS-VL's mask is [batch, 1, pos, frame]."""
    cfg = ml.config.preset("moss-vl-tiny")
    torch.manual_seed(1)
    model = ml.build_model(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate"):
                param.uniform_(0.3, 1.2)
    processor = ml.processor_for_model(cfg)
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                       {"type": "text", "text": "What?"}]}])
    inputs = processor(text=text, videos=[frames], video_min_pixels=1024)  # 32x32 frames stay 32x32: fast
    out = model.generate(**inputs, max_new_tokens=4, eos_token_id=[])
    vision = {k: inputs[k] for k in ("pixel_values", "grid_thw", "media_nums_per_sample")}
    seq = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq, **vision).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)
