"""MOSS-VL vision tower: SigLIP2-style ViT with 2-D RoPE, deepstack taps, one merger MLP, separator (spec §2.3).

Per call, all media are packed on one patch axis: patch embed -> bilinearly interpolated absolute position
embedding -> pre-LN blocks whose attention is full within a frame and never crosses frames (2-D RoPE on
q/k) -> taps after the deepstack blocks -> merger (per-source LayerNorm, 2x2 window concat, MLP) -> a learned
separator after every frame's merged tokens.

Input layout (processor side, spec §2.2): pixel_values [patch, patch_dim] with each frame's patches in merge
window order (h/2, w/2, 2, 2) and each patch vector channel x temporal x patch x patch; grid_thw [media, 3]
(t, h, w) in patches. temporal_patch_size is 1, so every frame is its own t and frames are independent.

Parameter names equal the checkpoint keys under `model.visual.`; `separator_token` is the top-level
`model.separator_token` (the checkpoint layer maps it).

Hook shapes (everything packed over all frames of the call, frame-major):
    hook_patch_embed                 [patch, d_vision]
    blocks.{l}.hook_resid_post       [patch, d_vision]
    hook_frame_tokens                [vis, d_model]     merged tokens and separators, as in FrameTokens.states
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import MossVisionConfig
from ...hooks import HookPoint
from ...registry import register
from ..rope import default_inv_freq, rotate_half
from .mllama_vit import VisionInputError

INIT_STD = 0.02  # initializer_range of the published vision config


@dataclass(frozen=True)
class FrameTokens:
    """The tower's output: cross-attention states of every frame of the call."""

    states: torch.Tensor  # [vis, d_model] frame-major: each frame's eh*ew merged tokens (row-major), then its separator
    tokens_per_frame: tuple[int, ...]  # rows of `states` per frame (eh*ew + 1 with a separator)
    grids: tuple[tuple[int, int], ...]  # merged (eh, ew) per frame


