"""Gated cross-attention from text queries to cached vision keys/values.

Vision K/V are computed once per frame (`project_vision`) and cached already normalised and rotated;
queries read them under a frame-prefix visibility mask. Variation between families is explicit config:
`key_rope` (none / frame / thw), `k_norm_before_rope`, and which branches the row mask multiplies.
"""

from __future__ import annotations

import torch

from ..config import CrossAttentionConfig
from ..hooks import HookPoint
from .attention import HeadProjections, attend
from .norms import RMSNorm
from .rope import Rotation, apply_rope


class CrossAttention(HeadProjections):
    """Hook shapes: hook_q/hook_rot_q [batch, head, query_pos, d_head]; hook_k/hook_rot_k/hook_v
    [batch, kv_head, vis, d_head] (new frames only, at encode time); hook_pattern [batch, head, query_pos, vis];
    hook_z [batch, head, query_pos, d_head]."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, d_head: int, *,
                 cfg: CrossAttentionConfig, eps: float) -> None:
        super().__init__(d_model, num_heads, num_kv_heads, d_head)
        self.q_norm = RMSNorm(d_head, eps)
        self.k_norm = RMSNorm(d_head, eps)
        self.rotate = cfg.key_rope != "none"
        self.k_norm_before_rope = cfg.k_norm_before_rope
        self.zero_empty_rows = cfg.row_mask_branches == "both"
        self.force_eager = False
        for name in ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_pattern", "hook_z"):
            setattr(self, name, HookPoint())

    def project_vision(self, states: torch.Tensor, rotation: Rotation | None) -> tuple[torch.Tensor, torch.Tensor]:
        """states [batch, vis, d_model]; rotation tables [batch, vis, d_head] (None: no key RoPE).
        Returns cacheable keys (normalised, rotated) and raw values, each [batch, kv_head, vis, d_head]."""
        k = self.hook_k(self.split(self.k_proj(states), self.num_kv_heads))
        v = self.hook_v(self.split(self.v_proj(states), self.num_kv_heads))
        if not self.rotate:
            return self.hook_rot_k(self.k_norm(k)), v
        if self.k_norm_before_rope:  # MOSS-VL
            k = apply_rope(self.k_norm(k), rotation)
        else:  # MOSS-Video-Preview normalises after rotating; k_norm's weight makes the order matter
            k = self.k_norm(apply_rope(k, rotation))
        return self.hook_rot_k(k), v

    def forward(self, x: torch.Tensor, rotation: Rotation | None, keys: torch.Tensor, values: torch.Tensor,
                allowed: torch.Tensor | None, row_mask: torch.Tensor) -> torch.Tensor:
        """x [batch, query_pos, d_model]; keys/values [batch, kv_head, vis, d_head];
        allowed [batch, query_pos, vis] bool or None (every key visible); row_mask [batch, query_pos] bool
        (sees at least one frame). Returns [batch, query_pos, d_model]."""
        q = self.hook_q(self.split(self.q_proj(x), self.num_heads))
        q = self.hook_rot_q(apply_rope(self.q_norm(q), rotation if self.rotate else None))
        # A row that sees no frame has no defined softmax: stock Mllama lets it attend uniformly to every
        # vision key (kept for parity); with zero_empty_rows its output and pattern are zeroed below.
        if allowed is not None:
            allowed = allowed | ~row_mask.unsqueeze(-1)
        eager = self.force_eager or self.hook_pattern.active
        pattern_hook = self.hook_pattern
        if self.zero_empty_rows and eager:
            keep = row_mask[:, None, :, None].to(q.dtype)  # [batch, 1, query_pos, 1]
            pattern_hook = _ZeroRows(self.hook_pattern, keep)
        z = attend(q, keys, values, allowed, eager=eager, pattern_hook=pattern_hook)
        if self.zero_empty_rows:
            z = z * row_mask[:, None, :, None].to(z.dtype)
        return self.merge(self.hook_z(z))


class _ZeroRows:
    """Zero the pattern of rows that see no frame before it reaches the public hook."""

    def __init__(self, hook: HookPoint, keep: torch.Tensor) -> None:
        self.hook, self.keep = hook, keep

    def __call__(self, pattern: torch.Tensor) -> torch.Tensor:
        return self.hook(pattern * self.keep)
