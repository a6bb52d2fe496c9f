"""Decoder blocks: self-attention blocks and gated cross-attention blocks, one list for both.

`model.blocks[l]` is a `SelfAttnBlock` or `CrossAttnBlock` by `cross_attention_layers`; each knows its
`kind` and `layer_idx`. Everything a block needs from the current forward arrives in one `DecoderContext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import CrossAttentionConfig, TextConfig
from ..hooks import HookPoint
from ..visibility import keys_from_frames
from .attention import SelfAttention
from .cross_attention import CrossAttention
from .mlp import SwiGLU
from .norms import RMSNorm
from .rope import Rotation

if TYPE_CHECKING:
    from ..cache import TextKVCache, VisionKVCache


@dataclass
class DecoderContext:
    """Per-forward inputs shared by all blocks (built once by the model)."""

    rotation: Rotation | None            # text positions of the new tokens, tables [batch, pos, d_head]
    self_allowed: torch.Tensor           # [batch, query_pos, key_pos] over cached + new text keys
    text_cache: "TextKVCache"
    vision_cache: "VisionKVCache"
    new_vision: torch.Tensor | None      # [batch, vis_new, d_model] states of frames added in this forward
    new_vision_rotation: Rotation | None  # [batch, vis_new, d_head]
    cross_allowed: torch.Tensor | None   # [batch, query_pos, vis] over every cached frame token; None = all
    frame_visibility: torch.Tensor | None  # [batch, query_pos, frame]
    row_mask: torch.Tensor | None        # [batch, query_pos] bool: sees at least one frame


def _hooks(module: nn.Module, *names: str) -> None:
    for name in names:
        setattr(module, name, HookPoint())


class SelfAttnBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)); then + mlp(norm(x)). Hooks [batch, pos, d_model]."""

    kind = "self"

    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.d_head,
                                       qk_norm=cfg.qk_norm, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        _hooks(self, "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")

    def forward(self, x: torch.Tensor, ctx: DecoderContext) -> torch.Tensor:
        x = self.hook_resid_pre(x)

        def cache_update(k: torch.Tensor, v: torch.Tensor):
            return ctx.text_cache.append(self.layer_idx, k, v)

        attn = self.self_attn(self.input_layernorm(x), ctx.rotation, ctx.self_allowed, cache_update)
        x = self.hook_resid_mid(x + self.hook_attn_out(attn))
        x = x + self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x)))
        return self.hook_resid_post(x)


class CrossAttnBlock(nn.Module):
    """x + g_attn * cross_attn(norm(x)); then + g_mlp * row_mask * mlp(norm(x)).

    With `row_mask_branches="both"` the attention branch of rows that see no frame is zero too.
    Hooks: hook_attn_gate / hook_mlp_gate carry the gate value actually applied ([1]);
    hook_row_mask [batch, query_pos] bool; cross_attn.hook_visibility [batch, query_pos, frame] bool.
    """

    kind = "cross"

    def __init__(self, cfg: TextConfig, cross: CrossAttentionConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn = CrossAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.d_head,
                                         cfg=cross, eps=cfg.rms_norm_eps)
        self.cross_attn.hook_visibility = HookPoint()
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.gated = cross.gate == "tanh_scalar"
        if self.gated:  # zero init: a freshly inserted layer starts as the identity (Flamingo / Mllama)
            self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
            self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))
        _hooks(self, "hook_resid_pre", "hook_attn_gate", "hook_cross_attn_out", "hook_resid_mid",
               "hook_mlp_gate", "hook_mlp_out", "hook_row_mask", "hook_resid_post")

    def gate_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention gate, mlp gate) as applied, each [1]."""
        if self.gated:
            return self.cross_attn_attn_gate.tanh(), self.cross_attn_mlp_gate.tanh()
        one = self.input_layernorm.weight.new_ones(1)
        return one, one

    def forward(self, x: torch.Tensor, ctx: DecoderContext) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        if ctx.new_vision is not None:
            k, v = self.cross_attn.project_vision(ctx.new_vision, ctx.new_vision_rotation)
            keys, values = ctx.vision_cache.append(self.layer_idx, k, v)
        else:
            keys, values = ctx.vision_cache.layer(self.layer_idx)
        allowed, row_mask = ctx.cross_allowed, ctx.row_mask
        visibility = self.cross_attn.hook_visibility(ctx.frame_visibility)
        if visibility is not ctx.frame_visibility:  # an intervention edited which frames rows see: hide keys too
            edited = keys_from_frames(visibility, ctx.vision_cache.key_frame)
            allowed = edited if allowed is None else allowed & edited
            row_mask = allowed.any(-1)
        row_mask = self.hook_row_mask(row_mask)
        attn_gate, mlp_gate = self.gate_values()
        attn = self.cross_attn(self.input_layernorm(x), ctx.rotation, keys, values, allowed, row_mask)
        x = self.hook_resid_mid(x + self.hook_attn_gate(attn_gate) * self.hook_cross_attn_out(attn))
        mlp = self.mlp(self.post_attention_layernorm(x)) * row_mask.unsqueeze(-1).to(x.dtype)
        x = x + self.hook_mlp_gate(mlp_gate) * self.hook_mlp_out(mlp)
        return self.hook_resid_post(x)
