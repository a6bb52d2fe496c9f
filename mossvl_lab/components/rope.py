"""Rotary position embeddings: frequency tables per kind and the rotate-half application.

`build_rope(d_head, cfg)` returns a module whose forward maps position ids to a `Rotation` (cos, sin),
or None for kind "none". The same module rotates text queries/keys and, in cross-attention, vision keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import RopeConfig
from ..registry import build, register


@dataclass(frozen=True)
class Rotation:
    """cos/sin tables in fp32, each [batch, pos, d_head]."""

    cos: torch.Tensor
    sin: torch.Tensor

    def select(self, index: torch.Tensor) -> "Rotation":
        """Gather positions along `pos`: index [batch, n] -> tables [batch, n, d_head]."""
        idx = index.unsqueeze(-1).expand(-1, -1, self.cos.shape[-1])
        return Rotation(self.cos.gather(1, idx), self.sin.gather(1, idx))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, rotation: Rotation | None) -> torch.Tensor:
    """x: [batch, head, pos, d_head]; rotation tables [batch, pos, d_head] (NeoX rotate-half layout)."""
    if rotation is None:
        return x
    cos = rotation.cos.to(x.dtype).unsqueeze(1)
    sin = rotation.sin.to(x.dtype).unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def default_inv_freq(d_head: int, theta: float) -> torch.Tensor:
    """[d_head / 2] inverse frequencies theta^(-2j/d_head)."""
    return 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.int64).float() / d_head))


def llama3_inv_freq(d_head: int, cfg: RopeConfig) -> torch.Tensor:
    """Llama-3.1 scaling: long wavelengths divided by `factor`, a smooth ramp between the two cut-offs."""
    inv_freq = default_inv_freq(d_head, cfg.theta)
    old_len = cfg.original_max_position_embeddings
    low_freq_wavelen = old_len / cfg.low_freq_factor
    high_freq_wavelen = old_len / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / cfg.factor, inv_freq)
    smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """1-D rotary embedding; position_ids [batch, pos] -> Rotation with tables [batch, pos, d_head]."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        super().__init__()
        # non-persistent: recomputed from the config, never part of a checkpoint
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> Rotation:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [batch, pos, d_head / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return Rotation(emb.cos(), emb.sin())


class MRoPE(nn.Module):
    """3-D rotary embedding over (t, h, w) position ids (MOSS-VL / Qwen-VL).

    Each rotary pair takes its angle from one axis: `interleaved` (Qwen3-VL, MOSS-VL) gives pairs
    1, 4, 7, ... to h and 2, 5, 8, ... to w within the first 3 * section entries and the rest to t;
    `chunked` (Qwen2-VL) gives the first section[0] pairs to t, the next section[1] to h, then w.
    Text tokens carry equal components, so for them both reduce to 1-D RoPE.
    """

    def __init__(self, inv_freq: torch.Tensor, section: tuple[int, ...], interleaved: bool) -> None:
        super().__init__()
        half = inv_freq.numel()
        if sum(section) != half:
            raise ValueError(f"mrope_section {section} must sum to d_head / 2 = {half}")
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        axis = torch.zeros(half, dtype=torch.long)
        if interleaved:
            for dim in (1, 2):
                axis[dim:3 * section[dim]:3] = dim
        else:
            axis[section[0]:section[0] + section[1]] = 1
            axis[section[0] + section[1]:] = 2
        self.register_buffer("axis", axis, persistent=False)  # [d_head / 2]: which of t, h, w each pair uses

    def forward(self, position_ids: torch.Tensor) -> Rotation:
        """position_ids [batch, pos] (text: t = h = w) or [3, batch, pos] -> tables [batch, pos, d_head]."""
        if position_ids.dim() == 2:
            freqs = position_ids[..., None].float() * self.inv_freq.float()
        else:
            per_axis = position_ids[..., None].float() * self.inv_freq.float()  # [3, batch, pos, d_head / 2]
            index = self.axis.view(1, 1, 1, -1).expand(1, *per_axis.shape[1:])
            freqs = per_axis.gather(0, index).squeeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        return Rotation(emb.cos(), emb.sin())


@register("rope", "mrope_interleaved")
def _mrope_interleaved(d_head: int, cfg: RopeConfig) -> MRoPE:
    return MRoPE(default_inv_freq(d_head, cfg.theta), cfg.mrope_section, interleaved=True)


@register("rope", "mrope_chunked")
def _mrope_chunked(d_head: int, cfg: RopeConfig) -> MRoPE:
    return MRoPE(default_inv_freq(d_head, cfg.theta), cfg.mrope_section, interleaved=False)


@register("rope", "default")
def _default_rope(d_head: int, cfg: RopeConfig) -> RotaryEmbedding:
    return RotaryEmbedding(default_inv_freq(d_head, cfg.theta))


@register("rope", "llama3")
def _llama3_rope(d_head: int, cfg: RopeConfig) -> RotaryEmbedding:
    return RotaryEmbedding(llama3_inv_freq(d_head, cfg))


@register("rope", "none")
def _no_rope(d_head: int, cfg: RopeConfig) -> None:
    return None


def build_rope(d_head: int, cfg: RopeConfig) -> nn.Module | None:
    return build("rope", cfg.kind, d_head, cfg)
