"""Named configurations, listed by `mossvl_lab.config.presets()` and looked up by `preset(name)`.

Tiny presets are for tests and CPU training; `*-11b` presets carry the published shapes (build them on
device="meta" to inspect without allocating).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import (CrossAttentionConfig, MllamaVisionConfig, ModelConfig, MossVisionConfig, RopeConfig,
                     TextConfig, TokenConfig)

PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def _preset(name: str):
    def register(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        PRESETS[name] = fn
        return fn
    return register


_LLAMA3_ROPE = RopeConfig(kind="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)

# MOSS-Video-Preview cross-attention: keys rotated by their frame's placeholder position, k_norm after RoPE;
# rows before the first frame get nothing (matches streaming inference, where such layers are skipped;
# training let those rows attend uniformly to all frames, see spec §3.5 — set row_mask_branches="mlp" for that).
VIDEO_PREVIEW_CROSS = CrossAttentionConfig(key_rope="frame", k_norm_before_rope=False, row_mask_branches="both")


def _llama_tokens(vocab_size: int, silence: bool) -> TokenConfig:
    """Llama-3 ids for the real vocabulary. Small vocabularies mirror its layout: ordinary tokens first,
    the special tokens in the top 16 ids (begin, end, pad, headers, eot, silence, ellipsis, video, in that
    order, the rest free for the tokenizer), and <|image|> in the extra embedding row past the LM head."""
    if vocab_size == 128256:
        return TokenConfig(image_token_id=128256, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
                           pad_token_id=128004, silence_token_id=128011 if silence else None,
                           ellipsis_token_id=128012 if silence else None)
    top = vocab_size - 16
    return TokenConfig(image_token_id=vocab_size, bos_token_id=top, eos_token_ids=(top + 1, top + 5),
                       pad_token_id=top + 2, silence_token_id=top + 6 if silence else None,
                       ellipsis_token_id=top + 7 if silence else None)


def _tiny_vision(**changes: Any) -> MllamaVisionConfig:
    base = MllamaVisionConfig(hidden_size=32, num_layers=4, num_global_layers=2, num_heads=4, intermediate_size=64,
                              image_size=56, patch_size=7, max_num_tiles=4, intermediate_layers_indices=(1, 3),
                              norm_eps=1e-5)
    return base.replace(**changes)


def _tiny_text(**changes: Any) -> TextConfig:
    base = TextConfig(vocab_size=512, extra_embeddings=8, hidden_size=64, num_layers=5, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, rms_norm_eps=1e-5,
                      rope=_LLAMA3_ROPE.replace(original_max_position_embeddings=256),
                      cross_attention_layers=(1, 3), max_position_embeddings=4096)
    return base.replace(**changes)


@_preset("mllama-tiny")
def _mllama_tiny() -> ModelConfig:
    """Vanilla Llama-3.2-Vision at toy size: the parity target for transformers' Mllama."""
    return ModelConfig(family="mllama", text=_tiny_text(), vision=_tiny_vision(),
                       cross_attention=CrossAttentionConfig(), tokens=_llama_tokens(512, silence=False))


@_preset("video-preview-tiny")
def _video_preview_tiny() -> ModelConfig:
    """MOSS-Video-Preview at toy size: 1 tile/frame, full vision attention, 2-D average pooling 8x8 -> 4x4 (+CLS)."""
    return ModelConfig(family="video_preview", text=_tiny_text(),
                       vision=_tiny_vision(max_num_tiles=1, supported_aspect_ratios=((1, 1),), full_attention=True,
                                           pool_mode="average", pool_stride=2),
                       cross_attention=VIDEO_PREVIEW_CROSS, tokens=_llama_tokens(512, silence=True))


@_preset("video-preview-small")
def _video_preview_small() -> ModelConfig:
    """A few tens of millions of parameters: big enough for timing, small enough for a 2-core CPU."""
    vision = MllamaVisionConfig(hidden_size=256, num_layers=6, num_global_layers=2, num_heads=4, intermediate_size=1024,
                                image_size=224, patch_size=14, max_num_tiles=1, supported_aspect_ratios=((1, 1),),
                                intermediate_layers_indices=(1, 3, 5),
                                full_attention=True, pool_mode="average", pool_stride=4)
    text = TextConfig(vocab_size=8192, extra_embeddings=8, hidden_size=512, num_layers=10, num_heads=8,
                      num_kv_heads=2, intermediate_size=1536, rope=_LLAMA3_ROPE, cross_attention_layers=(2, 6),
                      max_position_embeddings=32768)
    return ModelConfig(family="video_preview", text=text, vision=vision, cross_attention=VIDEO_PREVIEW_CROSS,
                       tokens=_llama_tokens(8192, silence=True))


