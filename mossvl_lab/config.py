"""Frozen configuration tree for every model family.

A `ModelConfig` holds one sub-config per swappable slot (text stack, vision tower, cross-attention,
special tokens). Variants are made with `cfg.replace(...)` or `override(cfg, {"text.rope.kind": "none"})`;
`__post_init__` only validates. JSON round-trips through `to_dict`/`from_dict`; reading a Hugging Face
`config.json` lives in `mossvl_lab.hf_config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

Family = Literal["mllama", "video_preview", "moss_vl"]
RopeKind = Literal["default", "llama3", "none", "mrope_interleaved", "mrope_chunked"]
KeyRope = Literal["none", "frame", "thw"]
RowMaskBranches = Literal["mlp", "both"]
GateKind = Literal["tanh_scalar", "ones"]
PoolMode = Literal["none", "average", "max", "bilinear"]
IntermediateTap = Literal["layer_input", "layer_output"]


class ConfigError(ValueError):
    """A configuration value is invalid or inconsistent; the message names the field."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_literal(owner: object, name: str) -> None:
    hint = typing.get_type_hints(type(owner))[name]
    allowed = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
    if allowed is not None:
        value = getattr(owner, name)
        _require(value in allowed, f"{type(owner).__name__}.{name}={value!r}; expected one of {allowed}")


class _Frozen:
    """Shared helpers of every config node."""

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Frozen):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_literal(self, f.name)
        self.validate()

    def validate(self) -> None:
        """Per-class checks; raise ConfigError naming the field."""


@dataclass(frozen=True, kw_only=True)
class RopeConfig(_Frozen):
    """Rotary embedding of the text stack (also reused for cross-attention keys)."""

    kind: RopeKind = "default"
    theta: float = 10000.0
    # llama3 frequency scaling (used only when kind == "llama3")
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # 3-D sections in rotary pairs, (t, h, w); used only by the mrope kinds
    mrope_section: tuple[int, ...] = (24, 20, 20)

    def validate(self) -> None:
        _require(self.theta > 0, f"RopeConfig.theta must be positive, got {self.theta}")
        _require(self.high_freq_factor > self.low_freq_factor,
                 "RopeConfig.high_freq_factor must exceed low_freq_factor")
        _require(len(self.mrope_section) == 3, "RopeConfig.mrope_section needs exactly 3 entries (t, h, w)")


@dataclass(frozen=True, kw_only=True)
class TextConfig(_Frozen):
    """Decoder LLM: self-attention blocks with cross-attention blocks at `cross_attention_layers`."""

    vocab_size: int
    extra_embeddings: int = 0  # embedding rows past the LM head (Mllama: 8, row vocab_size = <|image|>)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)
    cross_attention_layers: tuple[int, ...] = ()
    qk_norm: bool = False  # per-head q/k RMSNorm before RoPE in self-attention (Qwen3)
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + self.extra_embeddings

    def validate(self) -> None:
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"TextConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        _require(self.head_dim is not None or self.hidden_size % self.num_heads == 0,
                 "TextConfig.hidden_size must divide by num_heads when head_dim is not set")
        _require(self.d_head % 2 == 0, f"TextConfig head dim {self.d_head} must be even for RoPE")
        bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_layers]
        _require(not bad, f"TextConfig.cross_attention_layers {bad} outside 0..{self.num_layers - 1}")
        _require(list(self.cross_attention_layers) == sorted(set(self.cross_attention_layers)),
                 "TextConfig.cross_attention_layers must be sorted and unique")


@dataclass(frozen=True, kw_only=True)
class CrossAttentionConfig(_Frozen):
    """How text queries read the vision states."""

    # none: stock Mllama; frame: MOSS-Video-Preview (keys rotated by their frame's placeholder position);
    # thw: MOSS-VL (keys rotated by their (t, h, w) positions)
    key_rope: KeyRope = "none"
    k_norm_before_rope: bool = True
    # mlp: stock Mllama, only the MLP branch is zeroed for rows that see no frame, and such rows attend
    # uniformly to every vision key (the stock quirk, kept for parity). both: rows that see no frame get
    # nothing from either branch (MOSS-VL; equal to skipping the layer for those rows).
    row_mask_branches: RowMaskBranches = "mlp"
    gate: GateKind = "tanh_scalar"


