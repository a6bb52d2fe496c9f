"""Mllama tiled ViT (Llama-3.2-Vision) as MOSS-Video-Preview runs it, plus its linear projector (spec §2.3–2.5).

Per media item: patch conv -> pre-tile aspect-ratio embedding -> CLS -> gated positional + tile-position
embedding -> layernorm_pre -> zero-pad tokens to a multiple of 8 -> local transformer (taps kept) ->
layernorm_post -> post-tile aspect-ratio embedding -> gated global transformer -> drop pad tokens ->
concat(final, taps channel-interleaved) -> 2-D pooling -> multi_modal_projector.
Both transformers see all tiles of one media item as one sequence, as Meta's reference and transformers do.

MOSS differences are config fields, never model-name branches: the aspect-ratio and tile-position tables are
sliced to the tiles actually given (spec §2.6.1; identical to stock when all `max_num_tiles` are given),
`full_attention`, `pool_mode`/`pool_stride`, and `intermediate_tap`.

Module and parameter names equal the checkpoint keys under `vision_model.`; `multi_modal_projector.*` is a
top-level key in the checkpoint (the checkpoint layer maps it).

Hook shapes:
    hook_patch_embed                                   [frame * tile, patch, d_vision]   conv output, no CLS
    transformer.layers.{l}.hook_resid_post             [frame, tile * padded_patch, d_vision]
    global_transformer.layers.{l}.hook_resid_post      [frame, tile * padded_patch, d_vision]
    hook_frame_tokens                                  [frame, vis_per_frame, d_model]   (cross-attention states)
where frame = batch * media, padded_patch = num_patches (CLS included) rounded up to a multiple of 8 and
vis_per_frame = tile * tokens_per_tile.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import MllamaVisionConfig
from ...hooks import HookPoint
from ...registry import register
from .pooling import pool_patch_grid

INIT_STD = 0.02  # transformers' Mllama initializer_range, used for linear, conv and table weights
OUTER_LN_EPS = 1e-5  # layernorm_pre/post use nn.LayerNorm's default in Meta's code and transformers, not norm_eps


class VisionInputError(ValueError):
    """pixel_values / aspect_ratio_ids / aspect_ratio_mask do not fit the vision tower."""


def pad_visibility(aspect_ratio_mask: torch.Tensor, num_tokens: int, padded: int) -> torch.Tensor:
    """Stock Mllama visibility: a (query, key) pair is hidden only when BOTH are pad positions.

    A pad position is one of the zero tokens added to reach a multiple of 8, or any token of a tile whose
    aspect_ratio_mask is 0. aspect_ratio_mask [frame, tile] (1 = real tile);
    returns [frame, 1, tile * padded, tile * padded] bool (True = may attend), broadcast over heads.
    """
    frame, tile = aspect_ratio_mask.shape
    token_pad = torch.arange(padded, device=aspect_ratio_mask.device) >= num_tokens  # [padded]
    pad = ((aspect_ratio_mask == 0)[:, :, None] | token_pad).reshape(frame, tile * padded)
    return ~(pad[:, None, :, None] & pad[:, None, None, :])


class VisionAttention(nn.Module):
    """Bias-free multi-head self-attention over one media item's tokens."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
        """x [frame, patch, d_vision]; visible [frame, 1, patch, patch] bool or None -> [frame, patch, d_vision]."""
        frame, patch, _ = x.shape
        q, k, v = (proj(x).view(frame, patch, self.num_heads, -1).transpose(1, 2)  # [frame, head, patch, d_head]
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        bias = None
        if visible is not None:
            # The stock additive mask uses finfo.min, not -inf: a row whose every key is hidden (a padding media
            # item) then attends uniformly, exactly as transformers does; a boolean SDPA mask would zero it.
            bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~visible, torch.finfo(q.dtype).min)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [frame, head, patch, d_head]
        return self.o_proj(z.transpose(1, 2).reshape(frame, patch, -1))


class VisionMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as hidden_act="gelu"


