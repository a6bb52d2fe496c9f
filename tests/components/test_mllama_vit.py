"""MllamaVisionTower: parity with transformers' Mllama ViT, taps, pooling, masks, tile slicing, errors."""

from __future__ import annotations

import math

import pytest
import torch

from mossvl_lab import registry
from mossvl_lab.components.vision.mllama_vit import MllamaVisionTower, VisionInputError
from mossvl_lab.components.vision.pooling import pool_patch_grid
from mossvl_lab.config import ConfigError, MllamaVisionConfig
from mossvl_lab.hooks import attach, name_hook_points

D, LAYERS, TAPS = 32, 4, (0, 2, 3)


def tiny_cfg(**changes) -> MllamaVisionConfig:
    base = MllamaVisionConfig(hidden_size=D, num_layers=LAYERS, num_global_layers=2, num_heads=4, intermediate_size=64,
                              image_size=56, patch_size=14, max_num_tiles=4, intermediate_layers_indices=TAPS)
    return base.replace(**changes)


def randomise(tower: torch.nn.Module, seed: int = 0) -> None:
    """Gates and tile tables start at zero / tiny; make every path matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "gate" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)  # non-zero gates in (-1, 1)
            elif "tile_embedding" in name or "tile_positional_embedding.embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def inputs(batch=2, media=2, tile=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, media, tile, 3, 56, 56, generator=g)


# media (0,0): 2x2 -> id 6, 4 tiles; (0,1): 1x2 -> id 2, 2 tiles; (1,0): 1x1 -> id 1, 1 tile; (1,1): padding media
MIXED_IDS = torch.tensor([[6, 2], [1, 0]])
MIXED_MASK = torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0]], [[1, 0, 0, 0], [0, 0, 0, 0]]])


def hf_vision_model(max_num_tiles: int):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.MllamaVisionConfig(
        hidden_size=D, num_hidden_layers=LAYERS, num_global_layers=2, attention_heads=4, intermediate_size=64,
        vision_output_dim=D * (1 + len(TAPS)), image_size=56, patch_size=14, max_num_tiles=max_num_tiles,
        intermediate_layers_indices=list(TAPS), norm_eps=1e-5,
        # a 1-tile model keeps 9 table rows (one tile each), so only the tile axis of the tables differs
        supported_aspect_ratios=None if max_num_tiles == 4 else [[1, 1]] * 8)
    hf_cfg._attn_implementation = "eager"
    model = transformers.MllamaVisionModel(hf_cfg).eval()
    assert model.config._attn_implementation == "eager"
    return model


@pytest.fixture(scope="module")
def hf_ref():
    torch.manual_seed(0)
    model = hf_vision_model(max_num_tiles=4)
    randomise(model, seed=3)
    return model


def test_parity_with_transformers(hf_ref):
    tower = MllamaVisionTower(tiny_cfg(intermediate_tap="layer_output"), d_model=48).eval()
    ours = {k: v.shape for k, v in tower.state_dict().items() if not k.startswith("multi_modal_projector.")}
    theirs = {k: v.shape for k, v in hf_ref.state_dict().items()}
    assert ours == theirs  # names and shapes 1:1 with the checkpoint keys under `vision_model.`
    tower.load_state_dict(hf_ref.state_dict(), strict=False)
    assert all(bool((p != 0).all()) for n, p in tower.named_parameters() if "gate" in n)

    pixels = inputs()
    with torch.no_grad():
        expected = hf_ref(pixels, MIXED_IDS, MIXED_MASK).last_hidden_state
        got = tower.features(pixels, MIXED_IDS, MIXED_MASK)
    assert got.shape == expected.shape == (2, 2, 4, 17, D * 4)
    assert (got - expected).abs().max() <= 1e-5


def test_tile_slicing_equals_stock_one_tile_model(hf_ref):
    """1 tile with max_num_tiles=4 == a stock 1-tile model holding only the first tile's table entries."""
    tower = MllamaVisionTower(tiny_cfg(intermediate_tap="layer_output"), d_model=48).eval()
    tower.load_state_dict(hf_ref.state_dict(), strict=False)
    one_tile = hf_vision_model(max_num_tiles=1)
    sliced = dict(hf_ref.state_dict())
    for key in ("pre_tile_positional_embedding.embedding.weight", "post_tile_positional_embedding.embedding.weight"):
        sliced[key] = sliced[key][:, :D]  # rows are [tile, d] flattened: tile 0 is the first D entries
    n = 17
    sliced["gated_positional_embedding.tile_embedding.weight"] = \
        sliced["gated_positional_embedding.tile_embedding.weight"].view(9, 4, n, D)[:, 0].reshape(9, n * D)
    one_tile.load_state_dict(sliced)

    pixels, ids, mask = inputs(tile=1), torch.tensor([[2, 5], [1, 8]]), torch.ones(2, 2, 1, dtype=torch.long)
    with torch.no_grad():
        expected = one_tile(pixels, ids, mask).last_hidden_state
        got = tower.features(pixels, ids, mask)
    assert got.shape == (2, 2, 1, 17, D * 4)
    assert (got - expected).abs().max() <= 1e-5


