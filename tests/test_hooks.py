"""Every hook point fires with its documented shape; hooks are scoped and leave no trace."""

from __future__ import annotations

import re

import pytest
import torch

import mossvl_lab as ml


def _inputs(model):
    cfg = model.config
    image = cfg.tokens.image_token_id
    ids = torch.tensor([[5, image, 6, 7, image, 8]])
    if cfg.vision.kind == "moss_vit":
        patch = cfg.vision.patch_size
        grids = torch.tensor([[1, 4, 4], [1, 2, 4]])  # merged (2, 2) and (1, 2): 5 and 3 keys with separators
        pixels = torch.randn(int((grids[:, 1] * grids[:, 2]).sum()), 3 * patch * patch)
        return dict(input_ids=ids, pixel_values=pixels, grid_thw=grids), 8
    size = cfg.vision.image_size
    pixels = torch.randn(1, 2, 1, 3, size, size)
    per_frame = cfg.vision.tokens_per_tile
    return dict(input_ids=ids, pixel_values=pixels), 2 * per_frame


def _expected(name: str, model, vis: int) -> tuple[int, ...] | None:
    """Documented shape of each hook (DESIGN §4 and the component docstrings); None = vision-internal."""
    t = model.config.text
    b, s, d, h, kv, dh = 1, 6, t.hidden_size, t.num_heads, t.num_kv_heads, t.d_head
    rules = [
        (r"hook_embed", (b, s, d)),
        (r"hook_logits", (b, s, t.vocab_size)),
        (r"blocks\.\d+\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out|cross_attn_out)", (b, s, d)),
        (r"blocks\.\d+\.hook_(attn_gate|mlp_gate)", (1,)),
        (r"blocks\.\d+\.hook_row_mask", (b, s)),
        (r"blocks\.\d+\.attn\.hook_(q|rot_q|z)", (b, h, s, dh)),
        (r"blocks\.\d+\.attn\.hook_(k|v|rot_k)", (b, kv, s, dh)),
        (r"blocks\.\d+\.attn\.hook_pattern", (b, h, s, s)),
        (r"blocks\.\d+\.cross_attn\.hook_(q|rot_q|z)", (b, h, s, dh)),
        (r"blocks\.\d+\.cross_attn\.hook_(k|v|rot_k)", (b, kv, vis, dh)),
        (r"blocks\.\d+\.cross_attn\.hook_pattern", (b, h, s, vis)),
        (r"blocks\.\d+\.cross_attn\.hook_visibility", (b, s, 2)),
    ]
    for pattern, shape in rules:
        if re.fullmatch(pattern, name):
            return shape
    return None


@pytest.mark.parametrize("preset", ["mllama-tiny", "video-preview-tiny", "moss-vl-tiny"])
def test_every_hook_fires_with_its_documented_shape(preset):
    torch.manual_seed(0)
    model = ml.build_model(ml.config.preset(preset)).eval()
    inputs, vis = _inputs(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    names = model.hook_names()
    assert sorted(cache) == sorted(names)  # every site fired
    d_vision = model.config.vision.hidden_size
    for name in names:
        shape = tuple(cache[name].shape)
        expected = _expected(name, model, vis)
        if expected is not None:
            assert shape == expected, name
        else:
            assert name.startswith("vision."), f"undocumented hook {name}"
            last = model.config.text.hidden_size if name == "vision.hook_frame_tokens" else d_vision
            assert shape[-1] == last, name
    assert cache[f"blocks.{model.config.text.cross_attention_layers[0]}.cross_attn.hook_visibility"].dtype == torch.bool


def test_hooks_are_removed_even_when_one_raises():
    model = ml.build_model(ml.config.preset("video-preview-tiny")).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits

    def explode(x, hook):
        raise RuntimeError("boom")

    state = ml.StreamState()
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks([("blocks.2.hook_resid_post", explode)]):
            model(ids, state=state)
    assert not any(point.active for point in model._hook_points.values())
    assert state.text.length == 0  # the failed step left the caches as they were
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_unknown_hook_name_suggests_similar_ones():
    from mossvl_lab.hooks import HookError

    model = ml.build_model(ml.config.preset("mllama-tiny"))
    with pytest.raises(HookError, match="hook_names"):
        with model.hooks([("blocks.1.attn.hook_pattern", lambda x, hook: None)]):  # block 1 is a cross layer
            pass
