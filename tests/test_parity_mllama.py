"""Parity with transformers' Mllama: a tiny random checkpoint written by `save_pretrained` loads with
`ml.load_model` and gives the same logits (eager, fp32, <= 1e-5) and the same greedy tokens.

transformers >= 4.54 reads the vision tower's intermediate taps from layer outputs while the original
(and our default) reads layer inputs, so the comparison selects `intermediate_tap="layer_output"`.
"""

from __future__ import annotations

import pytest
import torch

import mossvl_lab as ml
from reference import IMAGE_TOKEN, tiny_transformers_mllama

pytest.importorskip("transformers")
from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = tiny_transformers_mllama(seed=0)
    path = tmp_path_factory.mktemp("mllama")
    reference.save_pretrained(path)
    loaded = ml.load_model(path)
    cfg = ml.config.override(loaded.config, {"vision.intermediate_tap": "layer_output"})
    ours = ml.build_model(cfg)
    ours.load_state_dict(loaded.state_dict())
    return reference, ours.eval()


def _pixels(batch: int, media: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, media, 4, 3, 56, 56, generator=generator)


def _cross_mask(token_lists: list[list[int]], tiles: list[list[int]], length: int, pad_left: list[int]):
    """The Mllama processor's dense mask for left-padded sequences [batch, length, media, 4]."""
    sparse = [get_cross_attention_token_mask(ids, IMAGE_TOKEN) for ids in token_lists]
    dense = torch.from_numpy(convert_sparse_cross_attention_mask_to_dense(sparse, tiles, 4, max(map(len, token_lists))))
    out = torch.zeros(len(token_lists), length, dense.shape[2], 4, dtype=torch.long)
    for b, pad in enumerate(pad_left):
        n = len(token_lists[b])
        out[b, pad:pad + n] = dense[b, :n]
    return out


def _case_text_only(g):
    ids = torch.randint(5, 500, (2, 11), generator=g)
    return dict(input_ids=ids), torch.ones_like(ids, dtype=torch.bool)


def _case_one_image_four_tiles(g):
    ids = torch.cat([torch.tensor([[IMAGE_TOKEN, 1]]), torch.randint(5, 500, (1, 9), generator=g)], dim=1)
    inputs = dict(input_ids=ids, pixel_values=_pixels(1, 1, g), aspect_ratio_ids=torch.tensor([[6]]),  # (2, 2)
                  aspect_ratio_mask=torch.ones(1, 1, 4, dtype=torch.long),
                  cross_attention_mask=_cross_mask([ids[0].tolist()], [[4]], ids.shape[1], [0]))
    return inputs, torch.ones_like(ids, dtype=torch.bool)


def _case_two_images_padded_batch(g):
    """Item 0: text, image A (2 tiles), text, image B (3 tiles), text. Item 1: one image (1 tile), left-padded."""
    first = [1, 7, 8, IMAGE_TOKEN, 9, 10, 11, IMAGE_TOKEN, 12, 13, 14, 15]
    second = [1, IMAGE_TOKEN, 21, 22, 23, 24, 25]
    length, pad = len(first), len(first) - len(second)
    ids = torch.tensor([first, [0] * pad + second])
    mask = torch.tensor([[1] * length, [0] * pad + [1] * len(second)])
    pixels = _pixels(2, 2, g)
    pixels[1, 1] = 0  # padding media
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                  aspect_ratio_ids=torch.tensor([[2, 3], [1, 0]]),  # (1,2), (1,3); (1,1), padding
                  aspect_ratio_mask=torch.tensor([[[1, 1, 0, 0], [1, 1, 1, 0]], [[1, 0, 0, 0], [0, 0, 0, 0]]]),
                  cross_attention_mask=_cross_mask([first, second], [[2, 3], [1]], length, [0, pad]))
    return inputs, mask.bool()


CASES = {"text_only": _case_text_only, "one_image_4_tiles": _case_one_image_four_tiles,
         "two_images_partial_mask_padded_batch": _case_two_images_padded_batch}


def _hf_positions(inputs):
    mask = inputs.get("attention_mask")
    if mask is None:
        return None
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(pair, case):
    reference, ours = pair
    inputs, valid = CASES[case](torch.Generator().manual_seed(7))
    positions = _hf_positions(inputs)
    with torch.no_grad():
        expected = reference(**inputs, position_ids=positions).logits
        got = ours(**inputs).logits
    diff = (expected - got).abs()[valid].max().item()
    print(f"{case}: max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_transformers(pair, case):
    reference, ours = pair
    inputs, _ = CASES[case](torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = reference.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=2,
                                      pad_token_id=0)
        got = ours.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert got.shape == expected.shape
    assert torch.equal(got, expected), f"first mismatch at {(got != expected).nonzero()[:3].tolist()}"


def test_gates_are_live_in_the_comparison(pair):
    """Guard against a vacuous parity: zeroing our cross-attention gates must change image-conditioned logits."""
    _, ours = pair
    inputs, valid = CASES["one_image_4_tiles"](torch.Generator().manual_seed(3))
    zero_gates = [(name, lambda gate, hook: torch.zeros_like(gate))
                  for name in ours.hook_names() if name.endswith(("hook_attn_gate", "hook_mlp_gate"))]
    with torch.no_grad():
        live = ours(**inputs).logits
        with ours.hooks(zero_gates):
            dead = ours(**inputs).logits
    assert (live - dead).abs()[valid].max() > 1e-3
