"""The MOSS-VL family (spec moss-vl.md): checkpoint layout, 3-D positions, visibility, incremental == full."""

from __future__ import annotations

import torch

import mossvl_lab as ml
from mossvl_lab.positions import offline_positions
from mossvl_lab.visibility import cursor_positions
from reference import tiny_model

TOL = 1e-5


def _published_manifest() -> dict[str, tuple[int, ...]]:
    """The 895 tensors of spec §7.2, written out from the spec text (not from our model)."""
    keys: dict[str, tuple[int, ...]] = {}
    v = "model.visual."
    keys[v + "patch_embed.proj.weight"] = (1152, 3, 1, 16, 16)
    keys[v + "patch_embed.proj.bias"] = (1152,)
    keys[v + "pos_embed.weight"] = (2304, 1152)
    for i in range(27):
        b = f"{v}blocks.{i}."
        for norm in ("norm1", "norm2"):
            keys[b + norm + ".weight"] = keys[b + norm + ".bias"] = (1152,)
        keys[b + "attn.qkv.weight"], keys[b + "attn.qkv.bias"] = (3456, 1152), (3456,)
        keys[b + "attn.proj.weight"], keys[b + "attn.proj.bias"] = (1152, 1152), (1152,)
        keys[b + "mlp.linear_fc1.weight"], keys[b + "mlp.linear_fc1.bias"] = (4304, 1152), (4304,)
        keys[b + "mlp.linear_fc2.weight"], keys[b + "mlp.linear_fc2.bias"] = (1152, 4304), (1152,)
    for i in range(4):
        keys[f"{v}merger.norms.{i}.weight"] = keys[f"{v}merger.norms.{i}.bias"] = (1152,)
    keys[v + "merger.linear_fc1.weight"], keys[v + "merger.linear_fc1.bias"] = (18432, 18432), (18432,)
    keys[v + "merger.linear_fc2.weight"], keys[v + "merger.linear_fc2.bias"] = (4096, 18432), (4096,)
    t = "model.language_model."
    keys[t + "embed_tokens.weight"], keys[t + "norm.weight"] = (151936, 4096), (4096,)
    cross = set(range(2, 48, 4))
    for i in range(48):
        layer, attn = f"{t}layers.{i}.", "cross_attn." if i in cross else "self_attn."
        keys[layer + "input_layernorm.weight"] = keys[layer + "post_attention_layernorm.weight"] = (4096,)
        keys[layer + attn + "q_proj.weight"] = keys[layer + attn + "o_proj.weight"] = (4096, 4096)
        keys[layer + attn + "k_proj.weight"] = keys[layer + attn + "v_proj.weight"] = (1024, 4096)
        keys[layer + attn + "q_norm.weight"] = keys[layer + attn + "k_norm.weight"] = (128,)
        keys[layer + "mlp.gate_proj.weight"] = keys[layer + "mlp.up_proj.weight"] = (12288, 4096)
        keys[layer + "mlp.down_proj.weight"] = (4096, 12288)
        if i in cross:
            keys[layer + "cross_attn_attn_gate"] = keys[layer + "cross_attn_mlp_gate"] = (1,)
    keys["model.separator_token"], keys["lm_head.weight"] = (4096,), (151936, 4096)
    return keys


def test_11b_manifest_has_exactly_the_published_895_keys():
    expected = _published_manifest()
    assert len(expected) == 895
    ours = ml.checkpoint_manifest(ml.build_model(ml.config.preset("moss-vl-11b"), device="meta"))
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}
    count = sum(int(torch.Size(s).numel()) for s in ours.values())
    print(f"moss-vl-11b: {len(ours)} tensors, {count:,} parameters ({count / 1e9:.2f} B)")
    assert 11.0e9 < count < 11.5e9  # spec §1.1: about 11.3 B


def _model(seed=0) -> ml.MossModel:
    return tiny_model("moss-vl-tiny", seed)


def _frames(model, sizes, seed=0):
    """Random patches for frames of the given pixel sizes (multiples of 16 for the tiny preset)."""
    g = torch.Generator().manual_seed(seed)
    patch = model.config.vision.patch_size
    grids = [(1, h // patch, w // patch) for h, w in sizes]
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), model.config.vision.patch_dim, generator=g)
    return pixels, torch.tensor(grids)