def _capture(tower, pixels, ids, mask):
    """Features plus each local layer's input (forward pre-hook) and output (hook_resid_post)."""
    layer_in, layer_out = {}, {}
    handles = [layer.register_forward_pre_hook(lambda m, args, i=i: layer_in.__setitem__(i, args[0]))
               for i, layer in enumerate(tower.transformer.layers)]
    points = name_hook_points(tower)
    record = [(f"transformer.layers.{i}.hook_resid_post", lambda x, hook, i=i: layer_out.__setitem__(i, x))
              for i in range(LAYERS)]
    try:
        with attach(points, record), torch.no_grad():
            feats = tower.features(pixels, ids, mask)
    finally:
        for h in handles:
            h.remove()
    return feats, layer_in, layer_out


def _tap(feats, j):
    """Tap j of the channel-interleaved intermediate block: [batch, media, tile, token, d_vision]."""
    inter = feats[..., D:]
    return inter.reshape(*inter.shape[:-1], D, inter.shape[-1] // D)[..., j]


def _unpad(state, batch, media, tile):
    """[frame, tile * padded, d] -> [batch, media, tile, 17, d] (drops the 7 zero pad tokens)."""
    return state.reshape(batch, media, tile, 24, D)[:, :, :, :17]


def test_layer_input_tap_is_the_input_of_local_layer():
    torch.manual_seed(0)
    taps = (0, 2, 4)  # 4 == num_layers: the local output, only nameable as a layer input
    tower_in = MllamaVisionTower(tiny_cfg(intermediate_layers_indices=taps), d_model=48).eval()
    randomise(tower_in)
    tower_out = MllamaVisionTower(tiny_cfg(intermediate_layers_indices=(0, 2, 3), intermediate_tap="layer_output"),
                                  d_model=48).eval()
    tower_out.load_state_dict(tower_in.state_dict())
    pixels = inputs(tile=2)
    ids, mask = torch.tensor([[2, 5], [2, 2]]), torch.ones(2, 2, 2, dtype=torch.long)

    feats_in, layer_in, layer_out = _capture(tower_in, pixels, ids, mask)
    for j, i in enumerate(taps[:2]):
        assert torch.equal(_tap(feats_in, j), _unpad(layer_in[i], 2, 2, 2))
    assert torch.equal(_tap(feats_in, 2), _unpad(layer_out[LAYERS - 1], 2, 2, 2))

    feats_out, _, _ = _capture(tower_out, pixels, ids, mask)
    for j, i in enumerate((0, 2, 3)):
        assert torch.equal(_tap(feats_out, j), _unpad(layer_out[i], 2, 2, 2))
    assert not torch.allclose(_tap(feats_in, 0), _tap(feats_out, 0))  # input of layer 0 != its output
    assert torch.equal(feats_in[..., :D], feats_out[..., :D])  # the final state does not depend on the tap kind


def test_layer_output_tap_cannot_name_past_the_last_layer():
    with pytest.raises(ConfigError, match="layer_output"):
        MllamaVisionTower(tiny_cfg(intermediate_layers_indices=(4,), intermediate_tap="layer_output"), d_model=8)


def test_average_pooling_matches_explicit_4x4_block_means():
    side, stride = 560 // 14, 4  # the MOSS setting: 40x40 patches, stride 4
    tokens = torch.randn(2, 1 + side * side, 3)
    got = pool_patch_grid(tokens, "average", stride)
    assert got.shape == (2, 1 + 10 * 10, 3)
    grid = tokens[:, 1:].reshape(2, side, side, 3)  # row-major patches
    expected = torch.empty(2, 100, 3)
    for r in range(10):
        for c in range(10):
            expected[:, r * 10 + c] = grid[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4].mean(dim=(1, 2))
    assert torch.equal(got[:, 0], tokens[:, 0])  # CLS kept first, untouched
    torch.testing.assert_close(got[:, 1:], expected)


def test_max_and_bilinear_pooling_on_blocks():
    side = 8
    tokens = torch.randn(3, 1 + side * side, 5)
    grid = tokens[:, 1:].reshape(3, side, side, 5)
    blocks = grid.reshape(3, 2, 4, 2, 4, 5)  # [n, row_block, row, col_block, col, d]
    torch.testing.assert_close(pool_patch_grid(tokens, "max", 4)[:, 1:].reshape(3, 2, 2, 5),
                               blocks.amax(dim=(2, 4)))
    # align_corners=False, downscale 4: each output samples the centre of its block, between rows/cols 1 and 2
    torch.testing.assert_close(pool_patch_grid(tokens, "bilinear", 4)[:, 1:].reshape(3, 2, 2, 5),
                               blocks[:, :, 1:3, :, 1:3].mean(dim=(2, 4)))
    assert pool_patch_grid(torch.randn(1, 1 + 10 * 10, 2), "bilinear", 4).shape == (1, 1 + 3 * 3, 2)  # ceil(10/4)
    assert pool_patch_grid(tokens, "none", 4) is tokens


def test_tower_pools_each_tile_after_removing_pad_tokens():
    torch.manual_seed(0)
    plain = MllamaVisionTower(tiny_cfg(patch_size=7), d_model=48).eval()  # 8x8 patches
    pooled = MllamaVisionTower(tiny_cfg(patch_size=7, pool_mode="average", pool_stride=2), d_model=48).eval()
    pooled.load_state_dict(plain.state_dict())
    pixels, ids, mask = inputs(tile=3), torch.tensor([[4, 7], [4, 4]]), torch.ones(2, 2, 3, dtype=torch.long)
    with torch.no_grad():
        full = plain.features(pixels, ids, mask)  # [2, 2, 3, 65, 128]
        got = pooled.features(pixels, ids, mask)
    expected = pool_patch_grid(full.reshape(12, 65, D * 4), "average", 2).reshape(2, 2, 3, 17, D * 4)
    assert torch.equal(got, expected)
    assert pooled.tokens_per_frame(3) == 3 * 17


def test_moss_11b_shapes_on_meta():
    cfg = MllamaVisionConfig(max_num_tiles=4, full_attention=True, pool_mode="average", pool_stride=4)
    with torch.device("meta"):
        tower = MllamaVisionTower(cfg, d_model=4096)
        pixels = torch.empty(1, 1, 1, 3, 560, 560)
        ids, mask = torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, 1, dtype=torch.long)
        assert tower.features(pixels, ids, mask).shape == (1, 1, 1, 101, 7680)
        assert tower(pixels, ids, mask).shape == (1, 1, 101, 4096)
    assert tower.tokens_per_frame(1) == 101
    assert tower.gated_positional_embedding.tile_embedding.weight.shape == (9, 8_197_120)  # spec §9
    assert tower.multi_modal_projector.weight.shape == (4096, 7680)
    assert list(tower.buffers()) == []  # all state is parameters