class VisionEncoderLayer(nn.Module):
    """Pre-LN block; global layers scale both branches by tanh(gate_attn) / tanh(gate_ffn)."""

    def __init__(self, cfg: MllamaVisionConfig, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.self_attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if gated:
            # tanh(pi/4) ~ 0.66: global layers contribute from the start (transformers' constructor value)
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))
        self.hook_resid_post = HookPoint()  # [frame, tile * padded_patch, d_vision]

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
        """x [frame, patch, d_vision] -> [frame, patch, d_vision]."""
        h = self.self_attn(self.input_layernorm(x), visible)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        x = x + (self.gate_ffn.tanh() * h if self.gated else h)
        return self.hook_resid_post(x)


class VisionEncoder(nn.Module):
    """A plain layer list; the tower drives it so it can keep intermediate taps."""

    def __init__(self, cfg: MllamaVisionConfig, num_layers: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg, gated) for _ in range(num_layers))


class AspectRatioEmbedding(nn.Module):
    """One gated vector per tile, looked up by aspect-ratio id (checkpoint: {pre,post}_tile_positional_embedding)."""

    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * cfg.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))  # zero: the table starts switched off

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x [frame, tile, patch, d_vision]; aspect_ratio_ids [frame] -> same shape as x."""
        frame, tile, _, d = x.shape
        # rows are tile-major, so the first `tile` tiles are a prefix of each row (MOSS slicing, spec §2.6.1)
        table = self.embedding.weight[:, : tile * d][aspect_ratio_ids].view(frame, tile, 1, d)
        return x + self.gate.tanh() * table


class GatedPositionalEmbedding(nn.Module):
    """(1 - tanh g) * per-patch position + tanh g * per-(aspect ratio, tile, patch) position."""

    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        d, n = cfg.hidden_size, cfg.num_patches
        self.embedding = nn.Parameter(d ** -0.5 * torch.randn(n, d))  # [patch, d_vision], CLS first
        self.gate = nn.Parameter(torch.zeros(1))
        self.tile_embedding = nn.Embedding(cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * n * d)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x [frame, tile, patch, d_vision] (CLS included); aspect_ratio_ids [frame] -> same shape as x."""
        frame, tile, n, d = x.shape
        g = self.gate.tanh()
        tiles = self.tile_embedding.weight[:, : tile * n * d][aspect_ratio_ids].view(frame, tile, n, d)
        return x + (1 - g) * self.embedding + g * tiles


