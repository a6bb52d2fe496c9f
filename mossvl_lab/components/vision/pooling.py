"""2-D pooling of a tile's patch grid (MOSS-Video-Preview `get_2dPool`, spec §2.4).

The CLS token is kept aside, the patch tokens are laid back onto their row-major grid, pooled, and the
CLS token is re-prepended: 1 + 40*40 = 1601 tokens become 1 + 10*10 = 101 with average pooling, stride 4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...config import PoolMode


def pooled_side(side: int, mode: PoolMode, stride: int) -> int:
    """Grid side after pooling; avg/max pooling floor, bilinear rounds up (as `get_2dPool` does)."""
    if mode == "none":
        return side
    if mode == "bilinear":
        return math.ceil(side / stride)
    return side // stride


def pool_patch_grid(tokens: torch.Tensor, mode: PoolMode, stride: int) -> torch.Tensor:
    """Pool the patch grid of each tile, keeping its CLS token first.

    tokens [n, 1 + side * side, d]  (CLS first, then patches row-major)
    returns [n, 1 + pooled * pooled, d] with pooled = pooled_side(side, mode, stride)
    """
    if mode == "none":
        return tokens
    n, length, d = tokens.shape
    side = math.isqrt(length - 1)
    if side * side != length - 1:
        raise ValueError(f"pool_patch_grid: {length - 1} patch tokens do not form a square grid")
    cls, patches = tokens[:, :1], tokens[:, 1:]
    grid = patches.transpose(1, 2).reshape(n, d, side, side)  # [n, d, row, col]
    if mode == "average":
        grid = F.avg_pool2d(grid, kernel_size=stride, stride=stride)
    elif mode == "max":
        grid = F.max_pool2d(grid, kernel_size=stride, stride=stride)
    elif mode == "bilinear":
        grid = F.interpolate(grid, size=pooled_side(side, mode, stride), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"pool_patch_grid: unknown mode {mode!r}; expected none, average, max or bilinear")
    patches = grid.flatten(2).transpose(1, 2)  # [n, pooled * pooled, d]
    return torch.cat([cls, patches], dim=1)