def _reference_attention(attn, x, hidden):
    """Independent multi-head attention from the weights. hidden [frame, query, key] bool (True = masked)."""
    heads = attn.num_heads
    q, k, v = (x @ proj.weight.T for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(hidden[:, None], float("-inf"))
    z = torch.softmax(scores, dim=-1) @ v
    return z.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1) @ attn.o_proj.weight.T


def test_full_attention_lets_pad_tokens_attend_to_each_other():
    torch.manual_seed(0)
    full = MllamaVisionTower(tiny_cfg(full_attention=True), d_model=48).eval()
    randomise(full)
    masked = MllamaVisionTower(tiny_cfg(full_attention=False), d_model=48).eval()
    masked.load_state_dict(full.state_dict())
    pixels, ids, mask = inputs(tile=1), torch.tensor([[1, 1], [1, 1]]), torch.ones(2, 2, 1, dtype=torch.long)

    seen = {}
    for name, tower in (("full", full), ("masked", masked)):
        attn = tower.transformer.layers[0].self_attn
        handle = attn.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
        with torch.no_grad():
            seen[name + "_feats"] = tower.features(pixels, ids, mask)
        handle.remove()

    x, out_full = seen["full"]
    pad = torch.arange(24) >= 17  # 17 real tokens (16 patches + CLS), 7 zero pad tokens
    with torch.no_grad():
        attn = full.transformer.layers[0].self_attn
        nothing_hidden = _reference_attention(attn, x, torch.zeros(4, 24, 24, dtype=torch.bool))
        pad_pairs_hidden = _reference_attention(attn, x, (pad[:, None] & pad[None, :]).expand(4, 24, 24))
    torch.testing.assert_close(out_full, nothing_hidden)
    x_masked, out_masked = seen["masked"]
    assert torch.equal(x_masked, x)
    torch.testing.assert_close(out_masked, pad_pairs_hidden)
    # real queries see every key in both modes; only pad queries differ in layer 0 ...
    torch.testing.assert_close(out_masked[:, ~pad], out_full[:, ~pad])
    assert not torch.allclose(out_masked[:, pad], out_full[:, pad], atol=1e-4)
    # ... and through them, real tokens differ after the next layers
    assert not torch.allclose(seen["full_feats"], seen["masked_feats"], atol=1e-4)