@dataclass(frozen=True, kw_only=True)
class MllamaVisionConfig(_Frozen):
    """Mllama tiled ViT (+ MOSS-Video-Preview pooling) and its linear projector."""

    kind: Literal["mllama_vit"] = "mllama_vit"
    hidden_size: int = 1280
    num_layers: int = 32
    num_global_layers: int = 8
    num_heads: int = 16
    intermediate_size: int = 5120
    image_size: int = 560
    patch_size: int = 14
    num_channels: int = 3
    max_num_tiles: int = 4
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = (
        (1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    norm_eps: float = 1e-5
    # Which hidden state an intermediate index names. Meta's reference and transformers 4.46 (the version MOSS
    # trained with, spec §2.3 step 7) take the *input* of local layer i; transformers >= 4.54 takes its *output*.
    # The faithful default is the input; parity tests against a newer transformers select "layer_output".
    intermediate_tap: IntermediateTap = "layer_input"
    # True: no attention mask inside the tower (MOSS-Video-Preview); False: stock Mllama pad mask
    full_attention: bool = False
    pool_mode: PoolMode = "none"
    pool_stride: int = 4

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per tile entering the tower, CLS included."""
        return self.patches_per_side ** 2 + 1

    @property
    def pooled_per_side(self) -> int:
        if self.pool_mode == "none":
            return self.patches_per_side
        if self.pool_mode == "bilinear":
            return math.ceil(self.patches_per_side / self.pool_stride)
        return self.patches_per_side // self.pool_stride

    @property
    def tokens_per_tile(self) -> int:
        """Tokens per tile after pooling, CLS included (101 for the MOSS 11B setting)."""
        return self.pooled_per_side ** 2 + 1

    @property
    def vision_output_dim(self) -> int:
        """Width of the final state concatenated with the intermediate taps (7680 at full size)."""
        return self.hidden_size * (1 + len(self.intermediate_layers_indices))

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)

    def validate(self) -> None:
        _require(self.image_size % self.patch_size == 0, "MllamaVisionConfig.image_size must divide by patch_size")
        _require(self.hidden_size % self.num_heads == 0, "MllamaVisionConfig.hidden_size must divide by num_heads")
        # "layer_input" may name the final local output as index num_layers; "layer_output" stops one earlier
        top = self.num_layers if self.intermediate_tap == "layer_input" else self.num_layers - 1
        bad = [i for i in self.intermediate_layers_indices if not 0 <= i <= top]
        _require(not bad, f"MllamaVisionConfig.intermediate_layers_indices {bad} outside 0..{top} "
                          f"for intermediate_tap={self.intermediate_tap!r}")
        _require(self.pool_stride >= 1, "MllamaVisionConfig.pool_stride must be >= 1")
        too_big = [r for r in self.supported_aspect_ratios if r[0] * r[1] > self.max_num_tiles]
        _require(not too_big, f"MllamaVisionConfig.supported_aspect_ratios {too_big} need more than "
                              f"max_num_tiles={self.max_num_tiles} tiles")


@dataclass(frozen=True, kw_only=True)
class MossVisionConfig(_Frozen):
    """MOSS-VL's SigLIP2-style tower (spec moss-vl §2): patch 16, learned 48x48 position grid, 2-D RoPE,
    attention confined to each frame, deepstack taps, 2x2 merger MLP, learned separator after every frame."""

    kind: Literal["moss_vit"] = "moss_vit"
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 1
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    separator: bool = True  # a learned token appended after every frame's merged tokens

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch vector (channel x temporal x patch x patch = 768)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_factor(self) -> int:
        """Pixels per merged token along each side (32 at full size): the smart-resize factor."""
        return self.patch_size * self.spatial_merge_size

    @property
    def merger_input_dim(self) -> int:
        """(final + taps) x hidden x merge window (18432 at full size)."""
        return (1 + len(self.deepstack_visual_indexes)) * self.hidden_size * self.spatial_merge_size ** 2

    def validate(self) -> None:
        _require(self.hidden_size % self.num_heads == 0, "MossVisionConfig.hidden_size must divide by num_heads")
        _require(self.head_dim % 4 == 0, "MossVisionConfig head_dim must divide by 4 (2-D RoPE over rows and cols)")
        _require(self.position_grid_side ** 2 == self.num_position_embeddings,
                 "MossVisionConfig.num_position_embeddings must be a square (a learned grid)")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        _require(not bad, f"MossVisionConfig.deepstack_visual_indexes {bad} outside 0..{self.depth - 1}")
        _require(self.temporal_patch_size == 1, "MossVisionConfig.temporal_patch_size must be 1 (as published)")


@dataclass(frozen=True, kw_only=True)
class ToyConvConfig(_Frozen):
    """A small strided-conv encoder for fast CPU training and vision-tower ablations. It takes the Mllama
    processor's pixel layout (one tile per frame) and emits grid x grid tokens per frame."""

    kind: Literal["toy_conv"] = "toy_conv"
    image_size: int = 56
    num_channels: int = 3
    channels: tuple[int, ...] = (16, 32)
    grid: int = 4
    max_num_tiles: int = 1

    @property
    def hidden_size(self) -> int:
        return self.channels[-1]

    @property
    def tokens_per_tile(self) -> int:
        return self.grid * self.grid

    def validate(self) -> None:
        _require(len(self.channels) >= 1, "ToyConvConfig.channels needs at least one layer")
        _require(self.image_size % self.grid == 0, "ToyConvConfig.image_size must divide by grid")
        _require(self.max_num_tiles == 1, "ToyConvConfig.max_num_tiles must be 1")


VisionConfig = Union[MllamaVisionConfig, MossVisionConfig, ToyConvConfig]
_VISION_KINDS: dict[str, type] = {"mllama_vit": MllamaVisionConfig, "moss_vit": MossVisionConfig,
                                  "toy_conv": ToyConvConfig}


@dataclass(frozen=True, kw_only=True)
class TokenConfig(_Frozen):
    """Special token ids the model itself needs (the tokenizer owns the rest)."""

    image_token_id: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    silence_token_id: int | None = None
    response_token_id: int | None = None
    ellipsis_token_id: int | None = None


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Frozen):
    family: Family
    text: TextConfig
    vision: VisionConfig
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    tokens: TokenConfig

    def validate(self) -> None:
        t = self.tokens
        _require(0 <= t.image_token_id < self.text.embedding_rows,
                 f"tokens.image_token_id={t.image_token_id} outside the embedding table "
                 f"(rows={self.text.embedding_rows})")
        _require(self.cross_attention.key_rope != "thw" or self.text.rope.kind.startswith("mrope"),
                 "cross_attention.key_rope='thw' needs a 3-D text rope (text.rope.kind='mrope_*')")

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _build(cls, data, "config")

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


def _build(cls: type, data: Any, path: str) -> Any:
    """Rebuild a dataclass node from plain JSON data, converting lists back to tuples."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown} for {cls.__name__}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if hint is VisionConfig or (typing.get_origin(hint) is Union and MllamaVisionConfig in typing.get_args(hint)):
        kind = value.get("kind") if isinstance(value, dict) else None
        if kind not in _VISION_KINDS:
            raise ConfigError(f"{path}.kind={kind!r}; expected one of {sorted(_VISION_KINDS)}")
        return _build(_VISION_KINDS[kind], value, path)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return value
    if origin is tuple and isinstance(value, list):
        inner = typing.get_args(hint)
        inner_hint = inner[0] if inner else Any
        return tuple(_coerce(inner_hint, v, path) for v in value)
    return value


def override(cfg: ModelConfig, changes: dict[str, Any]) -> ModelConfig:
    """Return `cfg` with dotted-path fields replaced, e.g. {"text.rope.kind": "none"}.

    All changes are applied together and validated once, so changes that are only consistent as a set
    (a 1-D rope together with 1-D key rotation) work in one call. A whole sub-config may be given as a
    dict or a config object.
    """
    data = cfg.to_dict()
    for dotted, value in changes.items():
        node, parts = data, dotted.split(".")
        for depth, name in enumerate(parts):
            if not isinstance(node, dict) or name not in node:
                raise ConfigError(f"override: {dotted!r} does not name a config field "
                                  f"(no {name!r} under {'.'.join(parts[:depth]) or 'the config'})")
            if depth == len(parts) - 1:
                node[name] = value.to_dict() if isinstance(value, _Frozen) else value
            else:
                node = node[name]
    return ModelConfig.from_dict(data)


def presets() -> list[str]:
    """Names of the built-in presets (defined in mossvl_lab.presets)."""
    from .presets import PRESETS
    return sorted(PRESETS)


def preset(name: str) -> ModelConfig:
    """The preset config of that exact name."""
    from .presets import PRESETS
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