@register("vision", "mllama_vit")
class MllamaVisionTower(nn.Module):
    """Mllama ViT + taps + 2-D pooling + projector: media tiles -> cross-attention states."""

    def __init__(self, cfg: MllamaVisionConfig, d_model: int) -> None:
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        offset = 0 if cfg.intermediate_tap == "layer_input" else 1
        # state s is the input of local layer s; s = num_layers is the local output
        self._tap_states = [i + offset for i in cfg.intermediate_layers_indices]  # range checked by the config
        d = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.hook_patch_embed = HookPoint()  # [frame * tile, patch, d_vision]
        self.class_embedding = nn.Parameter(d ** -0.5 * torch.randn(d))
        self.gated_positional_embedding = GatedPositionalEmbedding(cfg)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(d, eps=OUTER_LN_EPS)
        self.layernorm_post = nn.LayerNorm(d, eps=OUTER_LN_EPS)
        self.transformer = VisionEncoder(cfg, cfg.num_layers, gated=False)
        self.global_transformer = VisionEncoder(cfg, cfg.num_global_layers, gated=True)
        self.multi_modal_projector = nn.Linear(cfg.vision_output_dim, d_model, bias=True)
        self.hook_frame_tokens = HookPoint()  # [frame, vis_per_frame, d_model]
        self._init_weights()

    def _init_weights(self) -> None:
        # transformers' scheme; gates and the scaled-randn class/position embeddings are set in the constructors
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=INIT_STD)
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def tokens_per_frame(self, num_tiles: int) -> int:
        """Vision tokens one media item with `num_tiles` tiles yields (101 for MOSS: 1 tile, 10x10 pooled + CLS)."""
        return num_tiles * self.cfg.tokens_per_tile

    def _check_inputs(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      aspect_ratio_mask: torch.Tensor) -> None:
        cfg = self.cfg
        if pixel_values.dim() != 6:
            raise VisionInputError(
                f"pixel_values must be [batch, media, tile, channel, H, W] (6-D); got {pixel_values.dim()}-D shape "
                f"{tuple(pixel_values.shape)}. One single-tile image per batch item is pixel_values[:, None, None].")
        batch, media, tile, channel, h, w = pixel_values.shape
        if channel != cfg.num_channels:
            raise VisionInputError(f"pixel_values has {channel} channels (axis 3 of [batch, media, tile, channel, "
                                   f"H, W]); the tower expects num_channels={cfg.num_channels}")
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise VisionInputError(f"pixel_values tiles are {h}x{w}; the tower expects image_size "
                                   f"{cfg.image_size}x{cfg.image_size} (resize and pad with the image processor)")
        if not 1 <= tile <= cfg.max_num_tiles:
            raise VisionInputError(f"pixel_values has {tile} tiles per media item; expected 1..max_num_tiles="
                                   f"{cfg.max_num_tiles}")
        if tuple(aspect_ratio_ids.shape) != (batch, media):
            raise VisionInputError(f"aspect_ratio_ids must be [batch, media] = {(batch, media)}; got "
                                   f"{tuple(aspect_ratio_ids.shape)}")
        if tuple(aspect_ratio_mask.shape) != (batch, media, tile):
            raise VisionInputError(f"aspect_ratio_mask must be [batch, media, tile] = {(batch, media, tile)}; got "
                                   f"{tuple(aspect_ratio_mask.shape)}")

    def features(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                 aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """Tower output before the projector.

        pixel_values [batch, media, tile, channel, H, W]; aspect_ratio_ids [batch, media] long (0 = padding media);
        aspect_ratio_mask [batch, media, tile] (1 = real tile)
        returns [batch, media, tile, tokens_per_tile, vision_output_dim]
        """
        self._check_inputs(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        cfg, d = self.cfg, self.cfg.hidden_size
        batch, media, tile = pixel_values.shape[:3]
        frame = batch * media
        ids = aspect_ratio_ids.reshape(frame)

        x = pixel_values.reshape(frame * tile, *pixel_values.shape[3:]).to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [frame * tile, patch, d_vision]
        x = self.hook_patch_embed(x)
        x = self.pre_tile_positional_embedding(x.reshape(frame, tile, -1, d), ids)  # [frame, tile, patch, d_vision]
        x = torch.cat([self.class_embedding.expand(frame, tile, 1, d), x], dim=2)  # CLS first
        x = self.layernorm_pre(self.gated_positional_embedding(x, ids))

        n = cfg.num_patches
        padded = -(-n // 8) * 8  # the reference pads with zero tokens to a multiple of 8 (1601 -> 1608)
        x = F.pad(x, (0, 0, 0, padded - n)).reshape(frame, tile * padded, d)  # [frame, tile * padded, d_vision]
        visible = None if cfg.full_attention else pad_visibility(aspect_ratio_mask.reshape(frame, tile), n, padded)

        taps: dict[int, torch.Tensor] = {}  # only the tapped states, so the others can be freed
        for s, layer in enumerate(self.transformer.layers):
            if s in self._tap_states:
                taps[s] = x
            x = layer(x, visible)
        taps[cfg.num_layers] = x
        x = self.layernorm_post(x).view(frame, tile, padded, d)
        x = self.post_tile_positional_embedding(x, ids).reshape(frame, tile * padded, d)
        for layer in self.global_transformer.layers:
            x = layer(x, visible)

        parts = [x.view(frame, tile, padded, d)]
        if self._tap_states:
            # stacked on a new LAST axis then flattened: channel-interleaved (d0 of every tap, then d1, ...)
            tapped = torch.stack([taps[s] for s in self._tap_states], dim=-1)  # [frame, tile*padded, d_vision, tap]
            parts.append(tapped.reshape(frame, tile, padded, -1))
        out = torch.cat(parts, dim=-1)[:, :, :n]  # drop pad tokens: [frame, tile, patch, vision_output_dim]
        out = pool_patch_grid(out.reshape(frame * tile, n, -1), cfg.pool_mode, cfg.pool_stride)
        return out.reshape(batch, media, tile, cfg.tokens_per_tile, cfg.vision_output_dim)

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """Same inputs as `features`; returns cross-attention states [batch, media, tile * tokens_per_tile, d_model]."""
        feats = self.features(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        batch, media = feats.shape[:2]
        x = self.multi_modal_projector(feats).reshape(batch * media, -1, self.d_model)  # [frame, vis, d_model]
        x = self.hook_frame_tokens(x)
        return x.reshape(batch, media, -1, self.d_model)
