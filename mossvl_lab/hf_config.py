"""Hugging Face `config.json` <-> `ModelConfig`.

`from_hf_dict` reads what transformers' `MllamaConfig` writes (4.x style `rope_theta` + `rope_scaling`, or 5.x
style `rope_parameters` carrying `rope_theta`) plus the MOSS-Video-Preview extras, whose key names in the released
checkpoints are unknown (spec §9/§10), so every alias the training code uses is accepted. `to_hf_dict` is the
inverse: transformers-loadable for family "mllama", with the MOSS extras added for "video_preview".

What an HF config cannot carry (and `to_hf_dict` therefore drops): `vision.intermediate_tap`, cross-attention
`row_mask_branches` / `gate` / `k_norm_before_rope`. `save_model` stores the exact config beside the HF fields, so
nothing is lost for our own checkpoints; a config read from HF fields gets the family's defaults for these.
No transformers import here: the mapping is plain data, checked against transformers by the tests.
"""

from __future__ import annotations

from typing import Any

from .config import (ConfigError, CrossAttentionConfig, MllamaVisionConfig, ModelConfig,
                     RopeConfig, TextConfig, TokenConfig)
from .presets import VIDEO_PREVIEW_CROSS


class UnsupportedModelTypeError(ConfigError):
    """config.json names a `model_type` this toolkit cannot build (yet); the message lists the supported ones."""


SUPPORTED_MODEL_TYPES = ("mllama", "moss_vl")  # MOSS-Video-Preview checkpoints are "mllama" plus extras

# Defaults of transformers' MllamaTextConfig / MllamaVisionConfig / MllamaConfig, used for keys a config.json
# omits. Note the vision image_size default is 448 there, while the 11B checkpoints store 560.
_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128256, hidden_size=4096, hidden_act="silu", num_hidden_layers=40, num_attention_heads=32,
    num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5, max_position_embeddings=131072,
    tie_word_embeddings=False, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], rope_theta=500000.0,
    bos_token_id=128000, eos_token_id=128001, pad_token_id=128004)
_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1280, hidden_act="gelu", num_hidden_layers=32, num_global_layers=8, attention_heads=16,
    num_channels=3, intermediate_size=5120, image_size=448, patch_size=14, norm_eps=1e-5, max_num_tiles=4,
    intermediate_layers_indices=[3, 7, 15, 23, 30],
    supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
_IMAGE_TOKEN_DEFAULT = 128256
# transformers' MllamaTextModel always adds 8 embedding rows past the LM head (row vocab_size = <|image|>)
_MLLAMA_EXTRA_EMBEDDINGS = 8

# MOSS-Video-Preview extras: our name -> accepted config.json keys (first one is what `to_hf_dict` writes)
_VIDEO_EXTRAS: dict[str, tuple[str, ...]] = {
    "pool_mode": ("pool_mode", "mllama_pool_mode"),
    "pool_stride": ("pool_stride", "mllama_pool_stride", "stride"),
    "use_full_attn": ("use_full_attn", "mllama_use_full_attn"),
    "add_video_position_encoding": ("add_video_position_encoding", "mllama_add_video_position_encoding"),
    "silence_token_id": ("silence_token_id",),
}
# Token ids that only matter to the streaming protocol; read when present, never a reason to switch family.
_OPTIONAL_TOKENS = ("ellipsis_token_id", "response_token_id")
# Training-code defaults (spec §9), used when a video checkpoint stores only some of the extras.
_VIDEO_DEFAULTS = {"pool_mode": "average", "pool_stride": 4, "use_full_attn": True,
                   "add_video_position_encoding": True, "silence_token_id": None}
_POOL_ALIASES = {"average": "average", "avg": "average", "mean": "average", "max": "max",
                 "bilinear": "bilinear", "none": "none"}