@pytest.mark.parametrize("case, match", [
    ("rank", r"\[batch, media, tile, channel, H, W\].*4-D shape \(2, 3, 56, 56\)"),
    ("size", r"48x48.*image_size 56x56"),
    ("channels", r"1 channels.*num_channels=3"),
    ("tiles", r"5 tiles.*max_num_tiles=4"),
    ("ids", r"aspect_ratio_ids must be \[batch, media\] = \(2, 2\); got \(2,\)"),
    ("mask", r"aspect_ratio_mask must be \[batch, media, tile\] = \(2, 2, 1\); got \(2, 2, 4\)"),
])
def test_named_input_errors(case, match):
    tower = MllamaVisionTower(tiny_cfg(num_layers=1, num_global_layers=1, intermediate_layers_indices=(0,)), d_model=8)
    pixels, ids, mask = torch.zeros(2, 2, 1, 3, 56, 56), torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, 1)
    if case == "rank":
        pixels = torch.zeros(2, 3, 56, 56)
    elif case == "size":
        pixels = torch.zeros(2, 2, 1, 3, 48, 48)
    elif case == "channels":
        pixels = torch.zeros(2, 2, 1, 1, 56, 56)
    elif case == "tiles":
        pixels, mask = torch.zeros(2, 2, 5, 3, 56, 56), torch.ones(2, 2, 5)
    elif case == "ids":
        ids = torch.ones(2, dtype=torch.long)
    elif case == "mask":
        mask = torch.ones(2, 2, 4)
    with pytest.raises(VisionInputError, match=match):
        tower(pixels, ids, mask)
    assert issubclass(VisionInputError, ValueError)


def test_forward_projects_features_and_hook_shapes():
    torch.manual_seed(0)
    tower = registry.build("vision", "mllama_vit", tiny_cfg(pool_mode="average", pool_stride=2), 48).eval()
    assert isinstance(tower, MllamaVisionTower)
    pixels, ids, mask = inputs(tile=2), torch.tensor([[2, 2], [2, 0]]), torch.tensor([[[1, 1]] * 2, [[1, 1], [0, 0]]])
    shapes = {}
    points = name_hook_points(tower)
    record = [(name, lambda x, hook: shapes.__setitem__(hook.name, tuple(x.shape))) for name in points]
    with attach(points, record), torch.no_grad():
        out = tower(pixels, ids, mask)
        feats = tower.features(pixels, ids, mask)
    assert out.shape == (2, 2, tower.tokens_per_frame(2), 48) == (2, 2, 2 * 5, 48)
    torch.testing.assert_close(out, tower.multi_modal_projector(feats).reshape(2, 2, 10, 48))
    assert list(points) == (["hook_patch_embed"] + [f"transformer.layers.{i}.hook_resid_post" for i in range(4)]
                            + [f"global_transformer.layers.{i}.hook_resid_post" for i in range(2)]
                            + ["hook_frame_tokens"])
    assert shapes["hook_patch_embed"] == (2 * 2 * 2, 16, D)  # [frame * tile, patch, d_vision]
    assert shapes["transformer.layers.0.hook_resid_post"] == (4, 2 * 24, D)  # [frame, tile * padded, d_vision]
    assert shapes["global_transformer.layers.1.hook_resid_post"] == (4, 2 * 24, D)
    assert shapes["hook_frame_tokens"] == (4, 10, 48)  # [frame, vis_per_frame, d_model]

    # a hook may replace the activation: zeroing the cross-attention states leaves only the projector bias
    with attach(points, [("hook_frame_tokens", lambda x, hook: torch.zeros_like(x))]), torch.no_grad():
        zeroed = tower(pixels, ids, mask)
    assert torch.equal(zeroed, torch.zeros_like(zeroed))  # bias initialises to zero