def _text(model, n_frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    pad = model.config.tokens.image_token_id
    ids = [5, 6, 7]
    for _ in range(n_frames):
        ids += torch.randint(10, 500, (2,), generator=g).tolist() + [pad]
    return torch.tensor([ids + [8, 9]])


SIZES = [(32, 48), (64, 32), (16, 16)]  # pixels; merged grids (2, 3), (4, 2), (1, 1) at 16 px per merged token


def _merged(sizes, model):
    f = model.config.vision.merge_factor
    return [(h // f, w // f) for h, w in sizes]


def test_offline_positions_equal_incremental_positions_for_mixed_frame_sizes():
    model = _model()
    ids = _text(model, len(SIZES))
    grids = _merged(SIZES, model)
    offline = offline_positions(ids[0], model.config.tokens.image_token_id, grids)
    # the incremental rule, one token at a time through the cursor (spec §4.3)
    cursor, incremental = torch.zeros(1, dtype=torch.long), []
    frame = 0
    for token in ids[0].tolist():
        width = 1
        if token == model.config.tokens.image_token_id:
            width, frame = max(grids[frame]) + 1, frame + 1
        pos = cursor_positions(cursor, torch.ones(1, 1, dtype=torch.bool), torch.tensor([[width]]))
        incremental.append(int(pos))
        cursor = cursor + width
    assert incremental == offline.text.tolist()


def _rotate_mrope(x, positions_thw, theta, section):
    """Independent interleaved 3-D rotation: pair j uses axis h if j % 3 == 1 and j < 3 * section[1], w if
    j % 3 == 2 and j < 3 * section[2], else t; pair (x[j], x[j + d/2]) rotated by pos[axis] * theta^(-2j/d)."""
    d = x.shape[-1]
    half = d // 2
    out = x.clone().double()
    for j in range(half):
        axis = 1 if (j % 3 == 1 and j < 3 * section[1]) else 2 if (j % 3 == 2 and j < 3 * section[2]) else 0
        angle = positions_thw[axis].double() * theta ** (-2 * j / d)
        a, b = x[..., j].double(), x[..., j + half].double()
        out[..., j] = a * torch.cos(angle) - b * torch.sin(angle)
        out[..., j + half] = a * torch.sin(angle) + b * torch.cos(angle)
    return out.to(x.dtype)


def test_vision_keys_and_separator_get_the_documented_thw_positions():
    model = _model()
    ids = _text(model, len(SIZES))
    pixels, grid_thw = _frames(model, SIZES)
    layer = model.config.text.cross_attention_layers[0]
    attn = model.blocks[layer].cross_attn
    _, cache = model.run_with_cache(names_filter=["vision.hook_frame_tokens", f"blocks.{layer}.cross_attn.hook_rot_k"],
                                    input_ids=ids, pixel_values=pixels, grid_thw=grid_thw)
    states, rotated = cache["vision.hook_frame_tokens"], cache[f"blocks.{layer}.cross_attn.hook_rot_k"]
    text, rope = model.config.text, model.config.text.rope
    offline = offline_positions(ids[0], model.config.tokens.image_token_id, _merged(SIZES, model))
    with torch.no_grad():
        k = (states @ attn.k_proj.weight.T).view(-1, text.num_kv_heads, text.d_head).transpose(0, 1)
        k = attn.k_norm(k)  # MOSS-VL normalises before rotating
        expected = torch.cat([_rotate_mrope(k[:, sum(p.shape[1] for p in offline.keys[:f]):][:, :keys.shape[1]],
                                            keys[:, None, :], rope.theta, rope.mrope_section)
                              for f, keys in enumerate(offline.keys)], dim=1)
    assert rotated.shape[2] == sum(p.shape[1] for p in offline.keys)  # eh * ew + 1 separator per frame
    assert (rotated[0] - expected).abs().max().item() < 1e-4


def test_pure_text_reduces_to_1d_rope():
    cfg = ml.config.preset("moss-vl-tiny")
    from mossvl_lab.components.rope import build_rope
    mrope = build_rope(cfg.text.d_head, cfg.text.rope)
    plain = build_rope(cfg.text.d_head, cfg.text.rope.replace(kind="default"))
    positions = torch.arange(50)[None]
    a, b = mrope(positions), plain(positions)
    c = mrope(positions.expand(3, 1, -1))  # explicit equal (t, h, w)
    assert torch.equal(a.cos, b.cos) and torch.equal(a.sin, b.sin)
    assert torch.equal(c.cos, b.cos) and torch.equal(c.sin, b.sin)
    # and a whole text-only forward equals the same model with 1-D RoPE
    model = _model()
    variant = ml.build_model(ml.config.override(model.config, {"text.rope.kind": "default",
                                                                "cross_attention.key_rope": "frame"}))
    variant.load_state_dict(model.state_dict())
    ids = torch.randint(0, 500, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, variant.eval()(ids).logits)


def test_visibility_staircase_and_empty_rows():
    model = _model()
    ids = _text(model, len(SIZES))
    pixels, grid_thw = _frames(model, SIZES)
    layer = model.config.text.cross_attention_layers[0]
    names = [f"blocks.{layer}.cross_attn.hook_visibility", f"blocks.{layer}.cross_attn.hook_pattern",
             f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"]
    _, cache = model.run_with_cache(names_filter=names, input_ids=ids, pixel_values=pixels, grid_thw=grid_thw)
    placeholders = (ids[0] == model.config.tokens.image_token_id).nonzero().flatten()
    expected = torch.arange(ids.shape[1])[:, None] >= placeholders[None, :]  # sees frame j iff its pad is at/before
    assert torch.equal(cache[names[0]][0], expected)
    pattern = cache[names[1]][0]  # [head, query, vis]
    spans = [0]
    for t, h, w in grid_thw.tolist():
        spans.append(spans[-1] + (h // 2) * (w // 2) + 1)
    for q in range(ids.shape[1]):
        for f in range(len(SIZES)):
            mass = pattern[:, q, spans[f]:spans[f + 1]]
            if expected[q, f]:
                assert (mass[:, -1] > 0).all()  # the separator of a visible frame is attended
            else:
                assert torch.count_nonzero(mass) == 0
    first = int(placeholders[0])
    delta = cache[names[3]] - cache[names[2]]
    assert torch.count_nonzero(delta[:, :first]) == 0  # rows that see no frame get nothing from either branch
    assert torch.count_nonzero(delta[:, first:]) > 0


def test_incremental_equals_full_with_frames_appended_one_by_one():
    model = _model()
    ids = _text(model, len(SIZES))
    pixels, grid_thw = _frames(model, SIZES)
    pad = model.config.tokens.image_token_id
    patches = [t * h * w for t, h, w in grid_thw.tolist()]
    starts = [0] + torch.tensor(patches).cumsum(0).tolist()
    with torch.no_grad():
        full = model(ids, pixel_values=pixels, grid_thw=grid_thw).logits
        state, parts, frame = ml.StreamState(), [], 0
        parts.append(model(ids[:, :3], state=state).logits)
        for i in range(3, ids.shape[1]):
            token = ids[:, i:i + 1]
            if int(token) == pad:
                parts.append(model(token, pixel_values=pixels[starts[frame]:starts[frame + 1]],
                                   grid_thw=grid_thw[frame:frame + 1], state=state).logits)
                frame += 1
            else:
                parts.append(model(token, state=state).logits)
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= TOL
    # decode positions run through the rope delta: frames consumed more positions than tokens
    spans = sum(max(g) + 1 for g in _merged(SIZES, model)) - len(SIZES)
    assert int(state.rope_delta) == spans


def test_save_and_reload_is_bit_identical(tmp_path):
    model = _model()
    ml.save_model(model, tmp_path)
    again = ml.load_model(tmp_path)
    assert again.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ids = _text(model, 2)
    pixels, grid_thw = _frames(model, SIZES[:2])
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=pixels, grid_thw=grid_thw).logits,
                           again(ids, pixel_values=pixels, grid_thw=grid_thw).logits)


def test_checkpoint_with_only_a_published_style_config_json_loads(tmp_path):
    """Weights we wrote + a config.json holding only the published MOSS-VL fields (no mossvl_lab section)."""
    import json

    from mossvl_lab.hf_moss_vl import moss_vl_to_hf

    model = _model()
    ml.save_model(model, tmp_path)
    published = moss_vl_to_hf(model.config)
    assert "mossvl_lab" not in published and published["model_type"] == "moss_vl"
    (tmp_path / "config.json").write_text(json.dumps(published))
    again = ml.load_model(tmp_path)
    ids = _text(model, 1)
    pixels, grid_thw = _frames(model, SIZES[:1])
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=pixels, grid_thw=grid_thw).logits,
                           again(ids, pixel_values=pixels, grid_thw=grid_thw).logits)