def from_hf_dict(d: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config dict (the parsed `config.json`)."""
    model_type = d.get("model_type")
    if model_type == "moss_vl":
        from .hf_moss_vl import moss_vl_from_hf
        return moss_vl_from_hf(d)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelTypeError(
            f"config.json model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(MOSS-Video-Preview checkpoints use 'mllama')")
    text = {**_TEXT_DEFAULTS, **(d.get("text_config") or {})}
    vision = {**_VISION_DEFAULTS, **(d.get("vision_config") or {})}
    extras = {name: _lookup(d, keys) for name, keys in _VIDEO_EXTRAS.items()}
    is_video = any(v is not None for v in extras.values()) or any(
        "video" in str(a).lower() for a in d.get("architectures") or [])
    if is_video:
        extras = {k: _VIDEO_DEFAULTS[k] if v is None else v for k, v in extras.items()}

    vision_cfg = _vision_from_hf(vision, extras if is_video else None)
    text_cfg = _text_from_hf(text, d)
    if is_video:
        cross = VIDEO_PREVIEW_CROSS.replace(key_rope="frame" if extras["add_video_position_encoding"] else "none")
    else:
        cross = CrossAttentionConfig()
    eos = _first(text, d, "eos_token_id")
    tokens = TokenConfig(
        image_token_id=int(d.get("image_token_index", d.get("image_token_id", _IMAGE_TOKEN_DEFAULT))),
        bos_token_id=_required_id(_first(text, d, "bos_token_id"), "bos_token_id"),
        eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [] if eos is None else [eos])),
        pad_token_id=_required_id(_first(text, d, "pad_token_id"), "pad_token_id"),
        silence_token_id=extras["silence_token_id"] if is_video else None,
        **{name: _lookup(d, (name,)) for name in _OPTIONAL_TOKENS})
    return ModelConfig(family="video_preview" if is_video else "mllama", text=text_cfg, vision=vision_cfg,
                       cross_attention=cross, tokens=tokens)


def _lookup(d: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """First alias found at the top level, then in vision_config, then in text_config (placement is unknown)."""
    for scope in (d, d.get("vision_config") or {}, d.get("text_config") or {}):
        for key in keys:
            if scope.get(key) is not None:
                return scope[key]
    return None


def _first(text: dict[str, Any], d: dict[str, Any], key: str) -> Any:
    """Token ids live in text_config (transformers 4.x and 5.x); some exports repeat them at the top level."""
    explicit = (d.get("text_config") or {})
    return explicit[key] if key in explicit else d.get(key, text[key])


def _required_id(value: Any, name: str) -> int:
    if value is None:
        raise ConfigError(f"config.json text_config.{name} is null; the model needs an id for it")
    return int(value)


def _square(value: Any, name: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ConfigError(f"vision_config.{name}={value} is not square; only square tiles are supported")
        value = value[0]
    return int(value)


def _vision_from_hf(v: dict[str, Any], extras: dict[str, Any] | None) -> MllamaVisionConfig:
    if v["hidden_act"] != "gelu":
        raise ConfigError(f"vision_config.hidden_act={v['hidden_act']!r}; the Mllama tower implements only 'gelu'")
    indices = tuple(v["intermediate_layers_indices"])
    hidden = int(v["hidden_size"])
    if "vision_output_dim" in v and v["vision_output_dim"] != hidden * (1 + len(indices)):
        raise ConfigError(
            f"vision_config.vision_output_dim={v['vision_output_dim']} but hidden_size {hidden} x (1 + "
            f"{len(indices)} intermediate_layers_indices) = {hidden * (1 + len(indices))}; fix one of them")
    pool = {}
    if extras is not None:
        mode = str(extras["pool_mode"]).lower()
        if mode not in _POOL_ALIASES:
            raise ConfigError(f"config.json pool_mode={extras['pool_mode']!r} is not implemented; supported: "
                              f"{sorted(set(_POOL_ALIASES.values()))} ('channelFusion' needs patch_merger, not built)")
        pool = dict(full_attention=bool(extras["use_full_attn"]), pool_mode=_POOL_ALIASES[mode],
                    pool_stride=int(extras["pool_stride"]))
    return MllamaVisionConfig(
        hidden_size=hidden, num_layers=int(v["num_hidden_layers"]), num_global_layers=int(v["num_global_layers"]),
        num_heads=int(v.get("num_attention_heads", v["attention_heads"])),
        intermediate_size=int(v["intermediate_size"]), image_size=_square(v["image_size"], "image_size"),
        patch_size=_square(v["patch_size"], "patch_size"), num_channels=int(v["num_channels"]),
        max_num_tiles=int(v["max_num_tiles"]), intermediate_layers_indices=indices,
        supported_aspect_ratios=tuple(tuple(int(x) for x in r) for r in v["supported_aspect_ratios"]),
        norm_eps=float(v["norm_eps"]), **pool)


def _text_from_hf(t: dict[str, Any], d: dict[str, Any]) -> TextConfig:
    if t["hidden_act"] != "silu":
        raise ConfigError(f"text_config.hidden_act={t['hidden_act']!r}; the decoder implements only 'silu' (SwiGLU)")
    hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
    head_dim = t.get("head_dim")
    tie = (d.get("text_config") or {}).get("tie_word_embeddings", d.get("tie_word_embeddings", False))
    return TextConfig(
        vocab_size=int(t["vocab_size"]), extra_embeddings=_MLLAMA_EXTRA_EMBEDDINGS, hidden_size=hidden,
        num_layers=int(t["num_hidden_layers"]), num_heads=heads, num_kv_heads=int(t["num_key_value_heads"]),
        head_dim=None if head_dim in (None, hidden // heads) else int(head_dim),
        intermediate_size=int(t["intermediate_size"]), rms_norm_eps=float(t["rms_norm_eps"]), rope=_rope_from_hf(t),
        cross_attention_layers=tuple(int(i) for i in t["cross_attention_layers"]),
        max_position_embeddings=int(t["max_position_embeddings"]), tie_word_embeddings=bool(tie))


def _rope_from_hf(t: dict[str, Any]) -> RopeConfig:
    # 5.x: rope_parameters = {rope_type, rope_theta, factor, ...}; 4.x: rope_theta beside rope_scaling (or null)
    params = t.get("rope_parameters") or t.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", t["rope_theta"]))
    if kind == "default":
        return RopeConfig(kind="default", theta=theta)
    if kind != "llama3":
        raise ConfigError(f"text_config rope_type={kind!r} is not implemented; supported: 'default', 'llama3'")
    base = RopeConfig()
    return RopeConfig(kind="llama3", theta=theta, factor=float(params.get("factor", base.factor)),
                      low_freq_factor=float(params.get("low_freq_factor", base.low_freq_factor)),
                      high_freq_factor=float(params.get("high_freq_factor", base.high_freq_factor)),
                      original_max_position_embeddings=int(params.get(
                          "original_max_position_embeddings", base.original_max_position_embeddings)))


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` fields of `cfg` (MllamaConfig layout; MOSS extras at the top level for video_preview).

    Family "moss_vl" writes the published MOSS-VL layout (hf_moss_vl). Raises ConfigError for what MllamaConfig cannot express
    (rope kinds other than default/llama3, q/k norm in self-attention, extra_embeddings != 8).
    """
    if cfg.family == "moss_vl":
        from .hf_moss_vl import moss_vl_to_hf
        return moss_vl_to_hf(cfg)
    t, v, tok = cfg.text, cfg.vision, cfg.tokens
    if not isinstance(v, MllamaVisionConfig):
        raise ConfigError(f"vision kind {v.kind!r} cannot be written as an Mllama config (mllama_vit only)")
    if t.rope.kind not in ("default", "llama3"):
        raise ConfigError(f"text.rope.kind={t.rope.kind!r} cannot be written as an Mllama config (default/llama3)")
    if t.qk_norm or t.extra_embeddings != _MLLAMA_EXTRA_EMBEDDINGS:
        raise ConfigError("text.qk_norm=True or text.extra_embeddings != 8 cannot be written as an Mllama config")
    rope = {"rope_type": t.rope.kind, "rope_theta": t.rope.theta}
    if t.rope.kind == "llama3":
        rope.update(factor=t.rope.factor, low_freq_factor=t.rope.low_freq_factor,
                    high_freq_factor=t.rope.high_freq_factor,
                    original_max_position_embeddings=t.rope.original_max_position_embeddings)
    text = dict(
        model_type="mllama_text_model", vocab_size=t.vocab_size, hidden_size=t.hidden_size, hidden_act="silu",
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size,
        # both spellings: transformers 5 reads rope_parameters, 4.x (what MOSS trained with) rope_theta + rope_scaling
        rope_parameters=rope, rope_theta=t.rope.theta,
        rope_scaling={k: x for k, x in rope.items() if k != "rope_theta"} if t.rope.kind == "llama3" else None,
        rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=t.tie_word_embeddings, cross_attention_layers=list(t.cross_attention_layers),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_ids[0] if len(tok.eos_token_ids) == 1 else list(tok.eos_token_ids),
        pad_token_id=tok.pad_token_id)
    if t.head_dim is not None:
        text["head_dim"] = t.head_dim
    vision = dict(
        model_type="mllama_vision_model", hidden_size=v.hidden_size, hidden_act="gelu", num_hidden_layers=v.num_layers,
        num_global_layers=v.num_global_layers, attention_heads=v.num_heads, num_channels=v.num_channels,
        intermediate_size=v.intermediate_size, vision_output_dim=v.vision_output_dim, image_size=v.image_size,
        patch_size=v.patch_size, norm_eps=v.norm_eps, max_num_tiles=v.max_num_tiles,
        intermediate_layers_indices=list(v.intermediate_layers_indices),
        supported_aspect_ratios=[list(r) for r in v.supported_aspect_ratios])
    video = cfg.family == "video_preview"
    out: dict[str, Any] = {
        "architectures": ["VideoMllamaForConditionalGeneration" if video else "MllamaForConditionalGeneration"],
        "model_type": "mllama", "image_token_index": tok.image_token_id, "tie_word_embeddings": t.tie_word_embeddings,
        "text_config": text, "vision_config": vision}
    if video:
        out.update(pool_mode=v.pool_mode, pool_stride=v.pool_stride, use_full_attn=v.full_attention,
                   add_video_position_encoding=cfg.cross_attention.key_rope == "frame",
                   silence_token_id=tok.silence_token_id)
    for name in _OPTIONAL_TOKENS:
        if getattr(tok, name) is not None:
            out[name] = getattr(tok, name)
    return out