def _llama_11b_text() -> TextConfig:
    return TextConfig(vocab_size=128256, extra_embeddings=8, hidden_size=4096, num_layers=40, num_heads=32,
                      num_kv_heads=8, intermediate_size=14336, rms_norm_eps=1e-5, rope=_LLAMA3_ROPE,
                      cross_attention_layers=(3, 8, 13, 18, 23, 28, 33, 38), max_position_embeddings=131072)


@_preset("mllama-11b")
def _mllama_11b() -> ModelConfig:
    """Llama-3.2-11B-Vision shapes (stock tiles, masks and cross-attention)."""
    return ModelConfig(family="mllama", text=_llama_11b_text(), vision=MllamaVisionConfig(),
                       cross_attention=CrossAttentionConfig(), tokens=_llama_tokens(128256, silence=False))


@_preset("moss-video-preview-11b")
def _moss_video_preview_11b() -> ModelConfig:
    """MOSS-Video-Preview (spec §1–§3): Llama-3.2-11B-Vision with 1 tile, full ViT attention, avg-pool 4, key RoPE."""
    vision = MllamaVisionConfig(max_num_tiles=4, full_attention=True, pool_mode="average", pool_stride=4)
    return ModelConfig(family="video_preview", text=_llama_11b_text(), vision=vision,
                       cross_attention=VIDEO_PREVIEW_CROSS, tokens=_llama_tokens(128256, silence=True))


# ---- MOSS-VL (spec moss-vl §2–§4): SigLIP2-style tower, Qwen3 text stack, 3-D interleaved RoPE

MOSS_VL_CROSS = CrossAttentionConfig(key_rope="thw", k_norm_before_rope=True, row_mask_branches="both")


def _chatml_tokens(vocab_size: int) -> TokenConfig:
    """MOSS-VL ids for the real vocabulary (spec §3.1, §6.1; <|silence|> has no published id). Small vocabularies
    keep the ChatML specials in the top 16 ids: endoftext, im_start, im_end, vision_start, vision_end,
    image_pad, video_pad, time_start, time_end, silence, response, ellipsis (in that order)."""
    if vocab_size == 151936:
        return TokenConfig(image_token_id=151655, bos_token_id=151643, eos_token_ids=(151645,),
                           pad_token_id=151643, response_token_id=151672)
    top = vocab_size - 16
    return TokenConfig(image_token_id=top + 5, bos_token_id=top, eos_token_ids=(top + 2,), pad_token_id=top,
                       silence_token_id=top + 9, response_token_id=top + 10, ellipsis_token_id=top + 11)


@_preset("moss-vl-tiny")
def _moss_vl_tiny() -> ModelConfig:
    """MOSS-VL at toy size: 8 decoder layers (cross at 2 and 6, the S,S,X,S rhythm), 8-px patches merged 2x2."""
    vision = MossVisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                              num_position_embeddings=64, deepstack_visual_indexes=(1, 2))
    text = TextConfig(vocab_size=640, hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2, head_dim=32,
                      intermediate_size=128, rms_norm_eps=1e-6,
                      rope=RopeConfig(kind="mrope_interleaved", theta=5_000_000.0, mrope_section=(6, 5, 5)),
                      cross_attention_layers=(2, 6), qk_norm=True, max_position_embeddings=8192)
    return ModelConfig(family="moss_vl", text=text, vision=vision, cross_attention=MOSS_VL_CROSS,
                       tokens=_chatml_tokens(640))


@_preset("moss-vl-11b")
def _moss_vl_11b() -> ModelConfig:
    """MOSS-VL-Base/Instruct/Realtime shapes: 48 layers (12 cross), 27-block vision tower, 895 tensors."""
    text = TextConfig(vocab_size=151936, hidden_size=4096, num_layers=48, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=12288, rms_norm_eps=1e-6,
                      rope=RopeConfig(kind="mrope_interleaved", theta=5_000_000.0, mrope_section=(24, 20, 20)),
                      cross_attention_layers=tuple(range(2, 48, 4)), qk_norm=True, max_position_embeddings=262144)
    return ModelConfig(family="moss_vl", text=text, vision=MossVisionConfig(), cross_attention=MOSS_VL_CROSS,
                       tokens=_chatml_tokens(151936))
