"""Processing settings: the frozen dataclass a Processor reads and saves as processor_config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .masks import MaskRule
from .tokenizer import ProcessingError

PROCESSOR_CONFIG_FILE = "processor_config.json"


@dataclass(frozen=True, kw_only=True)
class ProcessingConfig:
    """Processing settings (saved as processor_config.json). Pixel bounds are in pixels of the resized image."""

    image_size: int = 560             # Mllama tile side
    max_image_tiles: int = 1          # Mllama tiles per image (MOSS-Video-Preview: always 1)
    patch_size: int = 16              # MOSS-VL patch side
    merge_size: int = 2               # MOSS-VL merge window side (smart-resize factor = patch * merge)
    min_pixels: int = 4096            # MOSS-VL images (and realtime frames)
    max_pixels: int = 16777216
    video_min_pixels: int = 131072    # MOSS-VL video frames
    video_max_pixels: int = 786432
    video_fps: float = 1.0
    min_frames: int = 8               # = video_minlen of MOSS-Video-Preview
    max_frames: int = 256             # = video_maxlen
    cross_mask_rule: MaskRule = "cumulative"
    blank_image_for_text_only: bool = False  # MOSS-VL: text-only samples carry a blank image (spec §2.2)
    padding_side: Literal["left", "right"] = "left"
    # the system turn of real-time sessions and realtime training samples; None = the family's published prompt.
    # The shipped tiny checkpoints train with a one-line prompt (the published ones are ~560 tokens, most of a
    # tiny model's compute), so it travels with the checkpoint and sessions pick it up.
    realtime_system_prompt: str | None = None
    # MOSS-VL: write each frame's "<|time_start|>X.X seconds<|time_end|>" into prompts (offline videos and
    # real-time frames). False is the timestamp ablation; it travels with a checkpoint trained that way.
    frame_timestamps: bool = True

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ProcessingError(f"ProcessingConfig.padding_side={self.padding_side!r}; expected 'left' or 'right'")
        if self.cross_mask_rule not in ("cumulative", "mllama_stock"):
            raise ProcessingError(f"ProcessingConfig.cross_mask_rule={self.cross_mask_rule!r}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ProcessingError(f"ProcessingConfig needs 1 <= min_frames ({self.min_frames}) <= max_frames "
                                  f"({self.max_frames})")
        if self.video_fps <= 0:
            raise ProcessingError(f"ProcessingConfig.video_fps must be positive, got {self.video_fps}")

    @classmethod
    def for_model(cls, cfg: Any) -> "ProcessingConfig":
        """Defaults of the model's family, sized to its vision tower."""
        vision = cfg.vision
        if cfg.family == "moss_vl":
            factor2 = (vision.patch_size * vision.spatial_merge_size) ** 2  # spec values at factor 32, in tokens
            return cls(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size, min_pixels=4 * factor2,
                       max_pixels=16384 * factor2, video_min_pixels=128 * factor2, video_max_pixels=768 * factor2,
                       min_frames=1, max_frames=256, blank_image_for_text_only=True)
        tiles = vision.max_num_tiles if cfg.family == "mllama" else 1
        rule = "mllama_stock" if cfg.family == "mllama" else "cumulative"
        return cls(image_size=vision.image_size, max_image_tiles=tiles, cross_mask_rule=rule)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProcessingConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ProcessingError(f"{PROCESSOR_CONFIG_FILE}: unknown setting(s) {unknown}; known: {sorted(names)}")
        return cls(**data)
