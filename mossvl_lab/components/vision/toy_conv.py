"""A toy strided-conv vision encoder: seconds to train on a CPU, and a vision-tower ablation target.

Same inputs and outputs as the Mllama tower (one tile per frame), so any family that uses the Mllama
processor can swap it in with `override(cfg, {"vision": ToyConvConfig(...)})`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ToyConvConfig
from ...hooks import HookPoint
from ...registry import register
from .mllama_vit import VisionInputError


@register("vision", "toy_conv")
class ToyConvTower(nn.Module):
    def __init__(self, cfg: ToyConvConfig, d_model: int) -> None:
        super().__init__()
        self.cfg = cfg
        widths = (cfg.num_channels, *cfg.channels)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel_size=3, stride=2, padding=1) for a, b in zip(widths, widths[1:]))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.tokens_per_tile, cfg.hidden_size))
        self.multi_modal_projector = nn.Linear(cfg.hidden_size, d_model)
        self.hook_patch_embed = HookPoint()   # [frame, grid * grid, d_vision]
        self.hook_frame_tokens = HookPoint()  # [frame, vis_per_frame, d_model]

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor | None = None,
                aspect_ratio_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [batch, frame, tile=1, channel, H, W] -> [batch, frame, grid * grid, d_model]."""
        if pixel_values.dim() != 6 or pixel_values.shape[2] != 1:
            raise VisionInputError(f"toy_conv expects pixel_values [batch, frame, 1, channel, H, W], got "
                                   f"{tuple(pixel_values.shape)}")
        batch, frames = pixel_values.shape[:2]
        x = pixel_values.flatten(0, 2)
        for conv in self.convs:
            x = F.gelu(conv(x))
        x = F.adaptive_avg_pool2d(x, self.cfg.grid).flatten(2).transpose(1, 2)  # [frame, grid * grid, d_vision]
        x = self.hook_patch_embed(x + self.pos_embed)
        tokens = self.hook_frame_tokens(self.multi_modal_projector(x))
        return tokens.view(batch, frames, self.cfg.tokens_per_tile, -1)
