"""MOSS-VL `config.json` (model_type "moss_vl", spec moss-vl §2.1, §3.1, §7.1) <-> `ModelConfig`.

The published files carry `text_config`, `vision_config` and the token ids at the top level; realtime-only
ids (`<|silence|>`, `<|response|>`) are not in config.json and are read when present (our own checkpoints
store them), otherwise taken from the tokenizer by the processor.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, ModelConfig, MossVisionConfig, RopeConfig, TextConfig, TokenConfig
from .presets import MOSS_VL_CROSS

_OPTIONAL_TOKENS = ("silence_token_id", "response_token_id", "ellipsis_token_id")


def moss_vl_from_hf(d: dict[str, Any]) -> ModelConfig:
    t, v = d.get("text_config") or {}, d.get("vision_config") or {}
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                           "intermediate_size", "vocab_size", "cross_attention_layers") if k not in t]
    if missing:
        raise ConfigError(f"moss_vl config.json: text_config lacks {missing}")
    scaling = t.get("rope_scaling") or t.get("rope_parameters") or {}
    if scaling.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"moss_vl text rope_type {scaling.get('rope_type')!r} is not supported (published: default)")
    rope = RopeConfig(kind="mrope_interleaved" if scaling.get("mrope_interleaved", True) else "mrope_chunked",
                      theta=float(t.get("rope_theta", scaling.get("rope_theta", 5_000_000.0))),
                      mrope_section=tuple(scaling.get("mrope_section", (24, 20, 20))))
    text = TextConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
                      num_heads=t["num_attention_heads"], num_kv_heads=t["num_key_value_heads"],
                      head_dim=t.get("head_dim"), intermediate_size=t["intermediate_size"],
                      rms_norm_eps=t.get("rms_norm_eps", 1e-6), rope=rope,
                      cross_attention_layers=tuple(t["cross_attention_layers"]), qk_norm=True,
                      max_position_embeddings=t.get("max_position_embeddings", 262144),
                      tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))))
    defaults = MossVisionConfig()
    vision = MossVisionConfig(
        depth=v.get("depth", defaults.depth), hidden_size=v.get("hidden_size", defaults.hidden_size),
        intermediate_size=v.get("intermediate_size", defaults.intermediate_size),
        num_heads=v.get("num_heads", defaults.num_heads), in_channels=v.get("in_channels", defaults.in_channels),
        patch_size=v.get("patch_size", defaults.patch_size),
        spatial_merge_size=v.get("spatial_merge_size", defaults.spatial_merge_size),
        temporal_patch_size=v.get("temporal_patch_size", defaults.temporal_patch_size),
        num_position_embeddings=v.get("num_position_embeddings", defaults.num_position_embeddings),
        deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", defaults.deepstack_visual_indexes)))
    out_hidden = v.get("out_hidden_size", text.hidden_size)
    if out_hidden != text.hidden_size:
        raise ConfigError(f"moss_vl vision_config.out_hidden_size={out_hidden} must equal text hidden_size "
                          f"{text.hidden_size} (the merger feeds cross-attention directly, spec §2.3)")
    if d.get("vision_seq_pad_multiple", 1) not in (1, None):
        raise ConfigError("vision_seq_pad_multiple != 1 is not supported (spec §2.3 step 8: padding caused shape bugs)")
    eos = t.get("eos_token_id", d.get("eos_token_id", 151645))
    bos = t.get("bos_token_id", d.get("bos_token_id", 151643))
    tokens = TokenConfig(image_token_id=int(d.get("image_token_id", 151655)), bos_token_id=int(bos),
                         eos_token_ids=tuple(eos) if isinstance(eos, list | tuple) else (int(eos),),
                         pad_token_id=int(d.get("pad_token_id", t.get("pad_token_id", bos))),
                         **{k: d[k] for k in _OPTIONAL_TOKENS if d.get(k) is not None})
    return ModelConfig(family="moss_vl", text=text, vision=vision, cross_attention=MOSS_VL_CROSS, tokens=tokens)


def moss_vl_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    t, v, tok = cfg.text, cfg.vision, cfg.tokens
    if not t.rope.kind.startswith("mrope"):
        raise ConfigError(f"text.rope.kind={t.rope.kind!r} cannot be written as a moss_vl config (mrope_*)")
    text = dict(model_type="moss_vl_text", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                cross_attention_layers=list(t.cross_attention_layers), num_attention_heads=t.num_heads,
                num_key_value_heads=t.num_kv_heads, head_dim=t.d_head, rms_norm_eps=t.rms_norm_eps,
                rope_theta=t.rope.theta,
                rope_scaling={"rope_type": "default", "mrope_section": list(t.rope.mrope_section),
                              "mrope_interleaved": t.rope.kind == "mrope_interleaved"},
                max_position_embeddings=t.max_position_embeddings, attention_bias=False, hidden_act="silu",
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_ids[0] if len(tok.eos_token_ids) == 1 else list(tok.eos_token_ids))
    vision = dict(model_type="moss_vl_vision", depth=v.depth, hidden_size=v.hidden_size,
                  intermediate_size=v.intermediate_size, num_heads=v.num_heads, in_channels=v.in_channels,
                  patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
                  temporal_patch_size=v.temporal_patch_size, num_position_embeddings=v.num_position_embeddings,
                  out_hidden_size=t.hidden_size, hidden_act="gelu_pytorch_tanh",
                  deepstack_visual_indexes=list(v.deepstack_visual_indexes))
    out = {"architectures": ["MossVLForConditionalGeneration"], "model_type": "moss_vl", "text_config": text,
           "vision_config": vision, "image_token_id": tok.image_token_id, "pad_token_id": tok.pad_token_id,
           "tie_word_embeddings": t.tie_word_embeddings, "vision_seq_pad_multiple": 1}
    out.update({k: getattr(tok, k) for k in _OPTIONAL_TOKENS if getattr(tok, k) is not None})
    return out