def frame_grids(grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Patch grid (h, w) of every frame, in packing order: grid_thw [media, 3] -> one entry per frame."""
    return [(int(h), int(w)) for t, h, w in torch.as_tensor(grid_thw).reshape(-1, 3).tolist() for _ in range(t)]


def tokens_for_grid(grid_thw: torch.Tensor | Sequence[Sequence[int]], merge_size: int = 2,
                    separator: bool = True) -> list[int]:
    """Cross-attention tokens per frame: (h/merge)*(w/merge) merged tokens + 1 separator (221 for 640x352 px)."""
    return [(h // merge_size) * (w // merge_size) + int(separator) for h, w in frame_grids(grid_thw)]


def merge_window_order(h: int, w: int, merge: int, device: torch.device | None = None) -> torch.Tensor:
    """Row-major patch index of each position in merge-window order (h/m, w/m, m, m): [h * w] long."""
    index = torch.arange(h * w, device=device).view(h // merge, merge, w // merge, merge)
    return index.permute(0, 2, 1, 3).reshape(-1)


def interpolate_positions(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear sample of a learned side x side position grid at an h x w frame grid.

    table [side * side, d_vision] (row-major grid); returns [h * w, d_vision] row-major. Sample points are
    linspace(0, side - 1, n) per axis, neighbours floor and floor + 1 clipped to the last row/column.
    """
    side = int(round(table.shape[0] ** 0.5))
    weights, index, axes = [], [], []
    for n in (h, w):
        coord = torch.linspace(0, side - 1, n, device=table.device)  # fp32, as the reference
        lo = coord.long()  # coordinates are >= 0, so truncation is floor
        hi = (lo + 1).clamp(max=side - 1)
        axes.append((lo, hi, coord - lo))
    (r0, r1, dh), (c0, c1, dw) = axes
    for rows, wr in ((r0, 1 - dh), (r1, dh)):
        for cols, wc in ((c0, 1 - dw), (c1, dw)):
            index.append((rows[:, None] * side + cols[None, :]).reshape(-1))  # [h * w]
            weights.append((wr[:, None] * wc[None, :]).reshape(-1, 1))  # [h * w, 1]
    return sum(table[i] * wt.to(table.dtype) for i, wt in zip(index, weights))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MossVisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # stored as the checkpoint's Conv3d; its kernel covers a whole patch, so it is applied as a linear layer
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [patch, patch_dim] -> [patch, d_vision]."""
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


def rope_tables(h: int, w: int, merge: int, head_dim: int, theta: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE cos, sin for one frame's patches in merge-window order, each [patch, d_head] fp32.

    Half of each head's rotary pairs turn with the patch row, half with the column. Qwen2-VL builds the table
    over head_dim / 2, giving head_dim / 4 frequencies per axis. Recomputed per call (a few hundred values) so no
    buffer has to survive meta builds or dtype casts.
    """
    inv_freq = default_inv_freq(head_dim // 2, theta).to(device)  # [d_head / 4] fp32
    order = merge_window_order(h, w, merge, device)
    angles = torch.cat([(order // w)[:, None] * inv_freq, (order % w)[:, None] * inv_freq], dim=-1)
    emb = torch.cat([angles, angles], dim=-1)  # [patch, d_head]
    return emb.cos(), emb.sin()


def apply_vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [frame, head, patch, d_head]; cos/sin [patch, d_head]. Rotated in at least fp32, returned in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


@dataclass(frozen=True)
class Segment:
    """A run of consecutive frames sharing one patch grid: attended as a batch, no mask needed."""

    frames: int
    h: int
    w: int
    cos: torch.Tensor  # [h * w, d_head]
    sin: torch.Tensor  # [h * w, d_head]


class Attention(nn.Module):
    def __init__(self, cfg: MossVisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)  # output ordered q|k|v, then heads
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """x [patch, d_vision] -> [patch, d_vision]; attention never crosses a frame boundary."""
        qkv, out, start = self.qkv(x), [], 0
        for seg in segments:
            n = seg.frames * seg.h * seg.w
            # [patch, 3 * d_vision] -> [3, frame, head, patch_in_frame, d_head]
            q, k, v = qkv[start:start + n].view(seg.frames, seg.h * seg.w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = apply_vision_rope(q, seg.cos, seg.sin), apply_vision_rope(k, seg.cos, seg.sin)
            z = F.scaled_dot_product_attention(q, k, v)  # [frame, head, patch_in_frame, d_head]; scale d_head^-0.5
            out.append(z.transpose(1, 2).reshape(n, -1))
            start += n
        return self.proj(torch.cat(out) if len(out) > 1 else out[0])


class MLP(nn.Module):
    def __init__(self, cfg: MossVisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))  # hidden_act gelu_pytorch_tanh


class Block(nn.Module):
    """Pre-LN: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, cfg: MossVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.hook_resid_post = HookPoint()  # [patch, d_vision]

    def forward(self, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """x [patch, d_vision] -> [patch, d_vision]."""
        x = x + self.attn(self.norm1(x), segments)
        x = x + self.mlp(self.norm2(x))
        return self.hook_resid_post(x)


class Merger(nn.Module):
    """One MLP over each 2x2 window of [final, taps...] features (MOSS's single deepstack merger)."""

    def __init__(self, cfg: MossVisionConfig, d_model: int) -> None:
        super().__init__()
        d_in = cfg.merger_input_dim
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
                                   for _ in range(1 + len(cfg.deepstack_visual_indexes)))
        self.linear_fc1 = nn.Linear(d_in, d_in, bias=True)
        self.linear_fc2 = nn.Linear(d_in, d_model, bias=True)

    def forward(self, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        """sources: final output then taps, each [patch, d_vision] -> [patch / merge^2, d_model]."""
        x = torch.cat([norm(s) for norm, s in zip(self.norms, sources)], dim=-1)  # [patch, sources * d_vision]
        # a window's patches are contiguous, so each row is [p0(final, taps...), p1(...), p2(...), p3(...)]
        x = x.reshape(-1, self.linear_fc1.in_features)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))  # exact GELU here, unlike the blocks


@register("vision", "moss_vit")
class MossVisionTower(nn.Module):
    """Packed patches of all media -> FrameTokens (merged tokens + separator per frame)."""

    def __init__(self, cfg: MossVisionConfig, d_model: int) -> None:
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        self.patch_embed = PatchEmbed(cfg)
        self.hook_patch_embed = HookPoint()  # [patch, d_vision]
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.merger = Merger(cfg, d_model)
        if cfg.separator:
            self.separator_token = nn.Parameter(torch.empty(d_model))
        self.hook_frame_tokens = HookPoint()  # [vis, d_model]
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d, nn.Embedding)):
                nn.init.normal_(m.weight, std=INIT_STD)
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.zeros_(m.bias)
        if self.cfg.separator:
            nn.init.normal_(self.separator_token, std=INIT_STD)

    def tokens_for_grid(self, grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> list[int]:
        """Cross-attention tokens per frame for this tower's merge size and separator setting."""
        return tokens_for_grid(grid_thw, self.cfg.spatial_merge_size, self.cfg.separator)

    def _check_inputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> None:
        cfg, m = self.cfg, self.cfg.spatial_merge_size
        if pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise VisionInputError(
                f"pixel_values must be [patch, patch_dim={cfg.patch_dim}] (channel x temporal x {cfg.patch_size} x "
                f"{cfg.patch_size} per patch, all media packed); got shape {tuple(pixel_values.shape)}")
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.is_floating_point():
            raise VisionInputError(f"grid_thw must be an integer [media, 3] tensor of (t, h, w) in patches; got "
                                   f"shape {tuple(grid_thw.shape)} dtype {grid_thw.dtype}")
        for t, h, w in grid_thw.tolist():
            if min(t, h, w) < 1:
                raise VisionInputError(f"grid_thw row {(t, h, w)} has a non-positive entry")
            if h % m or w % m:
                raise VisionInputError(
                    f"frame grid {h}x{w} is not divisible by the merge size {m}; resize frames to multiples of "
                    f"{cfg.merge_factor} pixels (smart_resize)")
        total = sum(t * h * w for t, h, w in grid_thw.tolist())
        if total != pixel_values.shape[0]:
            raise VisionInputError(f"grid_thw describes {total} patches (sum of t*h*w) but pixel_values has "
                                   f"{pixel_values.shape[0]}")

    def _segments(self, grids: list[tuple[int, int]]) -> list[Segment]:
        runs: list[list[int]] = []  # [frames, h, w] for each run of equal consecutive grids
        for h, w in grids:
            if runs and (runs[-1][1], runs[-1][2]) == (h, w):
                runs[-1][0] += 1
            else:
                runs.append([1, h, w])
        cfg, device = self.cfg, self.pos_embed.weight.device
        return [Segment(n, h, w, *rope_tables(h, w, cfg.spatial_merge_size, cfg.head_dim, cfg.rope_theta, device))
                for n, h, w in runs]

    def _positions(self, segments: Sequence[Segment]) -> torch.Tensor:
        """Absolute position embedding of every patch, merge-window order: [patch, d_vision]."""
        merge, parts = self.cfg.spatial_merge_size, []
        for seg in segments:
            grid = interpolate_positions(self.pos_embed.weight, seg.h, seg.w)  # [h * w, d_vision] row-major
            grid = grid[merge_window_order(seg.h, seg.w, merge, grid.device)]
            parts.append(grid.repeat(seg.frames, 1))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> FrameTokens:
        """pixel_values [patch, patch_dim] (all media packed, merge-window order); grid_thw [media, 3] long (t, h, w)
        in patches, readable on the host (its values set the loop structure)."""
        grid_thw = torch.as_tensor(grid_thw)
        self._check_inputs(pixel_values, grid_thw)
        cfg, m = self.cfg, self.cfg.spatial_merge_size
        grids = frame_grids(grid_thw)
        merged = tuple((h // m, w // m) for h, w in grids)
        counts = tuple(self.tokens_for_grid(grid_thw))
        weight = self.patch_embed.proj.weight
        if not grids:
            empty = weight.new_zeros(0, self.d_model)
            return FrameTokens(self.hook_frame_tokens(empty), counts, merged)

        segments = self._segments(grids)
        x = self.hook_patch_embed(self.patch_embed(pixel_values.to(weight.dtype)))  # [patch, d_vision]
        x = x + self._positions(segments)
        taps: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x, segments)
            if i in cfg.deepstack_visual_indexes:
                taps[i] = x
        tokens = self.merger([x] + [taps[i] for i in cfg.deepstack_visual_indexes])  # [patch / m^2, d_model]

        if cfg.separator:
            parts, start = [], 0
            for seg in segments:
                per = (seg.h // m) * (seg.w // m)
                frames = tokens[start:start + seg.frames * per].view(seg.frames, per, -1)
                sep = self.separator_token.to(tokens.dtype).expand(seg.frames, 1, -1)
                parts.append(torch.cat([frames, sep], dim=1).reshape(-1, self.d_model))
                start += seg.frames * per
            tokens = torch.cat(parts) if len(parts) > 1 else parts[0]
        return FrameTokens(self.hook_frame_tokens(tokens), counts, merged)  # states [vis, d_model]
