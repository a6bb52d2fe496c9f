"""Grouped-query attention: one kernel with an eager path (materialised pattern) and an SDPA path,
and the text self-attention component built on it.

Masks stay boolean (True = may attend) until the kernel turns them into what its backend needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import HookPoint
from .norms import RMSNorm
from .rope import Rotation, apply_rope


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[batch, kv_head, key_pos, d_head] -> [batch, head, key_pos, d_head]; query head h reads kv head h // group."""
    group = num_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, *,
           eager: bool, pattern_hook: HookPoint | None = None) -> torch.Tensor:
    """Scaled dot-product attention with GQA.

    q [batch, head, query_pos, d_head]; k, v [batch, kv_head, key_pos, d_head];
    allowed [batch, query_pos, key_pos] bool or None (everything visible). Every row must allow at least
    one key (callers guarantee it; a fully masked row has no defined softmax).
    Returns z [batch, head, query_pos, d_head]. The eager path materialises the pattern
    [batch, head, query_pos, key_pos] and passes it through `pattern_hook`.
    """
    scale = q.shape[-1] ** -0.5
    if not eager:
        return _grouped_sdpa(q, k, v, allowed, scale)
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if pattern_hook is not None:
        pattern = pattern_hook(pattern)
    return torch.matmul(pattern, v)


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """SDPA that never copies K/V per query head: the query heads sharing a kv head are folded into the query
    axis ([batch, kv_head, group * query_pos, d_head]). Expanding K/V instead (what `enable_gqa` does on CPU)
    copies the whole cache every step, which dominates decoding once hundreds of frames are cached."""
    batch, heads, length, d_head = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    # streaming rows usually see every cached key: then the mask only costs time (SDPA's unmasked path is faster)
    mask = None if allowed is None or bool(allowed.all()) else allowed.unsqueeze(1)  # [batch, 1, query_pos, key_pos]
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    folded = q.reshape(batch, kv_heads, group * length, d_head)  # head h = kv * group + r, as in expand_kv
    if mask is not None:
        mask = mask.unsqueeze(2).expand(batch, 1, group, length, mask.shape[-1]).reshape(batch, 1, group * length, -1)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, length, d_head)


class HeadProjections(nn.Module):
    """q/k/v/o projections shared by self- and cross-attention (checkpoint names q_proj ... o_proj)."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, d_head: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.d_head = num_heads, num_kv_heads, d_head
        self.q_proj = nn.Linear(d_model, num_heads * d_head, bias=False)
        self.k_proj = nn.Linear(d_model, num_kv_heads * d_head, bias=False)
        self.v_proj = nn.Linear(d_model, num_kv_heads * d_head, bias=False)
        self.o_proj = nn.Linear(num_heads * d_head, d_model, bias=False)

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """[batch, pos, heads * d_head] -> [batch, heads, pos, d_head]."""
        return x.view(x.shape[0], x.shape[1], heads, self.d_head).transpose(1, 2)

    def merge(self, z: torch.Tensor) -> torch.Tensor:
        """[batch, head, pos, d_head] -> o_proj -> [batch, pos, d_model]."""
        return self.o_proj(z.transpose(1, 2).reshape(z.shape[0], z.shape[2], -1))


class SelfAttention(HeadProjections):
    """Causal GQA self-attention with RoPE; optional per-head q/k RMSNorm before RoPE (Qwen3).

    Hook shapes: hook_q/hook_rot_q [batch, head, pos, d_head]; hook_k/hook_v/hook_rot_k
    [batch, kv_head, pos, d_head] (new tokens only); hook_pattern [batch, head, query_pos, key_pos];
    hook_z [batch, head, query_pos, d_head].
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, d_head: int, *,
                 qk_norm: bool, eps: float) -> None:
        super().__init__(d_model, num_heads, num_kv_heads, d_head)
        if qk_norm:
            self.q_norm = RMSNorm(d_head, eps)
            self.k_norm = RMSNorm(d_head, eps)
        self.qk_norm = qk_norm
        self.force_eager = False
        for name in ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_pattern", "hook_z"):
            setattr(self, name, HookPoint())

    def forward(self, x: torch.Tensor, rotation: Rotation | None, allowed: torch.Tensor,
                cache_update=None) -> torch.Tensor:
        """x [batch, pos, d_model]; rotation tables [batch, pos, d_head]; allowed [batch, pos, key_pos]
        over cached + new keys; cache_update(k, v) -> (all_k, all_v) appends to the layer's cache."""
        q = self.hook_q(self.split(self.q_proj(x), self.num_heads))
        k = self.hook_k(self.split(self.k_proj(x), self.num_kv_heads))
        v = self.hook_v(self.split(self.v_proj(x), self.num_kv_heads))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.hook_rot_q(apply_rope(q, rotation))
        k = self.hook_rot_k(apply_rope(k, rotation))
        if cache_update is not None:
            k, v = cache_update(k, v)
        eager = self.force_eager or self.hook_pattern.active
        z = attend(q, k, v, allowed, eager=eager, pattern_hook=self.hook_pattern)
        return self.merge(self.hook_z(z))
