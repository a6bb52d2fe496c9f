"""MOSS-Video-Preview deltas over stock Mllama (spec §2.4, §3.3–3.5)."""

from __future__ import annotations

import math

import pytest
import torch

import mossvl_lab as ml
from reference import set_gates_nonzero


def _model(**overrides) -> ml.MossModel:
    torch.manual_seed(0)
    cfg = ml.config.override(ml.config.preset("video-preview-tiny"), overrides)
    model = ml.build_model(cfg).eval()
    set_gates_nonzero(model, torch.Generator().manual_seed(2))
    return model


def _clip(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = model.config.tokens.image_token_id
    ids = torch.tensor([[1, 11, 12, 13, image, 14, 15, image, 16, 17]])
    pixels = torch.randn(1, 2, 1, 3, 56, 56, generator=g)
    return ids, pixels


def test_11b_preset_pools_each_frame_to_101_tokens_of_width_7680():
    model = ml.build_model(ml.config.preset("moss-video-preview-11b"), device="meta")
    pixels = torch.empty(1, 3, 1, 3, 560, 560, device="meta")
    ids = torch.ones(1, 3, dtype=torch.long, device="meta")
    mask = torch.ones(1, 3, 1, dtype=torch.long, device="meta")
    assert tuple(model.vision.features(pixels, ids, mask).shape) == (1, 3, 1, 101, 7680)
    assert tuple(model.encode_frames(pixels, ids, mask).shape) == (1, 3, 101, 4096)


def _rotate_pairs(x: torch.Tensor, position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate pair (x[j], x[j + d/2]) by position * inv_freq[j], written as a complex product."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.polar(torch.ones_like(inv_freq.double()), position * inv_freq.double())
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def _llama3_inv_freq_from_transformers(text_cfg) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = text_cfg.rope
    hf = LlamaConfig(hidden_size=text_cfg.hidden_size, num_attention_heads=text_cfg.num_heads,
                     rope_theta=rope.theta, rope_scaling={
                         "rope_type": "llama3", "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
                         "high_freq_factor": rope.high_freq_factor,
                         "original_max_position_embeddings": rope.original_max_position_embeddings})
    return ROPE_INIT_FUNCTIONS["llama3"](hf)[0]


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("k_norm_before_rope", [False, True])
def test_cross_attention_keys_rotated_by_placeholder_position(k_norm_before_rope):
    """Each frame's keys carry the RoPE phase of its placeholder's text position; by default k_norm
    follows the rotation (MOSS-Video-Preview), and the order is a real, observable option."""
    pytest.importorskip("transformers")
    model = _model(**{"cross_attention.k_norm_before_rope": k_norm_before_rope})
    ids, pixels = _clip(model)
    layer = model.config.text.cross_attention_layers[0]
    attn = model.blocks[layer].cross_attn
    _, cache = model.run_with_cache(names_filter=["vision.hook_frame_tokens", f"blocks.{layer}.cross_attn.hook_rot_k"],
                                    input_ids=ids, pixel_values=pixels)
    states = cache["vision.hook_frame_tokens"]            # [frame, vis_per_frame, d_model]
    rotated = cache[f"blocks.{layer}.cross_attn.hook_rot_k"]  # [batch, kv_head, vis, d_head]
    text = model.config.text
    inv_freq = _llama3_inv_freq_from_transformers(text)
    placeholders = (ids[0] == model.config.tokens.image_token_id).nonzero().flatten().tolist()
    per_frame = states.shape[1]
    with torch.no_grad():
        for f, position in enumerate(placeholders):
            k = (states[f] @ attn.k_proj.weight.T).view(per_frame, text.num_kv_heads, text.d_head).transpose(0, 1)
            if k_norm_before_rope:
                expected = _rotate_pairs(_rms(k, attn.k_norm.weight, attn.k_norm.eps), position, inv_freq)
            else:
                expected = _rms(_rotate_pairs(k, position, inv_freq), attn.k_norm.weight, attn.k_norm.eps)
            got = rotated[0, :, f * per_frame:(f + 1) * per_frame]
            assert (got - expected).abs().max().item() < 1e-5


def test_key_norm_order_changes_the_keys():
    """With a learned (non-unit) k_norm weight, norm-then-rotate and rotate-then-norm differ."""
    layer = ml.config.preset("video-preview-tiny").text.cross_attention_layers[0]
    keys = []
    for before in (False, True):
        model = _model(**{"cross_attention.k_norm_before_rope": before})
        with torch.no_grad():
            model.blocks[layer].cross_attn.k_norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
        ids, pixels = _clip(model)
        _, cache = model.run_with_cache(names_filter=f"blocks.{layer}.cross_attn.hook_rot_k",
                                        input_ids=ids, pixel_values=pixels)
        keys.append(cache[f"blocks.{layer}.cross_attn.hook_rot_k"])
    assert (keys[0] - keys[1]).abs().max().item() > 1e-3


def test_tokens_before_the_first_frame_skip_cross_attention():
    """Rows that see no frame get nothing from either branch: their logits equal a text-only run."""
    model = _model()
    ids, pixels = _clip(model)
    first_frame = int((ids[0] == model.config.tokens.image_token_id).nonzero()[0])
    with torch.no_grad():
        with_frames = model(ids, pixel_values=pixels).logits
        text_only = model(ids[:, :first_frame]).logits
        zero_gates = [(lambda name: name.endswith(("hook_attn_gate", "hook_mlp_gate")),
                       lambda gate, hook: torch.zeros_like(gate))]
        with model.hooks(zero_gates):
            without_cross = model(ids, pixel_values=pixels).logits
        _, cache = model.run_with_cache(names_filter=lambda n: n.endswith(("hook_resid_pre", "hook_resid_post")),
                                        input_ids=ids, pixel_values=pixels)
    for layer in model.config.text.cross_attention_layers:  # the cross layers add exactly nothing there
        delta = cache[f"blocks.{layer}.hook_resid_post"] - cache[f"blocks.{layer}.hook_resid_pre"]
        assert torch.count_nonzero(delta[:, :first_frame]) == 0
        assert torch.count_nonzero(delta[:, first_frame:]) > 0
    assert (with_frames[:, :first_frame] - text_only).abs().max().item() <= 1e-6
    # the later rows do read the frames (the comparison above is not vacuous)
    assert (with_frames[:, first_frame:] - without_cross[:, first_frame:]).abs().max().item() > 1e-4


def test_training_quirk_is_available_as_an_option():
    """row_mask_branches="mlp" reproduces stock Mllama: rows before any frame attend uniformly to all frames."""
    model = _model(**{"cross_attention.row_mask_branches": "mlp"})
    ids, pixels = _clip(model)
    first_frame = int((ids[0] == model.config.tokens.image_token_id).nonzero()[0])
    with torch.no_grad():
        with_frames = model(ids, pixel_values=pixels).logits
        text_only = model(ids[:, :first_frame]).logits
    assert (with_frames[:, :first_frame] - text_only).abs().max().item() > 1e-4


def test_rope_tables_match_transformers_llama3():
    pytest.importorskip("transformers")
    text = ml.config.preset("moss-video-preview-11b").text
    from mossvl_lab.components.rope import llama3_inv_freq
    assert torch.allclose(llama3_inv_freq(text.d_head, text.rope), _llama3_inv_freq_from_transformers(text),
                          rtol=0, atol=0)
    assert math.isclose(float(llama3_inv_freq(text.d_head, text.rope)[0]), 1.0)
